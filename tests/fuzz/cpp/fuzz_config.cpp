// libFuzzer target: config.json parsing and validation (cpp/config.cpp) on arbitrary text,
// built with ASan + UBSan (integer overflow in derived sizes is UB and aborts). A config that
// validates must give sane derived sizes.
#include <cstdint>
#include <string>

#include "config.h"
#include "error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string text(reinterpret_cast<const char*>(data), size);
    try {
        const mambart::ModelConfig c = mambart::ModelConfig::from_json_text(text, "fuzz");
        if (c.d_model < 1 || c.n_layer < 1 || c.vocab_size < 1 || c.vocab_size_padded < c.vocab_size)
            __builtin_trap();
        if (c.conv_dim() < 1 || c.d_in_proj() < 1 || c.num_params() < 1) __builtin_trap();
        if (!(c.norm_eps > 0.0f) || !(c.dt_max > c.dt_min)) __builtin_trap();
    } catch (const mambart::ModelLoadError&) {
    } catch (const mambart::Unsupported&) {
    }
    return 0;
}
