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
//   Grid: (H, B, ceil(P / R)); block: 8 warps, warp w owns rows p = R blockIdx.z + w + 8 r
//   (r < R / 8), lane l the states n = V l + 32 V i + k (k < V: one V-wide access). R = 8 (a row
//   a warp); with option cuda_m2_decode_wide, 64 where that still leaves 2 blocks per SM
//   (batched decode: the per-block work below amortised over 8 rows a warp); V = 4 (or 2)
//   where N is a multiple of 128 (64) and the state is aligned for it, else 1. A thread loads
//   its state rows first (all in flight together), then the block computes the conv of its R x
//   channels (and rolls their conv state: no other block reads them) and of its group's 2N B/C
//   channels into shared memory. The B/C conv states are shared by the (H / G) ceil(P / R)
//   blocks of (b, g): each block counts itself in counters[b G + g] after its reads; the block
//   that counts last rolls those states and resets the counter to 0 (so every launch starts
//   from zero).
//   State storage S: fp32, or bf16 (option state_dtype, BF16_STATE_RULE: y from the fp32 step,
//   the state rounded to bf16 when stored).
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
    float* ssm_state;          // (B, H, P, N) inout, fp32 storage (or nullptr)
    uint16_t* ssm_state_bf16;  // (B, H, P, N) inout, bf16 storage (or nullptr; BF16_STATE_RULE)
    float* y;             // (B, H*P)
    int* counters;        // (B*G) device ints, zero between launches (the kernel restores them)
    int64_t B, H, P, G, N;
};

// A lane's VEC consecutive state elements: one 4 / 8 / 16-byte access for S = float or bf16.
template <typename S, int VEC>
__device__ __forceinline__ void load_state(const S* p, float (&v)[VEC]) {
    if constexpr (sizeof(S) == 4 && VEC == 4) {
        const float4 r = *reinterpret_cast<const float4*>(p);
        v[0] = r.x; v[1] = r.y; v[2] = r.z; v[3] = r.w;
    } else if constexpr (sizeof(S) == 4 && VEC == 2) {
        const float2 r = *reinterpret_cast<const float2*>(p);
        v[0] = r.x; v[1] = r.y;
    } else if constexpr (sizeof(S) == 2 && VEC == 4) {
        const uint2 r = *reinterpret_cast<const uint2*>(p);
        v[0] = __uint_as_float(r.x << 16); v[1] = __uint_as_float(r.x & 0xffff0000u);
        v[2] = __uint_as_float(r.y << 16); v[3] = __uint_as_float(r.y & 0xffff0000u);
    } else if constexpr (sizeof(S) == 2 && VEC == 2) {
        const uint32_t r = *reinterpret_cast<const uint32_t*>(p);
        v[0] = __uint_as_float(r << 16); v[1] = __uint_as_float(r & 0xffff0000u);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] = to_f32(p[k]);
    }
}
template <typename S, int VEC>
__device__ __forceinline__ void store_state(S* p, const float (&v)[VEC]) {
    if constexpr (sizeof(S) == 4 && VEC == 4) {
        *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    } else if constexpr (sizeof(S) == 4 && VEC == 2) {
        *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
    } else if constexpr (sizeof(S) == 2 && VEC >= 2) {
        uint32_t u[VEC / 2];
#pragma unroll
        for (int k = 0; k < VEC / 2; ++k) {
            const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
            u[k] = *reinterpret_cast<const uint32_t*>(&h);
        }
        if constexpr (VEC == 4)
            *reinterpret_cast<uint2*>(p) = make_uint2(u[0], u[1]);
        else
            *reinterpret_cast<uint32_t*>(p) = u[0];
    } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) p[k] = from_f32<S>(v[k]);
    }
}

// Rows p = p0 + warp + 8 r (r < RPW) of head h, row b; lane l owns the states
// n = VEC l + 32 VEC i + k (i < SPL, k < VEC): one VEC-wide access per (r, i).
template <int RPW, int VEC, int SPL, typename S>
__global__ void __launch_bounds__(kM2Warps * 32) mamba2_decode_kernel(M2Args p) {
    extern __shared__ float smem[];
    float* Bs = smem;         // (N) post-conv B of the group
    float* Cs = Bs + p.N;     // (N) post-conv C of the group
    __shared__ float xs[kM2Warps * RPW];  // post-conv x of the block's rows
    __shared__ float dls[2];
    __shared__ int last;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t h = blockIdx.x, b = blockIdx.y, H = p.H, P = p.P, N = p.N, G = p.G, W = p.W;
    const int64_t g = h / (H / G), E = H * P, C = E + 2 * G * N;
    const int64_t p0 = int64_t(blockIdx.z) * kM2Warps * RPW;
    const float* xin = p.xbc + b * p.ld_xbc;
    float* cst = p.conv_state + b * C * W;
    S* const state = state_ptr<S>(p) + (b * H + h) * P * N;  // (P, N) of (B, H, P, N)
    pdl_wait();  // launched with launch_pdl (see common.cuh)
    pdl_trigger();
    // The state rows first (all of a lane's loads in flight together), then the conv and δ.
    float s[RPW][SPL][VEC];
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        const int64_t pp = p0 + warp + kM2Warps * r;
#pragma unroll
        for (int i = 0; i < SPL; ++i) {
            const int64_t n = int64_t(VEC) * lane + 32 * VEC * i;
            if (pp < P && n < N)
                load_state<S, VEC>(state + pp * N + n, s[r][i]);
            else
#pragma unroll
                for (int k = 0; k < VEC; ++k) s[r][i][k] = 0.0f;
        }
    }
    float zg[RPW];  // silu(z) of row r, loaded by lane r
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        const int64_t pp = p0 + warp + kM2Warps * r;
        zg[r] = (p.z && lane == r && pp < P) ? p.z[b * p.ld_z + h * P + pp] : 0.0f;
    }
    for (int64_t i = threadIdx.x; i < 2 * N; i += blockDim.x) {
        const int64_t c = i < N ? E + g * N + i : E + G * N + g * N + (i - N);
        const float v = conv_step(cst + c * W, p.conv_w + c * W, p.conv_b ? p.conv_b[c] : 0.0f,
                                  xin[c], W, false);
        (i < N ? Bs[i] : Cs[i - N]) = v;
    }
    if (threadIdx.x >= 64 && threadIdx.x < 64 + kM2Warps * RPW) {
        const int j = threadIdx.x - 64;
        const int64_t pp = p0 + j;
        if (pp < P) {
            const int64_t c = h * P + pp;
            xs[j] = conv_step(cst + c * W, p.conv_w + c * W, p.conv_b ? p.conv_b[c] : 0.0f,
                              xin[c], W, true);
        }
    }
    if (threadIdx.x == 32) {
        const float d = fminf(fmaxf(softplus_f(p.dt[b * p.ld_dt + h] + p.dt_bias[h]), p.dt_min),
                              p.dt_max);
        dls[0] = d;
        dls[1] = expf(d * p.A[h]);
    }
    __syncthreads();
    const float delta = dls[0], dA = dls[1], Dv = p.D[h];
    float Bv[SPL][VEC], Cv[SPL][VEC];
#pragma unroll
    for (int i = 0; i < SPL; ++i)
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const int64_t n = int64_t(VEC) * lane + 32 * VEC * i + k;
            Bv[i][k] = n < N ? Bs[n] : 0.0f;
            Cv[i][k] = n < N ? Cs[n] : 0.0f;
        }
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        const int64_t pp = p0 + warp + kM2Warps * r;
        if (pp >= P) break;  // warp-uniform
        const float xv = xs[warp + kM2Warps * r], dx = delta * xv;
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < SPL; ++i)
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const float v = s[r][i][k] * dA + dx * Bv[i][k];
                s[r][i][k] = v;
                acc += v * Cv[i][k];
            }
#pragma unroll
        for (int i = 0; i < SPL; ++i) {
            const int64_t n = int64_t(VEC) * lane + 32 * VEC * i;
            if (n < N) store_state<S, VEC>(state + pp * N + n, s[r][i]);  // rounded for bf16
        }
        acc = warp_sum(acc);
        const float zr = __shfl_sync(0xffffffffu, zg[r], r);
        if (lane == 0) {
            float yv = acc + Dv * xv;
            if (p.z) yv *= silu_f(zr);
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

template <int RPW, typename S>
void m2_dispatch(const M2Args& p, int vec, int spl, dim3 grid, size_t smem, cudaStream_t s) {
    const dim3 block(kM2Warps * 32);
    if (vec == 4 && spl == 1)
        launch_pdl(mamba2_decode_kernel<RPW, 4, 1, S>, grid, block, smem, s, p);
    else if (vec == 4)
        launch_pdl(mamba2_decode_kernel<RPW, 4, 2, S>, grid, block, smem, s, p);
    else if (vec == 2)
        launch_pdl(mamba2_decode_kernel<RPW, 2, 1, S>, grid, block, smem, s, p);
    else if (spl == 1)
        launch_pdl(mamba2_decode_kernel<RPW, 1, 1, S>, grid, block, smem, s, p);
    else if (spl == 2)
        launch_pdl(mamba2_decode_kernel<RPW, 1, 2, S>, grid, block, smem, s, p);
    else if (spl <= 4)
        launch_pdl(mamba2_decode_kernel<RPW, 1, 4, S>, grid, block, smem, s, p);
    else
        launch_pdl(mamba2_decode_kernel<RPW, 1, 8, S>, grid, block, smem, s, p);
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

void launch_mamba2_decode(const Mamba2DecodeParams& in, bool wide_ok, int* counters,
                          cudaStream_t s) {
    const ConvParams& c = in.conv;
    const SsdParams& q = in.ssd;
    MAMBART_CHECK_ARG(c.L == 1 && q.L == 1 && c.B == q.B && c.C == q.H * q.P + 2 * q.G * q.N,
                      "launch_mamba2_decode: conv and ssd params disagree (L=", c.L, "/", q.L,
                      " B=", c.B, "/", q.B, " C=", c.C, ")");
    const M2Args p{c.x,       c.ld_x,   q.dt,     q.ld_dt,     c.conv_state,     c.weight,
                   c.bias,    c.W,      q.z,      q.ld_z,      q.A,              q.D,
                   q.dt_bias, q.dt_min, q.dt_max, q.ssm_state, q.ssm_state_bf16, q.y,
                   counters,  q.B,      q.H,      q.P,         q.G,              q.N};
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
    const bool bf16 = p.ssm_state_bf16 != nullptr;  // option state_dtype
    MAMBART_CHECK_ARG(p.xbc && p.dt && p.conv_state && p.conv_w && p.A && p.D && p.dt_bias &&
                          (bf16 != (p.ssm_state != nullptr)) && !q.state_trace &&
                          !q.state_trace_bf16 && p.y && p.counters,
                      "launch_mamba2_decode: null pointer, both state storages, or a trace");
    MAMBART_CHECK_ARG(p.B * p.G <= kDecodeCounters && p.B <= 65535 && p.H <= 0x7fffffff,
                      "launch_mamba2_decode: batch ", p.B, " x ngroups ", p.G, " too large");
    if (p.B == 0) return;
    // Rows a block: 8 (a row a warp) while that leaves too few blocks to fill the GPU (batch 1:
    // H * P / 8 blocks), else 64 (8 a warp: the group's B/C conv and the state loads of a
    // thread amortised over 8 rows; batched decode).
    static const int sms = device_attr(cudaDevAttrMultiProcessorCount);
    const bool wide = wide_ok && p.H * p.B * ceil_div(p.P, kM2Warps * 8) >= 2 * int64_t(sms);
    const int64_t rows = wide ? kM2Warps * 8 : kM2Warps;
    const dim3 grid(unsigned(p.H), unsigned(p.B), unsigned(ceil_div(p.P, rows)));
    const size_t smem = size_t(2 * p.N) * sizeof(float);
    // Vector accesses of 4 (or 2) consecutive states a lane when every row allows them.
    const void* base = bf16 ? static_cast<const void*>(p.ssm_state_bf16) : p.ssm_state;
    const size_t esz = bf16 ? 2 : 4;
    const auto fits = [&](int v) {
        return p.N % (32 * v) == 0 && reinterpret_cast<uintptr_t>(base) % (v * esz) == 0;
    };
    const int vec = fits(4) ? 4 : fits(2) ? 2 : 1;
    const int spl = int(ceil_div(p.N, 32 * vec));
    if (wide && bf16)
        m2_dispatch<8, __nv_bfloat16>(p, vec, spl, grid, smem, s);
    else if (wide)
        m2_dispatch<8, float>(p, vec, spl, grid, smem, s);
    else if (bf16)
        m2_dispatch<1, __nv_bfloat16>(p, vec, spl, grid, smem, s);
    else
        m2_dispatch<1, float>(p, vec, spl, grid, smem, s);
    check_launch("mamba2_decode_kernel", s);
}

}  // namespace cuda
}  // namespace mambart
