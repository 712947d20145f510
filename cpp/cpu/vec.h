// CPU: 8-lane fp32 vectors (GCC/Clang vector extensions) and the transcendental functions the
// scans need, written without libm calls so they stay in registers. The compiler maps f8 to one
// AVX2 register with -march=native (MAMBART_CPU_NATIVE) and to two SSE registers otherwise, so
// this code is portable and needs no intrinsics.
#pragma once

#include <cstdint>
#include <cstring>

namespace mambart {
namespace cpu {

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
// 4 lanes: one NEON / SSE register. On aarch64 GCC keeps 8-lane (32-byte) values in memory
// around every operation, so the scans run there as two 4-lane halves (the same arithmetic per
// lane, so the same results).
typedef float f4 __attribute__((vector_size(16)));
typedef int32_t i4 __attribute__((vector_size(16)));
// 16 lanes: one AVX-512 register where the scans are built for such a CPU (MAMBART_CPU_NATIVE);
// the same arithmetic per lane as f8 / f4.
typedef float f16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

template <class V> struct IntVec;
template <> struct IntVec<f16> { typedef i16 type; };
template <> struct IntVec<f8> { typedef i8 type; };
template <> struct IntVec<f4> { typedef i4 type; };

template <class V> inline V vsplat(float v) { return V{} + v; }

inline f8 splat(float v) { return f8{v, v, v, v, v, v, v, v}; }

inline f8 load8(const float* p) {
    f8 v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

inline void store8(float* p, f8 v) { std::memcpy(p, &v, sizeof(v)); }

template <class V> inline V vload(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}
template <class V> inline void vstore(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }

// e^x for x in [-87, 88] (clamped outside): 2^(x log2 e) split into an integer power built in
// the exponent bits and a degree-6 polynomial for 2^f, f in [-0.5, 0.5]. Relative error < 2e-7.
template <class V> inline V expv(V x) {
    x = x < vsplat<V>(-87.0f) ? vsplat<V>(-87.0f) : x;
    x = x > vsplat<V>(88.0f) ? vsplat<V>(88.0f) : x;
    const V t = x * 1.44269504088896341f;
    const V k = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
    const V f = t - k;
    V p = vsplat<V>(1.5403530393381606e-4f);
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910072e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.0f;
    typedef typename IntVec<V>::type I;
    const I bits = (__builtin_convertvector(k, I) + 127) << 23;
    V scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}
inline f8 exp8(f8 x) { return expv(x); }

// silu(v) = v / (1 + e^-v)
template <class V> inline V siluv(V v) { return v / (1.0f + expv(-v)); }
inline f8 silu8(f8 v) { return siluv(v); }

// softplus with the reference's threshold: v > 20 -> v, else log(1 + e^v), as
// max(v, 0) + log1p(e^-|v|) with log1p(u) = 2 atanh(s) = 2 (s + s³/3 + ... + s¹⁵/15),
// s = u / (2 + u) in [0, 1/3] (truncation < 1e-8 relative; exact for tiny results too).
template <class V> inline V softplusv(V v) {
    const V av = v < 0.0f ? -v : v;
    const V u = expv(-av);
    const V s = u / (2.0f + u), s2 = s * s;
    V q = vsplat<V>(1.0f / 15.0f);
    q = q * s2 + 1.0f / 13.0f;
    q = q * s2 + 1.0f / 11.0f;
    q = q * s2 + 1.0f / 9.0f;
    q = q * s2 + 1.0f / 7.0f;
    q = q * s2 + 1.0f / 5.0f;
    q = q * s2 + 1.0f / 3.0f;
    q = q * s2 + 1.0f;
    const V r = (v > 0.0f ? v : vsplat<V>(0.0f)) + 2.0f * s * q;
    return v > 20.0f ? v : r;
}
inline f8 softplus8(f8 v) { return softplusv(v); }

// Scalar versions (lane 0 of the vector code: identical results).
inline float exp1(float x) { return exp8(splat(x))[0]; }
inline float softplus1(float v) { return softplus8(splat(v))[0]; }
inline float silu1(float v) { return silu8(splat(v))[0]; }

}  // namespace cpu
}  // namespace mambart
