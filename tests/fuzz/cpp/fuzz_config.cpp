// libFuzzer target: config.json parsing and validation (cpp/config.cpp and the layer units'
// parsers, cpp/layers/) on arbitrary text, built with ASan + UBSan (integer overflow in derived
// sizes is UB and aborts). A config that validates must give sane derived sizes: every tensor
// and state shape positive, a positive parameter count.
#include <cstdint>
#include <string>

#include "config.h"
#include "error.h"
#include "layers/registry.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string text(reinterpret_cast<const char*>(data), size);
    try {
        const mambart::ModelConfig c =
            mambart::ModelConfig::from_json_text(text, "fuzz", mambart::layer_types());
        if (c.d_model < 1 || c.n_layer < 1 || c.vocab_size < 1 || c.vocab_size_padded < c.vocab_size)
            __builtin_trap();
        if (int64_t(c.layers.size()) != c.n_layer || !(c.norm_eps > 0.0f)) __builtin_trap();
        if (c.num_params() < 1) __builtin_trap();
        for (const auto& t : c.tensors())
            for (int64_t v : t.shape)
                if (v < 1) __builtin_trap();
        for (const auto& l : c.layers)
            for (const auto& s : l->state(c))
                if (s.numel() < 1) __builtin_trap();
    } catch (const mambart::ModelLoadError&) {
    } catch (const mambart::Unsupported&) {
    }
    return 0;
}
