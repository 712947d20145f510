// cuda/sampling.cu: next-token sampling on the device, with the semantics of mambart::Sampler
// (cpp/sampling.h, the reference) given the same uniform draw:
//   v_i = logit_i, repetition penalty on seen ids (v < 0 ? v·rp : v / rp);
//   greedy (T = 0): argmax v, lowest id on ties;
//   else s_i = v_i · (1/T); top-k keeps the k largest (s desc, id asc); p_i = exp(s_i − max s);
//   top-p keeps the shortest prefix in (p desc, id asc) order whose sum reaches top_p · Σp;
//   min-p keeps p_i >= min_p · max p; the draw walks the kept tokens in the reference's order
//   ((p desc, id asc) when top-p is on, else (s desc, id asc) when top-k is on, else id order)
//   and takes the first whose running sum exceeds u · Σ kept p, u = uniform(seed, stream,
//   counter) from the row's entry of `rng`. A row with a NaN or infinite logit gets id -1.
//   Degenerate (T > 0 but 1/T or max s not finite): greedy on v, as the reference does.
//
// Grid: (B); block: 1024 threads, one row per block, striding over V (logits stay in global
// memory / L2). Each "k-th element" question is answered by a radix descent over a 64-bit key
// (order value in the high word, inverted id in the low word, so keys are distinct) with 8-bit
// digits: a 256-bucket histogram of weights (counts or probabilities, fp64) per level.
// Preconditions: 1 <= V < 2^31; logits finite.
#include "common.cuh"
#include "kernels.h"

namespace mambart {
namespace cuda {
namespace {

constexpr int kThreads = 1024;

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// Same bits as mambart::uniform_draw.
__device__ __forceinline__ double uniform_draw(uint64_t seed, uint64_t stream, uint64_t counter) {
    const uint64_t h = splitmix64(splitmix64(splitmix64(seed) ^ stream) ^ counter);
    return double(h >> 11) * (1.0 / 9007199254740992.0);
}

// Order-preserving map of a float to uint32 (larger float -> larger key).
__device__ __forceinline__ uint32_t ordered(float f) {
    const uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ uint64_t make_key(uint32_t hi, int64_t id) {
    return (uint64_t(hi) << 32) | uint64_t(~uint32_t(id));
}

struct Row {
    const float* logits;
    const uint8_t* seen;
    float rp, inv_t;
    __device__ float value(int64_t i) const {  // penalised logit
        float v = logits[i];
        if (seen && rp != 1.0f && seen[i]) v = v < 0.0f ? v * rp : v / rp;
        return v;
    }
    // s = v / T, rounded on its own: __fmul_rn is never contracted into an FMA with the
    // `s - max s` that follows (which would give the product's rounding error, up to 1e31 for
    // s near 2.5e38 at T = 1e-38, in place of 0 for the largest s, and exp of it 0 or inf).
    __device__ float scaled(int64_t i) const { return __fmul_rn(value(i), inv_t); }
};

struct Shared {
    double hist[256];
    double red_d[32];
    float red_f[32];
    int64_t red_i[32];
    uint64_t prefix;
    double above;
    int found;
};

__device__ double block_sum_d(double v, Shared& sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sh.red_d[threadIdx.x >> 5] = v;
    __syncthreads();
    double t = threadIdx.x < (blockDim.x >> 5) ? sh.red_d[threadIdx.x] : 0.0;
    if (threadIdx.x < 32)
        for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    __syncthreads();
    if (threadIdx.x == 0) sh.red_d[0] = t;
    __syncthreads();
    const double r = sh.red_d[0];
    __syncthreads();
    return r;
}

// The largest value(i) over i in [0, V), the lowest i among equals, reduced over the block:
// every thread gets it in *best and *id. value(i) -> float; a NaN never wins (all NaN: *id = V).
// Every thread of the block must call it (it synchronises).
template <class F>
__device__ void block_argmax(const F& value, int64_t V, Shared& sh, float* best, int64_t* id) {
    float b = -INFINITY;
    int64_t bi = V;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
        const float v = value(i);
        if (v > b || (v == b && i < bi)) {
            b = v;
            bi = i;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffffu, b, o);
        const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ob > b || (ob == b && oi < bi)) {
            b = ob;
            bi = oi;
        }
    }
    __syncthreads();  // sh.red_* may still be read by an earlier reduction
    if ((threadIdx.x & 31) == 0) {
        sh.red_f[threadIdx.x >> 5] = b;
        sh.red_i[threadIdx.x >> 5] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < int(blockDim.x >> 5); ++w) {
            const float f = sh.red_f[w];
            if (f > sh.red_f[0] || (f == sh.red_f[0] && sh.red_i[w] < sh.red_i[0])) {
                sh.red_f[0] = f;
                sh.red_i[0] = sh.red_i[w];
            }
        }
    }
    __syncthreads();
    *best = sh.red_f[0];
    *id = sh.red_i[0];
    __syncthreads();  // before the next use of sh.red_*
}

// The largest member key K with W(>= K) >= thr (strict: > thr), where W(>= K) sums the weights
// of the members with key >= K; f(i, &key, &w) -> membership. Keys must be distinct. Returns
// false when no K qualifies.
template <class F>
__device__ bool weighted_select(const F& f, int64_t V, double thr, bool strict, Shared& sh,
                                uint64_t* key_out) {
    if (threadIdx.x == 0) {
        sh.prefix = 0;
        sh.above = 0.0;
        sh.found = 1;
    }
    for (int shift = 56; shift >= 0; shift -= 8) {
        __syncthreads();
        for (int b = threadIdx.x; b < 256; b += blockDim.x) sh.hist[b] = 0.0;
        __syncthreads();
        const uint64_t prefix = sh.prefix;
        const uint64_t hi_mask = shift == 56 ? 0 : ~((uint64_t(1) << (shift + 8)) - 1);
        for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
            uint64_t key;
            double w;
            if (f(i, &key, &w) && (key & hi_mask) == (prefix & hi_mask))
                atomicAdd(&sh.hist[(key >> shift) & 255], w);
        }
        __syncthreads();
        if (threadIdx.x == 0 && sh.found) {
            double acc = sh.above;
            int chosen = -1;
            for (int b = 255; b >= 0; --b) {
                const double h = sh.hist[b];
                if (h > 0.0 && (strict ? acc + h > thr : acc + h >= thr)) {
                    chosen = b;
                    break;
                }
                acc += h;
            }
            if (chosen < 0) {
                sh.found = 0;
            } else {
                sh.prefix = prefix | (uint64_t(chosen) << shift);
                sh.above = acc;
            }
        }
    }
    __syncthreads();
    const bool ok = sh.found != 0;
    *key_out = sh.prefix;
    __syncthreads();
    return ok;
}

__global__ void __launch_bounds__(kThreads) sample_kernel(SampleParams p) {
    __shared__ Shared sh;
    const int64_t r = blockIdx.x, V = p.V;
    Row row{p.logits + r * p.ld, p.seen ? p.seen + r * V : nullptr, p.repetition_penalty,
            p.temperature > 0.0f ? 1.0f / p.temperature : 0.0f};
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    // The maximum of v (greedy) or s = v / T, with the lowest id among equals. A row with a
    // NaN or infinite logit gets -1 (uniform across the block: every thread reaches the or).
    int bad = 0;
    float mx;
    int64_t chosen;
    block_argmax(
        [&](int64_t i) {
            bad |= !isfinite(row.logits[i]);
            return p.temperature > 0.0f ? row.scaled(i) : row.value(i);
        },
        V, sh, &mx, &chosen);
    if (__syncthreads_or(bad)) {
        if (threadIdx.x == 0) p.out[r] = -1;
        return;
    }

    // The scaled distribution is degenerate (1/T or max s overflowed): greedy on v, the T -> 0
    // limit, as mambart::Sampler does. Uniform across the block (mx is the block's).
    const bool degenerate = p.temperature > 0.0f && (!isfinite(row.inv_t) || !isfinite(mx));
    if (degenerate) {
        float best_v;
        block_argmax([&](int64_t i) { return row.value(i); }, V, sh, &best_v, &chosen);
    }

    if (p.temperature > 0.0f && !degenerate) {
        const bool topk = p.top_k > 0 && p.top_k < V;
        const bool topp = p.top_p < 1.0f;
        const bool minp = p.min_p > 0.0f;
        // top-k: the key of the k-th largest s.
        uint64_t kth = 0;
        auto s_of = [&](int64_t i) { return row.scaled(i); };
        if (topk) {
            auto f = [&](int64_t i, uint64_t* key, double* w) {
                *key = make_key(ordered(s_of(i)), i);
                *w = 1.0;
                return true;
            };
            weighted_select(f, V, double(p.top_k), false, sh, &kth);
        }
        auto in_k = [&](int64_t i, float s) { return !topk || make_key(ordered(s), i) >= kth; };
        // total over the top-k set
        double part = 0.0;
        for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
            const float s = s_of(i);
            if (in_k(i, s)) part += double(expf(s - mx));
        }
        const double total_k = block_sum_d(part, sh);
        // top-p: the key (p desc, id asc) of the last kept token.
        uint64_t pcut = 0;
        if (topp) {
            auto f = [&](int64_t i, uint64_t* key, double* w) {
                const float s = s_of(i);
                if (!in_k(i, s)) return false;
                const float pr = expf(s - mx);
                *key = make_key(__float_as_uint(pr), i);
                *w = double(pr);
                return true;
            };
            if (!weighted_select(f, V, double(p.top_p) * total_k, false, sh, &pcut))
                pcut = 0;  // rounding: keep everything
        }
        const float thr = p.min_p * 1.0f;  // max p is exp(0) = 1
        auto kept = [&](int64_t i, float* pr_out) {
            const float s = s_of(i);
            if (!in_k(i, s)) return false;
            const float pr = expf(s - mx);
            if (topp && make_key(__float_as_uint(pr), i) < pcut) return false;
            if (minp && !(pr >= thr)) return false;
            *pr_out = pr;
            return true;
        };
        double part2 = 0.0;
        for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
            float pr;
            if (kept(i, &pr)) part2 += double(pr);
        }
        const double total = block_sum_d(part2, sh);
        const uint64_t* rng = p.rng + 3 * r;
        const double target = uniform_draw(rng[0], rng[1], rng[2]) * total;
        auto draw_key = [&](int64_t i, float s, float pr) {
            if (topp) return make_key(__float_as_uint(pr), i);
            if (topk) return make_key(ordered(s), i);
            return make_key(0, i);
        };
        auto f = [&](int64_t i, uint64_t* key, double* w) {
            float pr;
            if (!kept(i, &pr)) return false;
            *key = draw_key(i, s_of(i), pr);
            *w = double(pr);
            return true;
        };
        uint64_t key;
        if (weighted_select(f, V, target, true, sh, &key)) {
            chosen = int64_t(~uint32_t(key & 0xffffffffu));
        } else {
            // u · total at the very top: the last kept token in draw order (smallest key).
            uint64_t mn = ~uint64_t(0);
            for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
                uint64_t k2;
                double w;
                if (f(i, &k2, &w) && k2 < mn) mn = k2;
            }
            for (int o = 16; o > 0; o >>= 1) {
                const uint64_t om = __shfl_xor_sync(0xffffffffu, mn, o);
                mn = om < mn ? om : mn;
            }
            __syncthreads();
            if (lane == 0) sh.red_i[warp] = int64_t(mn);
            __syncthreads();
            if (threadIdx.x == 0) {
                uint64_t m = uint64_t(sh.red_i[0]);
                for (int w = 1; w < int(blockDim.x >> 5); ++w)
                    m = uint64_t(sh.red_i[w]) < m ? uint64_t(sh.red_i[w]) : m;
                sh.prefix = m;
            }
            __syncthreads();
            chosen = int64_t(~uint32_t(sh.prefix & 0xffffffffu));
        }
    }
    if (threadIdx.x == 0) {
        p.out[r] = int32_t(chosen);
        if (p.seen) p.seen[r * V + chosen] = 1;
    }
}

}  // namespace

void launch_sample(const SampleParams& p, cudaStream_t s) {
    MAMBART_CHECK_ARG(p.B >= 0 && p.V >= 1 && p.V < 0x7fffffff && p.ld >= p.V,
                      "launch_sample: bad sizes B=", p.B, " V=", p.V, " ld=", p.ld);
    MAMBART_CHECK_ARG(p.logits && p.out && p.rng, "launch_sample: null pointer");
    MAMBART_CHECK_ARG(p.temperature >= 0.0f && p.top_k >= 0 && p.top_p > 0.0f && p.top_p <= 1.0f &&
                          p.min_p >= 0.0f && p.min_p <= 1.0f && p.repetition_penalty > 0.0f,
                      "launch_sample: invalid sampling options");
    MAMBART_CHECK_ARG(p.repetition_penalty == 1.0f || p.seen,
                      "launch_sample: repetition_penalty needs the seen mask");
    MAMBART_CHECK_ARG(p.B <= 0x7fffffff, "launch_sample: batch too large");
    if (p.B == 0) return;
    sample_kernel<<<unsigned(p.B), kThreads, 0, s>>>(p);
    check_launch("sample_kernel", s);
}

}  // namespace cuda
}  // namespace mambart
