// libFuzzer target: the state-file reader (cpp/state_file.cpp, issue 23) on arbitrary bytes,
// built with ASan + UBSan. A file is refused with StateError or read; a file that reads must
// be consistent (fed within the tokens, logits exactly when nothing is pending, each tensor's
// values matching its shape), and writing it back and reading that again gives the same state.
#include <cstdint>
#include <string>

#include "error.h"
#include "layers/registry.h"
#include "state_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string bytes(reinterpret_cast<const char*>(data), size);
    using namespace mambart;
    try {
        const StateFile f = parse_state_file(bytes, "fuzz", layer_types());
        if (f.fed < 0 || f.fed > int64_t(f.tokens.size())) __builtin_trap();
        if ((f.fed == int64_t(f.tokens.size())) == f.logits.empty()) __builtin_trap();
        for (const StateTensor& t : f.tensors) {
            uint64_t n = 1;
            for (int64_t d : t.shape) n *= uint64_t(d);
            if (n != t.data.size()) __builtin_trap();
        }
        const StateFile g = parse_state_file(state_file_bytes(f), "fuzz again", layer_types());
        if (g.tokens != f.tokens || g.fed != f.fed || g.logits != f.logits ||
            g.tensors.size() != f.tensors.size() || g.seed != f.seed ||
            g.model.layer_types != f.model.layer_types)
            __builtin_trap();
    } catch (const StateError&) {
    }
    return 0;
}
