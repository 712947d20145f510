// L1 data: the vocabulary as bytes (issue 14). For every token id, the bytes it adds to the
// decoded text, read from a `tokenizers` tokenizer.json, so that the engine can match stop
// strings on the bytes of generated tokens without the tokenizers library (the C API has none).
//
// Decoders understood: ByteLevel (GPT-2 / GPT-NeoX / Llama-3 byte-level BPE: each character of a
// token stands for one byte), Metaspace and the SentencePiece-style Sequence of Replace("▁", " "),
// ByteFallback ("<0xNN>" is one byte), Fuse and Strip; any other decoder: the token's own UTF-8.
// Special added tokens add no bytes (decode skips them, as the Python surface does).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mambart {

class TokenBytes {
 public:
    TokenBytes() = default;
    // Parses tokenizer.json text; `origin` names it in errors (InvalidArgument / ModelLoadError).
    static TokenBytes from_json(const std::string& text, const std::string& origin);
    // Reads and parses a tokenizer.json file (a regular file, bounded in size).
    static TokenBytes from_file(const std::string& path);

    bool empty() const { return bytes_.empty(); }
    int64_t size() const { return int64_t(bytes_.size()); }
    // The bytes of `id`; empty for an id without bytes (special, unknown or out of range).
    const std::string& bytes(int32_t id) const {
        static const std::string kNone;
        return id >= 0 && id < int32_t(bytes_.size()) ? bytes_[size_t(id)] : kNone;
    }

 private:
    std::vector<std::string> bytes_;  // (vocab) per id
};

}  // namespace mambart
