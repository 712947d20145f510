// L0 base: element types and scalar conversions.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

namespace mambart {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

size_t dtype_size(DType dt);
// "float32" / "float16" / "bfloat16"
const char* dtype_name(DType dt);
// Accepts "float32"/"fp32"/"f32", "float16"/"fp16"/"half"/"f16", "bfloat16"/"bf16";
// throws InvalidArgument naming `what` otherwise.
DType dtype_from_name(const std::string& name, const char* what = "dtype");

inline float bf16_to_f32(uint16_t h) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Round to nearest even; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// Converts n elements of `src` (dtype `src_dt`) into fp32 `dst`.
void convert_to_f32(const void* src, DType src_dt, float* dst, size_t n);
// Converts n fp32 elements into `dst` of dtype `dst_dt`.
void convert_from_f32(const float* src, void* dst, DType dst_dt, size_t n);

}  // namespace mambart
