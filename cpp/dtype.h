// L0 base: element types and scalar conversions.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

namespace mambart {

// F32 / F16 / BF16: the float storage and load dtypes. I8 / U8: the storage of quantized
// weights only (int8 values; int4 values packed two a byte, see Weight in op_params.h): never a
// load dtype, and never converted to float as a whole (convert_to_f32 refuses them).
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, I8 = 3, U8 = 4 };

size_t dtype_size(DType dt);
// "float32" / "float16" / "bfloat16" / "int8" / "uint8"
const char* dtype_name(DType dt);
inline bool dtype_is_float(DType dt) {
    return dt == DType::F32 || dt == DType::F16 || dt == DType::BF16;
}

// Weight quantization schemes (issue 18; docs/format.md "Quantized weights"):
//   Int8: weight-only, symmetric, one scale per output row:   w[n, k] = scale[n] * q[n, k],
//         q int8 in [-127, 127];
//   Int4: weight-only, symmetric, one scale per group of `group` weights along K:
//         w[n, k] = scale[n, k / group] * (u[n, k] - 8), u a 4-bit unsigned value.
enum class QuantScheme : int { None = 0, Int8 = 1, Int4 = 2 };
// "none" / "int8" / "int4"
const char* quant_scheme_name(QuantScheme q);
// "int8" / "int4"; false for anything else.
bool quant_scheme_from_name(const std::string& name, QuantScheme* out);
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
