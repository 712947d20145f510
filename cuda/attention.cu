// cuda/attention.cu: causal MHA / GQA with a per-sequence KV cache (AttentionParams,
// cpp/op_params.h, gives the formula). Per row b, n0 = pos[b] (read on the device, so a
// recorded decode graph replays at the right position); token t sits at n = n0 + t.
//
// attn_rope_append_kernel: RoPE (rotate-half, first rotary_dim dims, angle n·θ^(-2i/rd)) on q
//   and k in place, then k and v into the caches at n.
//   Grid: (L, B); block: 128 threads striding over the (head, pair) and (kv head, dim) items.
//   A token with n >= max_ctx writes nothing (callers refuse such lengths up front).
// attn_prefill_kernel: o = softmax(scale q kᵀ) v over keys [lo, n] (lo = n - window + 1 with a
//   window), one warp per query token, online softmax over key tiles of kt keys staged in
//   shared memory (K padded to hd + 1 floats per key against bank conflicts).
//   Grid: (ceil(L / 4), Hq, B); block: 128 (4 warps = 4 consecutive tokens of one head).
//   Lane j scores key j of a tile (a full dot product over hd, q from shared memory); then each
//   lane accumulates the dims d = lane + 32 i (i < ceil(hd / 32) <= 8) of p · V.
//   Shared memory: kt (2 hd + 1) + 4 hd floats, kt = 32 (hd <= 128) or 16 (hd <= 256).
// attn_decode_split_kernel (L == 1, split-K over the cache): block s of S takes the keys
//   [lo + s c, lo + (s + 1) c), c = ceil((n + 1 - lo) / S); its 4 warps take every 4th key, a
//   warp scoring one key at a time (lanes split hd, a warp sum), each with its own running
//   (m, l, acc); the warps merge in shared memory and the block writes its partial
//   (m, l, acc[hd]) to partial[b, h, s].
//   Grid: (S, Hq, B); block: 128.
// attn_combine_kernel: o = Σ_s e^(m_s - M) acc_s / Σ_s e^(m_s - M) l_s, M = max_s m_s.
//   Grid: (Hq, B); block: 128 threads striding over hd.
// attn_advance_kernel: pos[b] = n0 + L. Grid: 1; block: B threads (strided).
// Preconditions (launch_attention checks): hd <= 256, Hkv divides Hq, rotary_dim even <= hd.
#include "common.cuh"
#include "kernels.h"

namespace mambart {
namespace cuda {
namespace {

constexpr int kMaxHd = 256;
constexpr int kDimsPerLane = kMaxHd / 32;  // 8
constexpr int kWarps = 4;

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ __forceinline__ int64_t row_pos(const AttentionParams& p, int64_t b) {
    return int64_t(p.pos[b * p.pos_stride]);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__global__ void attn_rope_append_kernel(AttentionParams p) {
    const int64_t t = blockIdx.x, b = blockIdx.y;
    const int64_t n = row_pos(p, b) + t;
    if (n >= p.max_ctx) return;
    const int64_t hd = p.hd, half = p.rotary_dim / 2, kv_row = p.Hkv * hd;
    float* row = p.qkv + (b * p.L + t) * p.ld_qkv;
    float* k = row + p.Hq * hd;
    const float* v = k + kv_row;
    if (half > 0) {
        // (head, pair) items: q heads then k heads
        for (int64_t it = threadIdx.x; it < (p.Hq + p.Hkv) * half; it += blockDim.x) {
            const int64_t h = it / half, i = it % half;
            float* x = h < p.Hq ? row + h * hd : k + (h - p.Hq) * hd;
            const float inv = 1.0f / powf(p.rope_theta, float(2 * i) / float(p.rotary_dim));
            const double ang = double(n) * double(inv);
            const float c = float(cos(ang)), s = float(sin(ang));
            const float a = x[i], bb = x[i + half];
            x[i] = a * c - bb * s;
            x[i + half] = bb * c + a * s;
        }
        __syncthreads();  // k rotated before it is copied
    }
    float* kc = p.k_cache + b * p.cache_stride + n * kv_row;
    float* vc = p.v_cache + b * p.cache_stride + n * kv_row;
    for (int64_t e = threadIdx.x; e < kv_row; e += blockDim.x) {
        kc[e] = k[e];
        vc[e] = v[e];
    }
}

__global__ void attn_prefill_kernel(AttentionParams p, int kt) {
    extern __shared__ float smem[];
    const int hd = int(p.hd), ks = hd + 1;
    float* Ks = smem;                  // (kt, hd + 1)
    float* Vs = Ks + kt * ks;          // (kt, hd)
    float* Qs = Vs + kt * hd;          // (kWarps, hd)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t b = blockIdx.z, h = blockIdx.y, t0 = int64_t(blockIdx.x) * kWarps;
    const int64_t j = h / (p.Hq / p.Hkv), kv_row = p.Hkv * hd;
    const int64_t n0 = row_pos(p, b);
    const int64_t t = t0 + warp;
    const bool active = t < p.L;
    const int64_t n = n0 + t;  // this warp's query position
    // the block's key range: [lo of its first token, n of its last token], inside the cache
    const int64_t n_last = imin(n0 + imin(t0 + kWarps, p.L) - 1, p.max_ctx - 1);
    const int64_t lo_first = p.window > 0 ? imax(0, n0 + t0 - p.window + 1) : 0;
    const int64_t lo = p.window > 0 ? imax(0, n - p.window + 1) : 0;
    if (active)
        for (int d = lane; d < hd; d += 32) Qs[warp * hd + d] = p.qkv[(b * p.L + t) * p.ld_qkv + h * hd + d];
    float acc[kDimsPerLane];
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) acc[i] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    const float* kc = p.k_cache + b * p.cache_stride + j * hd;
    const float* vc = p.v_cache + b * p.cache_stride + j * hd;
    for (int64_t s0 = lo_first; s0 <= n_last; s0 += kt) {
        const int cnt = int(imin(kt, n_last + 1 - s0));
        __syncthreads();  // the previous tile is consumed (and Qs written on the first pass)
        for (int e = threadIdx.x; e < cnt * hd; e += blockDim.x) {
            const int r = e / hd, d = e % hd;
            Ks[r * ks + d] = kc[(s0 + r) * kv_row + d];
            Vs[r * hd + d] = vc[(s0 + r) * kv_row + d];
        }
        __syncthreads();
        if (!active) continue;
        // lane r scores key s0 + r
        float sc = -INFINITY;
        const int64_t s = s0 + lane;
        if (lane < cnt && s <= n && s >= lo) {
            float dot = 0.0f;
            for (int d = 0; d < hd; ++d) dot += Qs[warp * hd + d] * Ks[lane * ks + d];
            sc = dot * p.scale;
        }
        const float tile_max = warp_max(sc);
        if (tile_max == -INFINITY) continue;  // no key of this tile is visible to this token
        const float m_new = fmaxf(m, tile_max);
        const float corr = __expf(m - m_new);
        const float pr = sc == -INFINITY ? 0.0f : __expf(sc - m_new);
        l = l * corr + warp_sum(pr);
#pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) acc[i] *= corr;
        for (int r = 0; r < cnt; ++r) {
            const float pj = __shfl_sync(0xffffffffu, pr, r);
            if (pj == 0.0f) continue;
#pragma unroll
            for (int i = 0; i < kDimsPerLane; ++i) {
                const int d = lane + 32 * i;
                if (d < hd) acc[i] += pj * Vs[r * hd + d];
            }
        }
        m = m_new;
    }
    if (!active) return;
    float* o = p.o + ((b * p.L + t) * p.Hq + h) * hd;
    const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < hd) o[d] = acc[i] * inv_l;
    }
}

__global__ void attn_decode_split_kernel(AttentionParams p, int S) {
    __shared__ float part_m[kWarps], part_l[kWarps];
    __shared__ float part_acc[kWarps][kMaxHd];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t b = blockIdx.z, h = blockIdx.y, sidx = blockIdx.x;
    const int hd = int(p.hd);
    const int64_t j = h / (p.Hq / p.Hkv), kv_row = p.Hkv * hd;
    const int64_t n = imin(row_pos(p, b), p.max_ctx - 1);  // L == 1: the token's position
    const int64_t lo = p.window > 0 ? imax(0, n - p.window + 1) : 0;
    const int64_t c = (n + 1 - lo + S - 1) / S;
    const int64_t k0 = lo + sidx * c, k1 = imin(n + 1, k0 + c);
    const float* q = p.qkv + b * p.ld_qkv + h * hd;
    float qr[kDimsPerLane], acc[kDimsPerLane];
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) {
        const int d = lane + 32 * i;
        qr[i] = d < hd ? q[d] : 0.0f;
        acc[i] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    const float* kc = p.k_cache + b * p.cache_stride + j * hd;
    const float* vc = p.v_cache + b * p.cache_stride + j * hd;
    for (int64_t s = k0 + warp; s < k1; s += kWarps) {
        const float* kr = kc + s * kv_row;
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) {
            const int d = lane + 32 * i;
            if (d < hd) dot += qr[i] * kr[d];
        }
        const float sc = warp_sum(dot) * p.scale;
        const float m_new = fmaxf(m, sc);
        const float corr = __expf(m - m_new), pr = __expf(sc - m_new);
        l = l * corr + pr;
        const float* vr = vc + s * kv_row;
#pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) {
            const int d = lane + 32 * i;
            acc[i] = acc[i] * corr + (d < hd ? pr * vr[d] : 0.0f);
        }
        m = m_new;
    }
    if (lane == 0) {
        part_m[warp] = m;
        part_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < hd) part_acc[warp][d] = acc[i];
    }
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, part_m[w]);
    float* out = p.partial + ((b * p.Hq + h) * S + sidx) * (hd + 2);
    float Lsum = 0.0f;
    for (int w = 0; w < kWarps; ++w)
        if (part_m[w] != -INFINITY) Lsum += __expf(part_m[w] - M) * part_l[w];
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float a = 0.0f;
        for (int w = 0; w < kWarps; ++w)
            if (part_m[w] != -INFINITY) a += __expf(part_m[w] - M) * part_acc[w][d];
        out[2 + d] = a;
    }
    if (threadIdx.x == 0) {
        out[0] = M;  // -inf: an empty split
        out[1] = Lsum;
    }
}

__global__ void attn_combine_kernel(AttentionParams p, int S) {
    const int64_t b = blockIdx.y, h = blockIdx.x;
    const int hd = int(p.hd);
    const float* part = p.partial + (b * p.Hq + h) * S * (hd + 2);
    float M = -INFINITY;
    for (int s = 0; s < S; ++s) M = fmaxf(M, part[s * (hd + 2)]);
    float Lsum = 0.0f;
    for (int s = 0; s < S; ++s) {
        const float ms = part[s * (hd + 2)];
        if (ms != -INFINITY) Lsum += __expf(ms - M) * part[s * (hd + 2) + 1];
    }
    const float inv = Lsum > 0.0f ? 1.0f / Lsum : 0.0f;
    float* o = p.o + (b * p.Hq + h) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float a = 0.0f;
        for (int s = 0; s < S; ++s) {
            const float ms = part[s * (hd + 2)];
            if (ms != -INFINITY) a += __expf(ms - M) * part[s * (hd + 2) + 2 + d];
        }
        o[d] = a * inv;
    }
}

__global__ void attn_advance_kernel(AttentionParams p) {
    for (int64_t b = threadIdx.x; b < p.B; b += blockDim.x)
        p.pos[b * p.pos_stride] = float(row_pos(p, b) + p.L);
}

}  // namespace

void launch_attention(const AttentionParams& p, cudaStream_t s) {
    MAMBART_CHECK_ARG(p.B >= 1 && p.L >= 1 && p.Hq >= 1 && p.Hkv >= 1 && p.Hq % p.Hkv == 0,
                      "launch_attention: B=", p.B, " L=", p.L, " Hq=", p.Hq, " Hkv=", p.Hkv,
                      " (Hkv must divide Hq)");
    MAMBART_CHECK_ARG(p.hd >= 1 && p.hd <= kMaxHd, "launch_attention: head_dim=", p.hd,
                      " unsupported (1..", kMaxHd, ")");
    MAMBART_CHECK_ARG(p.rotary_dim >= 0 && p.rotary_dim % 2 == 0 && p.rotary_dim <= p.hd,
                      "launch_attention: rotary_dim=", p.rotary_dim, " must be even and <= ",
                      p.hd);
    MAMBART_CHECK_ARG(p.ld_qkv >= (p.Hq + 2 * p.Hkv) * p.hd && p.max_ctx >= 1 &&
                          p.cache_stride >= p.max_ctx * p.Hkv * p.hd && p.window >= 0,
                      "launch_attention: ld_qkv=", p.ld_qkv, " cache_stride=", p.cache_stride,
                      " max_ctx=", p.max_ctx, " window=", p.window);
    MAMBART_CHECK_ARG(p.qkv && p.k_cache && p.v_cache && p.pos && p.o,
                      "launch_attention: null pointer");
    MAMBART_CHECK_ARG(p.L <= 65535 * int64_t(kWarps) && p.B <= 65535 && p.Hq <= 65535,
                      "launch_attention: grid too large (B=", p.B, " L=", p.L, ")");
    attn_rope_append_kernel<<<dim3(unsigned(p.L), unsigned(p.B)), 128, 0, s>>>(p);
    check_launch("attn_rope_append_kernel", s);
    // Split-K over the cache for single-token steps where there is scratch for it.
    const int S = int(std::min(p.partial ? p.max_splits : 0, kAttnMaxSplits));
    if (p.L == 1 && S >= 2) {
        attn_decode_split_kernel<<<dim3(unsigned(S), unsigned(p.Hq), unsigned(p.B)),
                                   kWarps * 32, 0, s>>>(p, S);
        check_launch("attn_decode_split_kernel", s);
        attn_combine_kernel<<<dim3(unsigned(p.Hq), unsigned(p.B)), 128, 0, s>>>(p, S);
        check_launch("attn_combine_kernel", s);
    } else {
        const int kt = p.hd <= 128 ? 32 : 16;
        const size_t smem = size_t(kt * (2 * p.hd + 1) + kWarps * p.hd) * sizeof(float);
        attn_prefill_kernel<<<dim3(unsigned(ceil_div(p.L, kWarps)), unsigned(p.Hq),
                                   unsigned(p.B)),
                              kWarps * 32, smem, s>>>(p, kt);
        check_launch("attn_prefill_kernel", s);
    }
    attn_advance_kernel<<<1, 256, 0, s>>>(p);
    check_launch("attn_advance_kernel", s);
}

}  // namespace cuda
}  // namespace mambart
