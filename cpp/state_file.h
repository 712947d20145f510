// L1 data: state files (issue 7; the C API's save / load, issue 14) and the model fingerprint
// they carry. One implementation, used by Python (SequenceState.save, load_state) and the C API
// (mambart_state_save / mambart_state_load), so a file written by either loads in the other.
//
// The format is safetensors: an 8-byte little-endian header length, a JSON header, the tensors.
//   tensors:  one tensor per state tensor of the model (State::layout order: for Mamba-1/2
//             `conv` and `ssm`, each (layers in it, per-layer shape...)) in the state's dtype:
//             F32, or BF16 for an SSM state of a generator with state_dtype bfloat16 (issue 18;
//             a reader widens it to fp32, and a generator loading it converts to its own
//             state_dtype), `tokens` (I32, the
//             whole sequence), `logits` (F32 (V), only when no token is pending), contiguous
//             from offset 0 in that order;
//   __metadata__ (strings): format "mambart-state", format_version "2", model_fingerprint, dtype,
//             architecture, fed, has_rng ("0"/"1"; "1" adds seed, stream, counter), state_spec
//             (JSON: [{name, shape, layers}] per state tensor) and layer_types (JSON list).
//             Version 1 (still read) had exactly `conv` and `ssm` and no state_spec/layer_types.
// Reading treats the file as hostile (issue 23): a regular file only (checked before a blocking
// open), the header bounded (16 MiB) and checked against the file size before anything else is
// read, every tensor's dtype, shape and offsets checked (contiguous, exact coverage, no trailing
// bytes), finite values, strict decimals in range. Writing is atomic: a unique temporary file in
// the destination's directory, fsynced, renamed over the path.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mambart {

class LayerTypes;

// What a state file says about the model that made it.
struct StateIdentity {
    std::string fingerprint;  // model_fingerprint() of the model directory
    std::string dtype;        // the model's dtype ("float32", ...)
    std::string architecture;
    bool has_layer_types = false;          // false in version-1 files
    std::vector<std::string> layer_types;  // one per layer
};

struct StateTensor {
    std::string name;
    std::vector<int64_t> shape;   // (layers in the tensor, per-layer shape...)
    std::vector<int64_t> layers;  // the layers it holds (empty in version-1 files)
    std::vector<float> data;      // prod(shape) floats
    bool bf16 = false;            // stored as BF16 (the values are bf16: exact either way)
};

struct StateFile {
    StateIdentity model;
    std::vector<StateTensor> tensors;  // in the model's state order
    std::vector<int32_t> tokens;       // the whole sequence
    int64_t fed = 0;                   // tokens[0, fed) are in the state; the rest are pending
    std::vector<float> logits;         // (V) when fed == tokens.size(), else empty
    bool has_rng = false;              // the RNG position of the generation that made it
    uint64_t seed = 0, stream = 0, counter = 0;
    std::string version;               // as read: "1" or "2"
};

constexpr int64_t kMaxStateHeaderBytes = int64_t(1) << 24;

// Reads and validates a state file (layer type names are checked against `types`). Throws
// StateError "<path>: not a valid mambart state file: <what>" (or "<path>: ..." for a path that
// is missing or not a regular file).
StateFile read_state_file(const std::string& path, const LayerTypes& types);
// The same on bytes in memory (the fuzz target); `path` names them in messages.
StateFile parse_state_file(const std::string& bytes, const std::string& path,
                           const LayerTypes& types);
// Writes `f` to `path` atomically; StateError "<path>: cannot write the state file: <why>".
// A state without layer types (read from a version-1 file) is written as version 1.
void write_state_file(const std::string& path, const StateFile& f);
// The file's bytes (what write_state_file writes).
std::string state_file_bytes(const StateFile& f);

// The identity of a mambart model directory: sha256 (hex) over "mambart-fingerprint-v2\0",
// config.json's bytes, model.safetensors' size (decimal), its 8-byte header length and header,
// and 64 blocks of 4 KiB spread evenly over the data (the first and last included). A guard
// against using a state with another model, not a checksum of every weight. ModelLoadError
// naming the file when one cannot be read.
std::string model_fingerprint(const std::string& model_dir);

}  // namespace mambart
