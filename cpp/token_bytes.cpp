#include "token_bytes.h"

#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include "error.h"
#include "regular_file.h"

namespace mambart {

namespace {
using nlohmann::json;

// Decodes UTF-8 into code points; false on malformed input.
bool code_points(const std::string& s, std::vector<uint32_t>* out) {
    out->clear();
    for (size_t i = 0; i < s.size();) {
        const unsigned char c = static_cast<unsigned char>(s[i]);
        const int n = c < 0x80 ? 0 : (c >> 5) == 6 ? 1 : (c >> 4) == 14 ? 2 : (c >> 3) == 30 ? 3 : -1;
        if (n < 0 || i + size_t(n) >= s.size()) return false;  // bad lead byte, or cut short
        uint32_t cp = n == 0 ? c : n == 1 ? (c & 0x1F) : n == 2 ? (c & 0x0F) : (c & 0x07);
        for (int k = 1; k <= n; ++k) {
            const unsigned char d = static_cast<unsigned char>(s[i + size_t(k)]);
            if ((d >> 6) != 2) return false;
            cp = (cp << 6) | (d & 0x3F);
        }
        out->push_back(cp);
        i += size_t(n) + 1;
    }
    return true;
}

// GPT-2's bytes_to_unicode, inverted: code point -> byte (-1: not a byte character).
std::vector<int> byte_level_inverse() {
    std::vector<int> inv(512, -1);
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
        const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        const int cp = printable ? b : 256 + extra++;
        inv[size_t(cp)] = b;
    }
    return inv;
}

enum class Scheme { Utf8, ByteLevel, Metaspace };

struct DecoderInfo {
    Scheme scheme = Scheme::Utf8;
    bool byte_fallback = false;
    std::string replace_from, replace_to;  // Metaspace / Replace: "▁" -> " "
};

void read_decoder(const json& d, DecoderInfo* info) {
    if (!d.is_object()) return;
    const std::string type = d.value("type", "");
    if (type == "ByteLevel") {
        info->scheme = Scheme::ByteLevel;
    } else if (type == "Metaspace") {
        info->scheme = Scheme::Metaspace;
        info->replace_from = d.value("replacement", std::string("\xE2\x96\x81"));
        info->replace_to = " ";
    } else if (type == "ByteFallback") {
        info->byte_fallback = true;
    } else if (type == "Replace") {
        const json& p = d.value("pattern", json::object());
        if (p.is_object() && p.contains("String") && p["String"].is_string() &&
            d.contains("content") && d["content"].is_string()) {
            if (info->scheme == Scheme::Utf8) info->scheme = Scheme::Metaspace;
            info->replace_from = p["String"].get<std::string>();
            info->replace_to = d["content"].get<std::string>();
        }
    } else if (type == "Sequence" && d.contains("decoders") && d["decoders"].is_array()) {
        for (const json& x : d["decoders"]) read_decoder(x, info);
    }
}

bool is_byte_token(const std::string& t, unsigned char* b) {  // "<0xNN>"
    if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return false;
    auto hex = [](char c) {
        return c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                                : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    };
    const int hi = hex(t[3]), lo = hex(t[4]);
    if (hi < 0 || lo < 0) return false;
    *b = static_cast<unsigned char>(hi * 16 + lo);
    return true;
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
    if (from.empty()) return s;
    for (size_t i = s.find(from); i != std::string::npos; i = s.find(from, i + to.size()))
        s.replace(i, from.size(), to);
    return s;
}
}  // namespace

TokenBytes TokenBytes::from_json(const std::string& text, const std::string& origin) {
    json j;
    try {
        j = json::parse(text);
    } catch (const json::exception& e) {
        throw ModelLoadError(str_cat(origin, ": not valid JSON (", e.what(), ")"));
    }
    if (!j.is_object() || !j.contains("model") || !j["model"].is_object())
        throw ModelLoadError(str_cat(origin, ": not a tokenizer.json (no \"model\" object)"));
    const json& model = j["model"];
    DecoderInfo dec;
    if (j.contains("decoder")) read_decoder(j["decoder"], &dec);
    if (model.value("byte_fallback", false)) dec.byte_fallback = true;

    // id -> token string, from the model's vocabulary and the added tokens.
    std::vector<std::string> tok;
    std::vector<uint8_t> special;
    auto put = [&](int64_t id, const std::string& s, bool sp) {
        if (id < 0 || id > (int64_t(1) << 24))
            throw ModelLoadError(str_cat(origin, ": token id ", id, " out of range"));
        if (size_t(id) >= tok.size()) {
            tok.resize(size_t(id) + 1);
            special.resize(size_t(id) + 1, 0);
        }
        tok[size_t(id)] = s;
        special[size_t(id)] = sp ? 1 : 0;
    };
    if (model.contains("vocab")) {
        const json& v = model["vocab"];
        if (v.is_object()) {  // BPE / WordPiece / WordLevel: token -> id
            for (auto it = v.begin(); it != v.end(); ++it)
                if (it.value().is_number_integer()) put(it.value().get<int64_t>(), it.key(), false);
        } else if (v.is_array()) {  // Unigram: [[piece, score], ...]
            int64_t id = 0;
            for (const json& e : v) {
                if (e.is_array() && !e.empty() && e[0].is_string())
                    put(id, e[0].get<std::string>(), false);
                ++id;
            }
        }
    }
    if (j.contains("added_tokens") && j["added_tokens"].is_array())
        for (const json& a : j["added_tokens"])
            if (a.is_object() && a.contains("id") && a["id"].is_number_integer() &&
                a.contains("content") && a["content"].is_string())
                put(a["id"].get<int64_t>(), a["content"].get<std::string>(),
                    a.value("special", false));
    if (tok.empty()) throw ModelLoadError(str_cat(origin, ": the tokenizer has no vocabulary"));

    // Added (non-special) tokens are literal text: the decoder does not map them.
    std::vector<uint8_t> added(tok.size(), 0);
    if (j.contains("added_tokens") && j["added_tokens"].is_array())
        for (const json& a : j["added_tokens"])
            if (a.is_object() && a.contains("id") && a["id"].is_number_integer()) {
                const int64_t id = a["id"].get<int64_t>();
                if (id >= 0 && size_t(id) < added.size()) added[size_t(id)] = 1;
            }

    static const std::vector<int> inv = byte_level_inverse();
    TokenBytes out;
    out.bytes_.resize(tok.size());
    std::vector<uint32_t> cps;
    for (size_t id = 0; id < tok.size(); ++id) {
        const std::string& t = tok[id];
        std::string& b = out.bytes_[id];
        if (special[id]) continue;
        if (added[id]) {
            b = t;
            continue;
        }
        unsigned char byte = 0;
        if (dec.byte_fallback && is_byte_token(t, &byte)) {
            b.assign(1, char(byte));
            continue;
        }
        if (dec.scheme == Scheme::ByteLevel) {
            bool ok = code_points(t, &cps);
            std::string s;
            for (uint32_t c : cps) {
                const int v = c < inv.size() ? inv[c] : -1;
                if (v < 0) {
                    ok = false;
                    break;
                }
                s += char(v);
            }
            b = ok ? s : t;  // not byte-level text: its own UTF-8
        } else if (dec.scheme == Scheme::Metaspace) {
            b = replace_all(t, dec.replace_from, dec.replace_to);
        } else {
            b = t;
        }
    }
    return out;
}

TokenBytes TokenBytes::from_file(const std::string& path) {
    struct stat st {};
    const std::string text = read_regular_file(path, "tokenizer file", int64_t(256) << 20, &st);
    return from_json(text, path);
}

}  // namespace mambart
