#include "cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/pool.h"
#include "cpu/vec.h"
#include "error.h"

namespace mambart {
namespace cpu {
namespace {

constexpr int64_t kKeyTile = 64;

// Rotate-half RoPE of one head vector x (hd) at position `n` on its first rd dims:
// x[i], x[i + rd/2] <- x[i] cos - x[i + rd/2] sin, x[i + rd/2] cos + x[i] sin, angle n·θ^(-2i/rd).
void rope(float* x, int64_t rd, const float* cosv, const float* sinv) {
    const int64_t half = rd / 2;
    for (int64_t i = 0; i < half; ++i) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cosv[i] - b * sinv[i];
        x[i + half] = b * cosv[i] + a * sinv[i];
    }
}

// Σ a[e] b[e], 8 lanes at a time (independent partial sums), then the tail.
inline float dot(const float* a, const float* b, int64_t n) {
    f8 acc = {};
    int64_t e = 0;
    for (; e + 8 <= n; e += 8) acc += load8(a + e) * load8(b + e);
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; e < n; ++e) s += a[e] * b[e];
    return s;
}

}  // namespace

void attention(const AttentionParams& p) {
    const int64_t L = p.L, Hq = p.Hq, Hkv = p.Hkv, hd = p.hd, rd = p.rotary_dim;
    const int64_t group = Hq / Hkv, kv_row = Hkv * hd;
    MAMBART_CHECK_ARG(Hq % Hkv == 0 && rd % 2 == 0 && rd <= hd, "attention: Hq=", Hq, " Hkv=",
                      Hkv, " hd=", hd, " rotary_dim=", rd);
    std::vector<int64_t> n0(size_t(p.B));
    for (int64_t b = 0; b < p.B; ++b) {
        const float pv = p.pos[b * p.pos_stride];
        n0[size_t(b)] = int64_t(pv);
        if (!(pv >= 0.0f) || n0[size_t(b)] + L > p.max_ctx)
            throw InvalidArgument(str_cat("attention: the KV cache holds max_context = ", p.max_ctx,
                                          " tokens; row ", b, " has ", int64_t(pv),
                                          " and would need ", int64_t(pv) + L,
                                          " (raise max_context in the attention layers' config)"));
    }
    // RoPE and the cache append, token by token.
    std::vector<float> cosv(size_t(rd / 2 + 1)), sinv(size_t(rd / 2 + 1));
    for (int64_t b = 0; b < p.B; ++b) {
        float* kc = p.k_cache + b * p.cache_stride;
        float* vc = p.v_cache + b * p.cache_stride;
        for (int64_t t = 0; t < L; ++t) {
            const int64_t n = n0[size_t(b)] + t;
            float* row = p.qkv + (b * L + t) * p.ld_qkv;
            float* k = row + Hq * hd;
            const float* v = k + kv_row;
            if (rd > 0) {
                for (int64_t i = 0; i < rd / 2; ++i) {
                    // inv_freq in fp32 as the references compute it; the angle in double
                    const float inv = 1.0f / std::pow(p.rope_theta, float(2 * i) / float(rd));
                    const double ang = double(n) * double(inv);
                    cosv[size_t(i)] = float(std::cos(ang));
                    sinv[size_t(i)] = float(std::sin(ang));
                }
                for (int64_t h = 0; h < Hq; ++h) rope(row + h * hd, rd, cosv.data(), sinv.data());
                for (int64_t h = 0; h < Hkv; ++h) rope(k + h * hd, rd, cosv.data(), sinv.data());
            }
            std::memcpy(kc + n * kv_row, k, size_t(kv_row) * sizeof(float));
            std::memcpy(vc + n * kv_row, v, size_t(kv_row) * sizeof(float));
        }
    }
    // Softmax over the keys of each (row, token, q head), online over key tiles.
    parallel_for(p.B * L * Hq, 1, [&](int64_t i0, int64_t i1) {
        std::vector<float> acc(static_cast<size_t>(hd));
        float sc[kKeyTile];
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t h = i % Hq, bt = i / Hq, b = bt / L, t = bt % L;
            const int64_t j = h / group, n = n0[size_t(b)] + t;
            const int64_t lo = p.window > 0 ? std::max<int64_t>(0, n - p.window + 1) : 0;
            const float* q = p.qkv + bt * p.ld_qkv + h * hd;
            const float* kc = p.k_cache + b * p.cache_stride + j * hd;
            const float* vc = p.v_cache + b * p.cache_stride + j * hd;
            float m = -INFINITY, l = 0.0f;
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int64_t s0 = lo; s0 <= n; s0 += kKeyTile) {
                const int64_t s1 = std::min(n + 1, s0 + kKeyTile);
                float tile_max = -INFINITY;
                for (int64_t s = s0; s < s1; ++s) {
                    sc[s - s0] = dot(q, kc + s * kv_row, hd) * p.scale;
                    tile_max = std::max(tile_max, sc[s - s0]);
                }
                const float m_new = std::max(m, tile_max);
                const float corr = std::exp(m - m_new);  // 0 on the first tile
                l *= corr;
                for (int64_t e = 0; e < hd; ++e) acc[size_t(e)] *= corr;
                for (int64_t s = s0; s < s1; ++s) {
                    const float w = std::exp(sc[s - s0] - m_new);
                    l += w;
                    const float* v = vc + s * kv_row;
                    for (int64_t e = 0; e < hd; ++e) acc[size_t(e)] += w * v[e];
                }
                m = m_new;
            }
            float* o = p.o + (bt * Hq + h) * hd;
            const float inv_l = 1.0f / l;
            for (int64_t e = 0; e < hd; ++e) o[e] = acc[size_t(e)] * inv_l;
        }
    });
    for (int64_t b = 0; b < p.B; ++b) p.pos[b * p.pos_stride] = float(n0[size_t(b)] + L);
}

}  // namespace cpu
}  // namespace mambart
