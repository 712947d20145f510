// cuda/vec.cuh: a 16-byte vector of weights (fp32, fp16, bf16) unpacked into floats, shared by
// the GEMVs (cuda/linear.cu) and the persistent decode (cuda/decode_persistent.cu) so that both
// convert alike.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace mambart {
namespace cuda {

// Unpacks a 16-byte vector of T into floats.
template <typename T> struct Vec;
template <> struct Vec<float> {
    static constexpr int kN = 4;
    __device__ static void unpack(const uint4& r, float* f) {
        f[0] = __uint_as_float(r.x); f[1] = __uint_as_float(r.y);
        f[2] = __uint_as_float(r.z); f[3] = __uint_as_float(r.w);
    }
};
template <> struct Vec<__half> {
    static constexpr int kN = 8;
    __device__ static void unpack(const uint4& r, float* f) {
        const uint32_t u[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            __half2 h = *reinterpret_cast<const __half2*>(&u[i]);
            float2 v = __half22float2(h);
            f[2 * i] = v.x; f[2 * i + 1] = v.y;
        }
    }
};
template <> struct Vec<__nv_bfloat16> {
    static constexpr int kN = 8;
    __device__ static void unpack(const uint4& r, float* f) {
        const uint32_t u[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            f[2 * i] = __uint_as_float(u[i] << 16);
            f[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
        }
    }
};

}  // namespace cuda
}  // namespace mambart
