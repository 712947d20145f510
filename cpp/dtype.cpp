#include "dtype.h"

#include <cmath>

#include "error.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define MAMBART_F16C_PATH 1
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#define MAMBART_NEON_PATH 1
#endif

namespace mambart {

size_t dtype_size(DType dt) {
    switch (dt) {
        case DType::F32: return 4;
        case DType::F16: return 2;
        case DType::BF16: return 2;
        case DType::I8: return 1;
        case DType::U8: return 1;
    }
    return 0;
}

const char* dtype_name(DType dt) {
    switch (dt) {
        case DType::F32: return "float32";
        case DType::F16: return "float16";
        case DType::BF16: return "bfloat16";
        case DType::I8: return "int8";
        case DType::U8: return "uint8";
    }
    return "?";
}

const char* quant_scheme_name(QuantScheme q) {
    switch (q) {
        case QuantScheme::None: return "none";
        case QuantScheme::Int8: return "int8";
        case QuantScheme::Int4: return "int4";
    }
    return "?";
}

bool quant_scheme_from_name(const std::string& name, QuantScheme* out) {
    if (name == "int8") *out = QuantScheme::Int8;
    else if (name == "int4") *out = QuantScheme::Int4;
    else return false;
    return true;
}

DType dtype_from_name(const std::string& name, const char* what) {
    if (name == "float32" || name == "fp32" || name == "f32") return DType::F32;
    if (name == "float16" || name == "fp16" || name == "f16" || name == "half") return DType::F16;
    if (name == "bfloat16" || name == "bf16") return DType::BF16;
    throw InvalidArgument(str_cat(what, ": unknown dtype '", name,
                                  "' (expected float32, float16 or bfloat16)"));
}

// IEEE half <-> single, bit-exact, round to nearest even.
float f16_to_f32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t u;
    if (exp == 0) {
        if (mant == 0) {
            u = sign;
        } else {  // subnormal: normalize
            int e = -1;
            do {
                ++e;
                mant <<= 1;
            } while ((mant & 0x400u) == 0);
            u = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
        }
    } else if (exp == 0x1f) {
        u = sign | 0x7f800000u | (mant << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

uint16_t f32_to_f16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
    const uint32_t absu = u & 0x7fffffffu;
    if (absu > 0x7f800000u) return sign | 0x7e00u;  // NaN
    if (absu >= 0x477ff000u) {                       // rounds to >= 65520: inf
        return sign | 0x7c00u;
    }
    if (absu < 0x38800000u) {  // result is subnormal or zero (|f| < 2^-14)
        if (absu < 0x33000000u) return sign;  // < 2^-25 rounds to 0
        const uint32_t e = absu >> 23;
        uint32_t mant = (absu & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126 - e;  // 14 - (e - 127) + 13 - ... bits to drop
        // value = mant * 2^(e-150); half subnormal unit is 2^-24 -> q = mant >> (126 - e)
        const uint32_t q = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1);
        const uint32_t half = 1u << (shift - 1);
        uint32_t r = q;
        if (rem > half || (rem == half && (q & 1u))) ++r;
        return sign | static_cast<uint16_t>(r);
    }
    // normal
    uint32_t r = absu - (112u << 23);  // rebias exponent 127 -> 15
    const uint32_t rem = r & 0x1fffu;
    r >>= 13;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
    return sign | static_cast<uint16_t>(r);
}

// `src` may be misaligned (a safetensors data section starts wherever the header ends), so
// 16-bit values are loaded with memcpy, not through a uint16_t pointer (UB; found by the
// libFuzzer safetensors target under UBSan).
void convert_to_f32(const void* src, DType src_dt, float* dst, size_t n) {
    if (n == 0) return;
    if (!dtype_is_float(src_dt))
        throw InvalidArgument(str_cat("convert_to_f32: ", dtype_name(src_dt),
                                      " data is quantized, not a float tensor"));
    const unsigned char* s = static_cast<const unsigned char*>(src);
    switch (src_dt) {
        case DType::F32:
            std::memcpy(dst, src, n * 4);
            return;
        case DType::F16: {
            size_t i = 0;
#ifdef MAMBART_NEON_PATH
            // FCVTL / FCVTL2, 8 at a time (exact; groups holding a NaN take the scalar path,
            // which keeps a signalling NaN's bits).
            for (; i + 8 <= n; i += 8) {
                const float16x8_t h = vreinterpretq_f16_u8(vld1q_u8(s + 2 * i));
                const float32x4_t lo = vcvt_f32_f16(vget_low_f16(h)), hi = vcvt_high_f32_f16(h);
                if (vminvq_u32(vandq_u32(vceqq_f32(lo, lo), vceqq_f32(hi, hi))) == 0) break;
                vst1q_f32(dst + i, lo);
                vst1q_f32(dst + i + 4, hi);
            }
#endif
            for (; i < n; ++i) {
                uint16_t h;
                std::memcpy(&h, s + 2 * i, 2);
                dst[i] = f16_to_f32(h);
            }
            return;
        }
        case DType::BF16: {
            for (size_t i = 0; i < n; ++i) {
                uint16_t h;
                std::memcpy(&h, s + 2 * i, 2);
                dst[i] = bf16_to_f32(h);
            }
            return;
        }
        default: return;  // integer dtypes: refused above
    }
}

#ifdef MAMBART_F16C_PATH
namespace {
// f32_to_f16 over n values with F16C, 8 at a time (the hardware conversion rounds to nearest
// even like f32_to_f16; groups holding a NaN take the scalar path, which fixes the NaN's bits).
// Checked equal to the scalar conversion for all 2^32 float bit patterns.
__attribute__((target("avx,f16c"))) void f32_to_f16_f16c(const float* src, uint16_t* dst,
                                                         size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(src + i);
        if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0) {
            for (size_t j = i; j < i + 8; ++j) dst[j] = f32_to_f16(src[j]);
            continue;
        }
        const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
    }
    for (; i < n; ++i) dst[i] = f32_to_f16(src[i]);
}

// CPUID leaf 1: AVX (ecx bit 28), F16C (bit 29), OSXSAVE (bit 27); XCR0 bits 1-2 say the OS
// saves the YMM registers. Read directly: clang 14's __builtin_cpu_supports has no "f16c".
bool detect_f16c() {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (__get_cpuid(1, &eax, &ebx, &ecx, &edx) == 0) return false;
    const unsigned need = (1u << 27) | (1u << 28) | (1u << 29);
    if ((ecx & need) != need) return false;
    unsigned xcr0_lo = 0, xcr0_hi = 0;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    return (xcr0_lo & 0x6u) == 0x6u;
}

bool have_f16c() {
    static const bool ok = detect_f16c();
    return ok;
}
}  // namespace
#endif

#ifdef MAMBART_NEON_PATH
namespace {
// f32_to_f16 over n values with NEON's FCVTN / FCVTN2 (base ARMv8-A), 8 at a time: rounds to
// nearest even (the default FPCR mode) like f32_to_f16; groups holding a NaN take the scalar
// path, which fixes the NaN's bits.
void f32_to_f16_neon(const float* src, uint16_t* dst, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const float32x4_t lo = vld1q_f32(src + i), hi = vld1q_f32(src + i + 4);
        if (vminvq_u32(vandq_u32(vceqq_f32(lo, lo), vceqq_f32(hi, hi))) == 0) {
            for (size_t j = i; j < i + 8; ++j) dst[j] = f32_to_f16(src[j]);
            continue;
        }
        const float16x8_t h = vcvt_high_f16_f32(vcvt_f16_f32(lo), hi);
        vst1q_u16(dst + i, vreinterpretq_u16_f16(h));
    }
    for (; i < n; ++i) dst[i] = f32_to_f16(src[i]);
}
}  // namespace
#endif

void convert_from_f32(const float* src, void* dst, DType dst_dt, size_t n) {
    if (n == 0) return;
    if (!dtype_is_float(dst_dt))
        throw InvalidArgument(str_cat("convert_from_f32: cannot convert to ", dtype_name(dst_dt)));
    switch (dst_dt) {
        case DType::F32:
            std::memcpy(dst, src, n * 4);
            return;
        case DType::F16: {
            uint16_t* d = static_cast<uint16_t*>(dst);
#ifdef MAMBART_F16C_PATH
            if (have_f16c()) {
                f32_to_f16_f16c(src, d, n);
                return;
            }
#endif
#ifdef MAMBART_NEON_PATH
            f32_to_f16_neon(src, d, n);
            return;
#endif
            for (size_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
            return;
        }
        case DType::BF16: {
            uint16_t* d = static_cast<uint16_t*>(dst);
            for (size_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
            return;
        }
        default: return;  // integer dtypes: refused above
    }
}

}  // namespace mambart
