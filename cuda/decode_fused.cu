// cuda/decode_fused.cu: the fused single-token (L = 1, decode) mixer steps, one kernel per layer
// in place of the separate ops. Both run inside the decode CUDA graph (no allocation, no sync).
//
// mamba1_decode_kernel (after in_proj, conv and x_proj, whose reduction over all E channels sits
// between the conv and the scan):
//   dt[e] = Σ_r W_dt[e, r] xdbl[r];  δ = softplus(dt[e] + dt_bias[e])   (threshold 20)
//   h[e, n] <- exp(δ A[e, n]) h[e, n] + δ x[e] B[n];  y[e] = (Σ_n C[n] h[e, n] + D[e] x[e]) silu(z[e])
//   Grid: (ceil(E / channels per block), B); block: 4 warps. A channel is owned by a group of
//   g = min(32, next_pow2(N)) lanes: the dt_proj dot product splits r over the group's lanes,
//   lane j holds states n = j + g i; both reductions are shuffles within the group.
//   Preconditions: 1 <= N <= 256, R >= 1, ld_xdbl >= R + 2N, ld_z >= E.
//
// mamba2_decode_kernel:
//   conv:  u[c] = silu(bias[c] + Σ_{k<W-1} w[c, k] st[c, k+1] + w[c, W-1] xbc[c]),
//          st[c, :] <- [st[c, 1:], xbc[c]]   for the head's x channels and its group's B, C
//   δ = clamp(softplus(dt[h] + dt_bias[h]), dt_min, dt_max)
//   s[h, p, n] <- exp(δ A[h]) s[h, p, n] + δ x[p] B[n];  y[p] = Σ_n C[n] s[h, p, n] + D[h] x[p]
//   (· silu(z[p]) when z is given);  g(h) = h / (H / G)
//   Grid: (H, B, ceil(P / 8)); block: 8 warps, warp w owns row p = 8 blockIdx.z + w, lane l the
//   states n = l + 32 i. Each block computes the conv of its 8 x channels (and rolls their conv
//   state: no other block reads them) and of its group's 2N B/C channels into shared memory.
//   The B/C conv states are shared by the (H / G) ceil(P / 8) blocks of (b, g): each block
//   counts itself in counters[b G + g] after its reads; the block that counts last rolls those
//   states and resets the counter to 0 (so every launch starts from zero).
//   Preconditions: 1 <= P, 1 <= N <= 256, 1 <= W <= kConvMaxWidth, H % G == 0,
//   B * G <= kDecodeCounters, ld_xbc >= H*P + 2GN, ld_dt >= H.
#include "common.cuh"
#include "kernels.h"

namespace mambart {
namespace cuda {
namespace {

constexpr int kM1Warps = 4;

template <typename T, int SPL>
__global__ void __launch_bounds__(kM1Warps * 32) mamba1_decode_kernel(Mamba1DecodeParams p, int g) {
    pdl_wait();  // launched with launch_pdl (see common.cuh)
    pdl_trigger();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int j = lane % g, cpw = 32 / g;
    const int64_t e_raw = (int64_t(blockIdx.x) * kM1Warps + warp) * cpw + lane / g;
    const bool valid = e_raw < p.E;
    const int64_t e = valid ? e_raw : p.E - 1;  // idle lanes still join the shuffles
    const int64_t b = blockIdx.y, N = p.N, R = p.R;
    const float* xd = p.xdbl + b * p.ld_xdbl;
    const T* wrow = static_cast<const T*>(p.dt_proj.data) + e * R;
    float dt = 0.0f;
    for (int64_t r = j; r < R; r += g) dt += to_f32(wrow[r]) * xd[r];
    for (int o = g >> 1; o > 0; o >>= 1) dt += __shfl_xor_sync(0xffffffffu, dt, o);
    const float delta = softplus_f(dt + p.dt_bias[e]);
    const float u = p.x[b * p.E + e];
    const float du = delta * u;
    float* state = p.ssm_state + (b * p.E + e) * N;
    float acc = 0.0f;
    float hn[SPL];
#pragma unroll
    for (int i = 0; i < SPL; ++i) {
        const int64_t n = j + int64_t(g) * i;
        if (n < N) {
            hn[i] = expf(delta * p.A[e * N + n]) * state[n] + du * xd[R + n];
            acc += xd[R + N + n] * hn[i];
        }
    }
    for (int o = g >> 1; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (!valid) return;
#pragma unroll
    for (int i = 0; i < SPL; ++i) {
        const int64_t n = j + int64_t(g) * i;
        if (n < N) state[n] = hn[i];
    }
    if (j == 0) p.y[b * p.E + e] = (acc + p.D[e] * u) * silu_f(p.z[b * p.ld_z + e]);
}

template <typename T>
void m1_dispatch(const Mamba1DecodeParams& p, int g, int spl, dim3 grid, cudaStream_t s) {
    const int threads = kM1Warps * 32;
    const dim3 block(threads);
    if (spl == 1)
        launch_pdl(mamba1_decode_kernel<T, 1>, grid, block, 0, s, p, g);
    else if (spl == 2)
        launch_pdl(mamba1_decode_kernel<T, 2>, grid, block, 0, s, p, g);
    else if (spl <= 4)
        launch_pdl(mamba1_decode_kernel<T, 4>, grid, block, 0, s, p, g);
    else
        launch_pdl(mamba1_decode_kernel<T, 8>, grid, block, 0, s, p, g);
}

constexpr int kM2Warps = 8;
constexpr int kMaxW = int(kConvMaxWidth);

// u = silu(bias + Σ w st[1:] + w[W-1] x); rolls st when `roll`.
__device__ __forceinline__ float conv_step(float* st, const float* w, float bias, float xnew,
                                           int64_t W, bool roll) {
    float v[kMaxW];
#pragma unroll
    for (int k = 0; k < kMaxW; ++k) v[k] = k < W - 1 ? st[k + 1] : 0.0f;
    float acc = bias;
#pragma unroll
    for (int k = 0; k < kMaxW; ++k)
        if (k < W - 1) acc += w[k] * v[k];
    acc += w[W - 1] * xnew;
    if (roll) {
#pragma unroll
        for (int k = 0; k < kMaxW; ++k)
            if (k < W - 1) st[k] = v[k];
        st[W - 1] = xnew;
    }
    return silu_f(acc);
}

// The Mamba-2 decode kernel's own flat argument block, made by launch_mamba2_decode from the
// shared Mamba2DecodeParams (cpp/op_params.h) after validation.
struct M2Args {
    const float* xbc;     // (B, ld_xbc): pre-conv [x (H*P) | B (G*N) | C (G*N)]
    int64_t ld_xbc;
    const float* dt;      // (B, ld_dt)
    int64_t ld_dt;
    float* conv_state;    // (B, H*P + 2*G*N, W) inout, oldest first
    const float* conv_w;  // (H*P + 2*G*N, W)
    const float* conv_b;  // (H*P + 2*G*N) or nullptr
    int64_t W;
    const float* z;       // (B, H*P) row stride ld_z, or nullptr
    int64_t ld_z;
    const float* A;       // (H)
    const float* D;       // (H)
    const float* dt_bias; // (H)
    float dt_min, dt_max;
    float* ssm_state;     // (B, H, P, N) inout
    float* y;             // (B, H*P)
    int* counters;        // (B*G) device ints, zero between launches (the kernel restores them)
    int64_t B, H, P, G, N;
};

template <int SPL>
__global__ void __launch_bounds__(kM2Warps * 32) mamba2_decode_kernel(M2Args p) {
    extern __shared__ float smem[];
    float* Bs = smem;         // (N) post-conv B of the group
    float* Cs = Bs + p.N;     // (N) post-conv C of the group
    __shared__ float xs[kM2Warps];
    __shared__ float dls[2];
    pdl_wait();  // launched with launch_pdl (see common.cuh)
    pdl_trigger();
    __shared__ int last;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t h = blockIdx.x, b = blockIdx.y, H = p.H, P = p.P, N = p.N, G = p.G, W = p.W;
    const int64_t g = h / (H / G), E = H * P, C = E + 2 * G * N;
    const int64_t p0 = int64_t(blockIdx.z) * kM2Warps;
    const float* xin = p.xbc + b * p.ld_xbc;
    float* cst = p.conv_state + b * C * W;
    for (int64_t i = threadIdx.x; i < 2 * N; i += blockDim.x) {
        const int64_t c = i < N ? E + g * N + i : E + G * N + g * N + (i - N);
        const float v = conv_step(cst + c * W, p.conv_w + c * W, p.conv_b ? p.conv_b[c] : 0.0f,
                                  xin[c], W, false);
        (i < N ? Bs[i] : Cs[i - N]) = v;
    }
    if (threadIdx.x < kM2Warps) {
        const int64_t pp = p0 + threadIdx.x;
        if (pp < P) {
            const int64_t c = h * P + pp;
            xs[threadIdx.x] = conv_step(cst + c * W, p.conv_w + c * W,
                                        p.conv_b ? p.conv_b[c] : 0.0f, xin[c], W, true);
        }
    }
    if (threadIdx.x == 32) {
        const float d = fminf(fmaxf(softplus_f(p.dt[b * p.ld_dt + h] + p.dt_bias[h]), p.dt_min),
                              p.dt_max);
        dls[0] = d;
        dls[1] = expf(d * p.A[h]);
    }
    __syncthreads();
    const int64_t pp = p0 + warp;
    if (pp < P) {  // warp-uniform
        const float delta = dls[0], dA = dls[1], xv = xs[warp], dx = delta * xv;
        float* srow = p.ssm_state + ((b * H + h) * P + pp) * N;
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < SPL; ++i) {
            const int64_t n = lane + 32 * i;
            if (n < N) {
                const float v = srow[n] * dA + dx * Bs[n];
                srow[n] = v;
                acc += v * Cs[n];
            }
        }
        acc = warp_sum(acc);
        if (lane == 0) {
            float yv = acc + p.D[h] * xv;
            if (p.z) yv *= silu_f(p.z[b * p.ld_z + h * P + pp]);
            p.y[b * E + h * P + pp] = yv;
        }
    }
    // The group's B/C conv states: rolled by the block of (b, g) that finishes last.
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        const int blocks = int((H / G) * gridDim.z);
        last = atomicAdd(p.counters + b * G + g, 1) == blocks - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int64_t i = threadIdx.x; i < 2 * N; i += blockDim.x) {
        const int64_t c = i < N ? E + g * N + i : E + G * N + g * N + (i - N);
        (void)conv_step(cst + c * W, p.conv_w + c * W, 0.0f, xin[c], W, true);
    }
    if (threadIdx.x == 0) p.counters[b * G + g] = 0;
}

}  // namespace

void launch_mamba1_decode(const Mamba1DecodeParams& p, cudaStream_t s) {
    MAMBART_CHECK_ARG(p.B >= 0 && p.E > 0 && p.R >= 1, "launch_mamba1_decode: bad sizes B=", p.B,
                      " E=", p.E, " R=", p.R);
    if (!(p.N >= 1 && p.N <= 256))
        throw Unsupported(str_cat("launch_mamba1_decode: d_state=", p.N, " unsupported (1..256)"));
    MAMBART_CHECK_ARG(p.ld_xdbl >= p.R + 2 * p.N && p.ld_z >= p.E,
                      "launch_mamba1_decode: bad strides");
    MAMBART_CHECK_ARG(p.x && p.xdbl && p.dt_proj.data && p.z && p.A && p.D && p.dt_bias && p.ssm_state &&
                          p.y,
                      "launch_mamba1_decode: null pointer");
    MAMBART_CHECK_ARG(p.B <= 65535, "launch_mamba1_decode: batch ", p.B, " too large");
    if (p.B == 0) return;
    int g = 1;
    while (g < p.N && g < 32) g <<= 1;
    const int spl = int(ceil_div(p.N, g));
    const int64_t per_block = int64_t(kM1Warps) * (32 / g);
    const dim3 grid(unsigned(ceil_div(p.E, per_block)), unsigned(p.B));
    switch (p.dt_proj.dtype) {
        case DType::F32: m1_dispatch<float>(p, g, spl, grid, s); break;
        case DType::F16: m1_dispatch<__half>(p, g, spl, grid, s); break;
        case DType::BF16: m1_dispatch<__nv_bfloat16>(p, g, spl, grid, s); break;
        default: throw Unsupported("launch_mamba1_decode: dt_proj weight dtype unsupported");
    }
    check_launch("mamba1_decode_kernel", s);
}

void launch_mamba2_decode(const Mamba2DecodeParams& in, int* counters, cudaStream_t s) {
    const ConvParams& c = in.conv;
    const SsdParams& q = in.ssd;
    MAMBART_CHECK_ARG(c.L == 1 && q.L == 1 && c.B == q.B && c.C == q.H * q.P + 2 * q.G * q.N,
                      "launch_mamba2_decode: conv and ssd params disagree (L=", c.L, "/", q.L,
                      " B=", c.B, "/", q.B, " C=", c.C, ")");
    const M2Args p{c.x,     c.ld_x,      q.dt,        q.ld_dt,  c.conv_state, c.weight,
                   c.bias,  c.W,         q.z,         q.ld_z,   q.A,          q.D,
                   q.dt_bias, q.dt_min,  q.dt_max,    q.ssm_state, q.y,       counters,
                   q.B,     q.H,         q.P,         q.G,      q.N};
    MAMBART_CHECK_ARG(p.B >= 0 && p.H > 0 && p.G > 0 && p.P >= 1,
                      "launch_mamba2_decode: bad sizes B=", p.B, " H=", p.H, " G=", p.G, " P=", p.P);
    MAMBART_CHECK_ARG(p.H % p.G == 0, "launch_mamba2_decode: nheads=", p.H,
                      " is not a multiple of ngroups=", p.G);
    if (!(p.N >= 1 && p.N <= 256))
        throw Unsupported(str_cat("launch_mamba2_decode: d_state=", p.N, " unsupported (1..256)"));
    if (!(p.W >= 1 && p.W <= kConvMaxWidth))
        throw Unsupported(str_cat("launch_mamba2_decode: d_conv=", p.W, " unsupported"));
    MAMBART_CHECK_ARG(p.ld_xbc >= p.H * p.P + 2 * p.G * p.N && p.ld_dt >= p.H &&
                          (!p.z || p.ld_z >= p.H * p.P),
                      "launch_mamba2_decode: bad strides");
    MAMBART_CHECK_ARG(p.xbc && p.dt && p.conv_state && p.conv_w && p.A && p.D && p.dt_bias &&
                          p.ssm_state && p.y && p.counters,
                      "launch_mamba2_decode: null pointer");
    MAMBART_CHECK_ARG(p.B * p.G <= kDecodeCounters && p.B <= 65535 && p.H <= 0x7fffffff,
                      "launch_mamba2_decode: batch ", p.B, " x ngroups ", p.G, " too large");
    if (p.B == 0) return;
    const dim3 grid(unsigned(p.H), unsigned(p.B), unsigned(ceil_div(p.P, kM2Warps)));
    const size_t smem = size_t(2 * p.N) * sizeof(float);
    const int threads = kM2Warps * 32;
    const int spl = int(ceil_div(p.N, 32));
    const dim3 block(threads);
    if (spl == 1)
        launch_pdl(mamba2_decode_kernel<1>, grid, block, smem, s, p);
    else if (spl == 2)
        launch_pdl(mamba2_decode_kernel<2>, grid, block, smem, s, p);
    else if (spl <= 4)
        launch_pdl(mamba2_decode_kernel<4>, grid, block, smem, s, p);
    else
        launch_pdl(mamba2_decode_kernel<8>, grid, block, smem, s, p);
    check_launch("mamba2_decode_kernel", s);
}

}  // namespace cuda
}  // namespace mambart
