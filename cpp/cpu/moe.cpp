#include "cpu/moe.h"

#include <cmath>
#include <cstring>

#include "cpu/linear.h"
#include "cpu/pool.h"
#include "cpu/vec.h"
#include "error.h"

namespace mambart {
namespace cpu {

void moe_route_row(const float* logits, int64_t X, int64_t k, bool normalize, int32_t* ids,
                   float* weights) {
    // k passes of an argmax over the experts not yet taken (k <= X, both small).
    for (int64_t j = 0; j < k; ++j) {
        int64_t best = -1;
        for (int64_t e = 0; e < X; ++e) {
            bool taken = false;
            for (int64_t t = 0; t < j; ++t) taken = taken || ids[t] == e;
            if (taken) continue;
            if (best < 0 || logits[e] > logits[best]) best = e;  // strict: ties keep the lower id
        }
        ids[j] = int32_t(best);
    }
    const float m = logits[ids[0]];  // the largest logit
    float z = 0.0f;
    if (normalize) {
        for (int64_t j = 0; j < k; ++j) z += std::exp(logits[ids[j]] - m);
    } else {
        for (int64_t e = 0; e < X; ++e) z += std::exp(logits[e] - m);
    }
    for (int64_t j = 0; j < k; ++j) weights[j] = std::exp(logits[ids[j]] - m) / z;
}

void moe(const MoeParams& p) {
    const int64_t R = p.R, d = p.d, X = p.X, k = p.k, I = p.I;
    MAMBART_CHECK_ARG(R >= 0 && d > 0 && X > 0 && k >= 1 && k <= X && I > 0,
                      "moe: bad sizes R=", R, " d=", d, " X=", X, " k=", k, " I=", I);
    MAMBART_CHECK_ARG(p.w_in.rows == X && p.w_in.cols == 2 * I * d && p.w_out.rows == X &&
                          p.w_out.cols == d * I,
                      "moe: expert matrices (", p.w_in.rows, ", ", p.w_in.cols, ") / (",
                      p.w_out.rows, ", ", p.w_out.cols, ") do not match X=", X, " I=", I, " d=", d);
    MAMBART_CHECK_ARG(p.x && p.logits && p.route && p.h && p.xy && p.out, "moe: null pointer");
    // Routing: ids as int32 bits in the first k floats of each route row, weights after them.
    for (int64_t r = 0; r < R; ++r) {
        float* row = p.route + r * 2 * k;
        int32_t ids[kMoeMaxTopK];
        MAMBART_CHECK_ARG(k <= kMoeMaxTopK, "moe: k=", k, " > ", kMoeMaxTopK);
        moe_route_row(p.logits + r * X, X, k, p.normalize, ids, row + k);
        std::memcpy(row, ids, size_t(k) * sizeof(int32_t));
    }
    auto id_at = [&](int64_t r, int64_t j) {
        int32_t e;
        std::memcpy(&e, p.route + r * 2 * k + j, sizeof e);
        return int64_t(e);
    };
    const size_t es = dtype_size(p.w_in.dtype);
    float* xg = p.xy;          // (n, d) the rows routed to expert e
    float* yg = p.xy + R * d;  // (n, d) their expert outputs
    float* g = p.h;            // (n, I) gate
    float* u = p.h + R * I;    // (n, I) up, then the activated hidden
    for (int64_t e = 0; e < X; ++e) {
        int64_t n = 0;  // each row routes to an expert at most once: n <= R
        for (int64_t r = 0; r < R; ++r)
            for (int64_t j = 0; j < k; ++j)
                if (id_at(r, j) == e) std::memcpy(xg + (n++) * d, p.x + r * d, size_t(d) * 4);
        if (n == 0) continue;
        const char* win = static_cast<const char*>(p.w_in.data) + size_t(e) * 2 * I * d * es;
        const char* wout = static_cast<const char*>(p.w_out.data) + size_t(e) * d * I * es;
        linear(xg, d, n, d, win, p.w_in.dtype, I, nullptr, g, I);
        linear(xg, d, n, d, win + size_t(I) * d * es, p.w_in.dtype, I, nullptr, u, I);
        for (int64_t i = 0; i < n * I; ++i) u[i] *= silu1(g[i]);
        linear(u, I, n, I, wout, p.w_out.dtype, d, nullptr, yg, d);
        n = 0;
        for (int64_t r = 0; r < R; ++r)
            for (int64_t j = 0; j < k; ++j)
                if (id_at(r, j) == e) {
                    const float w = p.scale * p.route[r * 2 * k + k + j];
                    const float* y = yg + (n++) * d;
                    float* o = p.out + r * d;
                    for (int64_t c = 0; c < d; ++c) o[c] += w * y[c];
                }
    }
}

}  // namespace cpu
}  // namespace mambart
