// cuda/elementwise.cu: embedding gather, the SiLU gate and dtype conversion.
//
// embedding: out[i, j] = float(table[ids[i], j]), or 0 for an id outside [0, V)
//   Grid: (n); block: 256 threads striding over d. Hosts check ids; the zero row covers ids the
//   device wrote itself (the engine's decode fed in place: a row with a non-finite logit samples
//   -1, and its result is discarded).
// silu_gate: y[i, j] *= silu(z[i * ld_z + j])
//   Grid: ceil(n*E / 256); one element per thread.
// gelu_gate: y[i, j] *= gelu(z[i * ld_z + j]), gelu(v) = v/2 (1 + erf(v / sqrt 2))
//   Grid: ceil(n*E / 256); one element per thread.
// relu_sq: y[i] = relu(y[i])^2
//   Grid: ceil(n / 256), grid-stride.
// scale: y[i] *= s
//   Grid: ceil(n / 256), grid-stride.
// convert: dst[i] = dst_dtype(src[i]) (round to nearest even)
//   Grid: ceil(n / 256), grid-stride.
#include "common.cuh"
#include "kernels.h"

namespace mambart {
namespace cuda {
namespace {

template <typename T>
__global__ void embedding_kernel(const int32_t* __restrict__ ids, const T* __restrict__ table,
                                 float* __restrict__ out, int64_t d, int64_t V) {
    pdl_wait();  // launched with launch_pdl (see common.cuh)
    pdl_trigger();
    const int64_t i = blockIdx.x;
    const int64_t id = ids[i];
    float* o = out + i * d;
    if (id < 0 || id >= V) {
        for (int64_t j = threadIdx.x; j < d; j += blockDim.x) o[j] = 0.0f;
        return;
    }
    const T* row = table + id * d;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) o[j] = to_f32(row[j]);
}

struct SiluAct {
    __device__ float operator()(float v) const { return silu_f(v); }
};
struct GeluAct {  // exact (erf) GELU
    __device__ float operator()(float v) const {
        return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    }
};

// silu_gate / gelu_gate: y[i, j] *= act(z[i * ld_z + j])
template <typename Act>
__global__ void gate_kernel(float* __restrict__ y, const float* __restrict__ z, int64_t ld_z,
                            int64_t n, int64_t E) {
    const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= n * E) return;
    const int64_t i = idx / E, j = idx % E;
    y[idx] *= Act()(z[i * ld_z + j]);
}

template <typename Act>
void launch_gate(const SiluGateParams& p, cudaStream_t s, const char* name) {
    MAMBART_CHECK_ARG(p.n >= 0 && p.E > 0 && p.ld_z >= p.E, name, ": bad sizes n=", p.n, " E=",
                      p.E, " ld_z=", p.ld_z);
    if (p.n == 0) return;
    const int64_t total = p.n * p.E;
    gate_kernel<Act><<<unsigned(ceil_div(total, 256)), 256, 0, s>>>(p.y, p.z, p.ld_z, p.n, p.E);
    check_launch(name, s);
}

__global__ void relu_sq_kernel(float* __restrict__ y, int64_t n) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += int64_t(gridDim.x) * blockDim.x) {
        const float r = fmaxf(y[i], 0.0f);
        y[i] = r * r;
    }
}

__global__ void scale_kernel(float* __restrict__ y, int64_t n, float s) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += int64_t(gridDim.x) * blockDim.x)
        y[i] *= s;
}

template <typename S, typename D>
__global__ void convert_kernel(const S* __restrict__ src, D* __restrict__ dst, int64_t n) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += int64_t(gridDim.x) * blockDim.x)
        dst[i] = from_f32<D>(to_f32(src[i]));
}

template <typename S>
void convert_from(const S* src, void* dst, DType dt, int64_t n, int grid, cudaStream_t s) {
    switch (dt) {
        case DType::F32: convert_kernel<<<grid, 256, 0, s>>>(src, static_cast<float*>(dst), n); break;
        case DType::F16: convert_kernel<<<grid, 256, 0, s>>>(src, static_cast<__half*>(dst), n); break;
        case DType::BF16:
            convert_kernel<<<grid, 256, 0, s>>>(src, static_cast<__nv_bfloat16*>(dst), n);
            break;
        default: throw Unsupported(str_cat("launch_convert: to ", dtype_name(dt)));
    }
}

}  // namespace

void launch_embedding(const EmbeddingParams& p, cudaStream_t s) {
    MAMBART_CHECK_ARG(p.n >= 0 && p.d > 0 && p.V > 0, "launch_embedding: bad sizes n=", p.n,
                      " d=", p.d, " V=", p.V);
    MAMBART_CHECK_ARG(p.ids && p.table && p.out, "launch_embedding: null pointer");
    if (p.n == 0) return;
    MAMBART_CHECK_ARG(p.n <= 0x7fffffff, "launch_embedding: n=", p.n, " too large");
    const int grid = int(p.n);
    switch (p.dtype) {
        case DType::F32:
            launch_pdl(embedding_kernel<float>, dim3(grid), dim3(256), 0, s, p.ids,
                       static_cast<const float*>(p.table), p.out, p.d, p.V);
            break;
        case DType::F16:
            launch_pdl(embedding_kernel<__half>, dim3(grid), dim3(256), 0, s, p.ids,
                       static_cast<const __half*>(p.table), p.out, p.d, p.V);
            break;
        case DType::BF16:
            launch_pdl(embedding_kernel<__nv_bfloat16>, dim3(grid), dim3(256), 0, s, p.ids,
                       static_cast<const __nv_bfloat16*>(p.table), p.out, p.d, p.V);
            break;
    }
    check_launch("embedding_kernel", s);
}

void launch_silu_gate(const SiluGateParams& p, cudaStream_t s) {
    launch_gate<SiluAct>(p, s, "silu_gate_kernel");
}

void launch_gelu_gate(const SiluGateParams& p, cudaStream_t s) {
    launch_gate<GeluAct>(p, s, "gelu_gate_kernel");
}

void launch_relu_sq(float* y, int64_t n, cudaStream_t s) {
    MAMBART_CHECK_ARG(n >= 0 && (n == 0 || y), "launch_relu_sq: n=", n);
    if (n == 0) return;
    const int grid = int(std::min<int64_t>(ceil_div(n, 256), 65535));
    relu_sq_kernel<<<grid, 256, 0, s>>>(y, n);
    check_launch("relu_sq_kernel", s);
}

void launch_scale(float* y, int64_t n, float s, cudaStream_t st) {
    MAMBART_CHECK_ARG(n >= 0 && (n == 0 || y), "launch_scale: n=", n);
    if (n == 0) return;
    const int grid = int(std::min<int64_t>(ceil_div(n, 256), 65535));
    scale_kernel<<<grid, 256, 0, st>>>(y, n, s);
    check_launch("scale_kernel", st);
}

void launch_convert(const void* src, DType st, void* dst, DType dt, int64_t n, cudaStream_t s) {
    MAMBART_CHECK_ARG(n >= 0, "launch_convert: n=", n);
    if (n == 0) return;
    const int grid = int(std::min<int64_t>(ceil_div(n, 256), 65535));
    switch (st) {
        case DType::F32: convert_from(static_cast<const float*>(src), dst, dt, n, grid, s); break;
        case DType::F16: convert_from(static_cast<const __half*>(src), dst, dt, n, grid, s); break;
        case DType::BF16:
            convert_from(static_cast<const __nv_bfloat16*>(src), dst, dt, n, grid, s);
            break;
        default: throw Unsupported(str_cat("launch_convert: from ", dtype_name(st)));
    }
    check_launch("convert_kernel", s);
}

}  // namespace cuda
}  // namespace mambart
