// cuda/common.cuh: error checks, launch checks, reductions and dtype helpers shared by every
// kernel file. Includes only CUDA headers and L0 (error.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "check.h"
#include "error.h"

namespace mambart {
namespace cuda {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- element loads -----------------------------------------------------------------------------
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// ---- SSM state storage (option state_dtype, issue 18; op_params.h BF16_STATE_RULE) ----------
// A scan kernel templated on its state's storage S (float or __nv_bfloat16) reads it through
// to_f32, keeps it in fp32 registers, rounds it after every token (state_round) and writes it
// with from_f32<S>. For S = float each is the identity: the fp32 kernels are unchanged.
template <typename S> __device__ __forceinline__ float state_round(float v) {
    return to_f32(from_f32<S>(v));
}
template <typename S, typename Params> __host__ __device__ inline S* state_ptr(const Params& p) {
    if constexpr (sizeof(S) == 2)
        return reinterpret_cast<S*>(p.ssm_state_bf16);
    else
        return p.ssm_state;
}
template <typename S, typename Params> __host__ __device__ inline S* trace_ptr(const Params& p) {
    if constexpr (sizeof(S) == 2)
        return reinterpret_cast<S*>(p.state_trace_bf16);
    else
        return p.state_trace;
}

// The reference's softplus: v > 20 -> v, else log(1 + exp(v)).
__device__ __forceinline__ float softplus_f(float v) { return v > 20.0f ? v : log1pf(expf(v)); }
__device__ __forceinline__ float silu_f(float v) { return v / (1.0f + expf(-v)); }

// ---- programmatic dependent launch (PDL, sm_90+) ----------------------------------------------
// Kernels of the decode chain are launched with launch_pdl(): the next kernel may start while
// this one runs; it does its independent work first (the GEMVs prefetch their weight rows into
// L2), then pdl_wait() blocks until the previous kernel has finished and its writes are visible.
// Rule: a kernel launched through launch_pdl() calls pdl_wait() in every block before it reads
// anything an earlier kernel wrote and before it writes anything (so that completion stays
// ordered along the stream), and pdl_trigger() right after, letting its own successor launch.
// Both are no-ops below sm_90, where launch_pdl() launches normally.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// Brings the `bytes` at `p` towards L2 (no register result; a hint the hardware may drop).
__device__ __forceinline__ void prefetch_l2(const void* p, int64_t bytes, int lane, int lanes) {
    const char* c = static_cast<const char*>(p);
    for (int64_t off = int64_t(lane) * 128; off < bytes; off += int64_t(lanes) * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(c + off));
}

// Whether conv1d, the gated RMSNorm and the SSD state passing load their inputs into registers
// ahead of use (option cuda_load_ahead, set_load_ahead); off: their earlier loops (the same
// sums in the same order either way).
bool load_ahead_enabled();

// An attribute of the current device (cudaDeviceGetAttribute; throws CudaError on failure).
int device_attr(cudaDeviceAttr attr);

// Whether launch_pdl() sets the programmatic-serialization attribute (set_programmatic_launch).
bool pdl_enabled();
// Whether the GEMVs prefetch weight rows to L2 before pdl_wait(): PDL on and the prefetch not
// turned off (set_weight_prefetch).
bool weight_prefetch_enabled();

template <typename... KArgs, typename... Args>
void launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t s,
                Args... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl_enabled() ? 1 : 0;
    check(cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...), "cudaLaunchKernelEx");
}

// ---- reductions ---------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// add_norm's per-thread accumulation, shared by add_norm_kernel and the fused projection's norm
// prologue (cuda/linear.cu) so both round alike: s + v² (RMSNorm: one rounding) or s + v.
__device__ __forceinline__ float add_norm_acc(float s, float v, bool rms) {
    return rms ? __fmaf_rn(v, v, s) : __fadd_rn(s, v);
}
// A conv tap, a + w x with one rounding (conv1d_kernel and the fused projection's conv step).
__device__ __forceinline__ float conv_acc(float a, float w, float x) { return __fmaf_rn(w, x, a); }

// Sum over the block (blockDim.x a multiple of 32, <= 1024). `smem` holds 32 floats. Every
// thread gets the total. Contains __syncthreads: call from uniform control flow.
__device__ __forceinline__ float block_sum(float v, float* smem) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // smem may still be read by a previous call
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    const int nwarps = blockDim.x >> 5;
    float t = lane < nwarps ? smem[lane] : 0.0f;
    return warp_sum(t);
}

}  // namespace cuda
}  // namespace mambart
