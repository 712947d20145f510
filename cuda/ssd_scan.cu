// cuda/ssd_scan.cu: the Mamba-2 SSM over a sequence (prefill) or one token (decode), in its
// recurrent form, which equals the chunked SSD algorithm exactly in real arithmetic:
//
//   δ_t = clamp(softplus(dt[t, h] + dt_bias[h]), dt_min, dt_max)     (threshold 20)
//   s[h, p, n] <- exp(δ_t A[h]) s[h, p, n] + δ_t x[t, h, p] B[t, g(h), n]   (fp32 state)
//   y[t, h, p] = Σ_n C[t, g(h), n] s[h, p, n] + D[h] x[t, h, p]   (· silu(z[t, h, p]) if z)
//   g(h) = h / (H / G)  (grouped B and C)
//
// Grid: (H, B, row blocks); block: 8 warps. Warp w owns rows p = p0 + w + 8 r (r < RPW) of
// the head's state (p0 = 8 RPW blockIdx.z; the launcher uses RPW = 1, P / 8 row blocks),
// lane l owns states n = l + 32 i (i < SPL): the (P, N) state stays in registers for the whole
// sequence. Per group of kT tokens the block stages B, C (kT x N), x, silu(z) (kT x P), δ and
// exp(δA) in shared memory (at most 21 KB); each row's y is a warp reduction over n.
// With state_trace (speculative verification, issue 25) each token's state is also stored:
// trace[b, t, h, p, n] (coalesced over n).
// State storage S: float, or bf16 (ssm_state_bf16, option state_dtype): read as bf16, stepped in
// fp32, rounded to bf16 (nearest even) after every token (op_params.h BF16_STATE_RULE); the
// trace is then bf16 too.
// Preconditions: 1 <= P <= 128, 1 <= N <= 256, H % G == 0; ld_xbc >= H*P (B and C are
// separate pointers into the same rows); y does not alias the inputs.
#include "common.cuh"
#include "kernels.h"

namespace mambart {
namespace cuda {
namespace {

constexpr int kSsdWarps = 8;
constexpr int kT = 8;  // tokens staged per group

template <int RPW, int SPL, typename S>
__global__ void __launch_bounds__(kSsdWarps * 32) ssd_scan_kernel(SsdParams p) {
    extern __shared__ float smem[];
    const int64_t N = p.N, P = p.P, H = p.H;
    float* Bs = smem;            // (kT, N)
    float* Cs = Bs + kT * N;     // (kT, N)
    float* xs = Cs + kT * N;     // (kT, P)
    float* zs = xs + kT * P;     // (kT, P)  silu(z), when gated
    float* dls = zs + kT * P;    // (kT)     δ
    float* dAs = dls + kT;       // (kT)     exp(δ A)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t h = blockIdx.x, b = blockIdx.y;
    const int64_t g = h / (H / p.G);
    const int64_t prow0 = int64_t(blockIdx.z) * kSsdWarps * RPW;  // this block's first row p
    S* state = state_ptr<S>(p) + (b * H + h) * P * N;  // (P, N) of (B, H, P, N)
    S* const trace = trace_ptr<S>(p);                   // (B, L, H, P, N) or nullptr
    float s[RPW][SPL];
#pragma unroll
    for (int r = 0; r < RPW; ++r)
#pragma unroll
        for (int i = 0; i < SPL; ++i) {
            const int64_t pp = prow0 + warp + kSsdWarps * r, n = lane + 32 * i;
            s[r][i] = (pp < P && n < N) ? to_f32(state[pp * N + n]) : 0.0f;
        }
    const float A = p.A[h], Dv = p.D[h], dtb = p.dt_bias[h];
    // Tokens in groups of kT: the block stages a group's B, C, x, silu(z), δ and exp(δA) in
    // shared memory (all loads in flight together), then runs its kT recurrence steps.
    for (int64_t t0 = 0; t0 < p.L; t0 += kT) {
        const int nt = int(p.L - t0 < kT ? p.L - t0 : kT);
        __syncthreads();  // the previous group's reads of the stage are done
        for (int64_t idx = threadIdx.x; idx < nt * N; idx += blockDim.x) {
            const int64_t st = idx / N, k = idx % N, bt = b * p.L + t0 + st;
            Bs[idx] = p.Bm[bt * p.ld_xbc + g * N + k];
            Cs[idx] = p.Cm[bt * p.ld_xbc + g * N + k];
        }
        for (int64_t idx = threadIdx.x; idx < nt * P; idx += blockDim.x) {
            const int64_t st = idx / P, k = idx % P, bt = b * p.L + t0 + st;
            xs[idx] = p.x[bt * p.ld_xbc + h * P + k];
            if (p.z) zs[idx] = silu_f(p.z[bt * p.ld_z + h * P + k]);
        }
        if (threadIdx.x < nt) {
            const int64_t bt = b * p.L + t0 + threadIdx.x;
            const float delta =
                fminf(fmaxf(softplus_f(p.dt[bt * p.ld_dt + h] + dtb), p.dt_min), p.dt_max);
            dls[threadIdx.x] = delta;
            dAs[threadIdx.x] = expf(delta * A);
        }
        __syncthreads();
        for (int st = 0; st < nt; ++st) {
            const int64_t bt = b * p.L + t0 + st;
            const float delta = dls[st], dA = dAs[st];
            const float* Bt = Bs + st * N;
            const float* Ct = Cs + st * N;
            const float* xt = xs + st * P;
#pragma unroll
            for (int r = 0; r < RPW; ++r) {
                const int64_t pp = prow0 + warp + kSsdWarps * r;
                if (pp >= P) break;  // warp-uniform
                const float dx = delta * xt[pp];
                float acc = 0.0f;
#pragma unroll
                for (int i = 0; i < SPL; ++i) {
                    const int64_t n = lane + 32 * i;
                    if (n < N) {
                        s[r][i] = s[r][i] * dA + dx * Bt[n];
                        acc += s[r][i] * Ct[n];
                    }
                }
                acc = warp_sum(acc);
                if constexpr (sizeof(S) == 2) {  // the stored state after every token
#pragma unroll
                    for (int i = 0; i < SPL; ++i) s[r][i] = state_round<S>(s[r][i]);
                }
                if (trace) {  // the state after token bt (issue 25)
                    S* tr = trace + (bt * H + h) * P * N + pp * N;
#pragma unroll
                    for (int i = 0; i < SPL; ++i)
                        if (lane + 32 * i < N) tr[lane + 32 * i] = from_f32<S>(s[r][i]);
                }
                if (lane == 0) {
                    float yv = acc + Dv * xt[pp];
                    if (p.z) yv *= zs[st * P + pp];
                    p.y[bt * H * P + h * P + pp] = yv;
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < RPW; ++r)
#pragma unroll
        for (int i = 0; i < SPL; ++i) {
            const int64_t pp = prow0 + warp + kSsdWarps * r, n = lane + 32 * i;
            if (pp < P && n < N) state[pp * N + n] = from_f32<S>(s[r][i]);
        }
}

template <int RPW, typename S>
void dispatch_spl(const SsdParams& p, int spl, dim3 grid, size_t smem, cudaStream_t s) {
    const int threads = kSsdWarps * 32;
    if (spl == 1)
        ssd_scan_kernel<RPW, 1, S><<<grid, threads, smem, s>>>(p);
    else if (spl == 2)
        ssd_scan_kernel<RPW, 2, S><<<grid, threads, smem, s>>>(p);
    else if (spl <= 4)
        ssd_scan_kernel<RPW, 4, S><<<grid, threads, smem, s>>>(p);
    else
        ssd_scan_kernel<RPW, 8, S><<<grid, threads, smem, s>>>(p);
}

}  // namespace

void launch_ssd_scan(const SsdParams& p, cudaStream_t s) {
    MAMBART_CHECK_ARG(p.B >= 0 && p.L >= 0 && p.H > 0 && p.G > 0,
                      "launch_ssd_scan: bad sizes B=", p.B, " L=", p.L, " H=", p.H, " G=", p.G);
    MAMBART_CHECK_ARG(p.H % p.G == 0, "launch_ssd_scan: nheads=", p.H,
                      " is not a multiple of ngroups=", p.G);
    if (!(p.P >= 1 && p.P <= 128))
        throw Unsupported(str_cat("launch_ssd_scan: headdim=", p.P, " unsupported (1..128)"));
    if (!(p.N >= 1 && p.N <= 256))
        throw Unsupported(str_cat("launch_ssd_scan: d_state=", p.N, " unsupported (1..256)"));
    MAMBART_CHECK_ARG(p.ld_xbc >= p.H * p.P && p.ld_dt >= p.H && (!p.z || p.ld_z >= p.H * p.P),
                      "launch_ssd_scan: bad strides");
    const bool bf16 = p.ssm_state_bf16 != nullptr;  // option state_dtype
    MAMBART_CHECK_ARG(p.x && p.Bm && p.Cm && p.dt && p.A && p.D && p.dt_bias && p.y &&
                          (bf16 ? !p.ssm_state && !p.state_trace : p.ssm_state && !p.state_trace_bf16),
                      "launch_ssd_scan: null pointer, or fp32 and bf16 state pointers mixed");
    MAMBART_CHECK_ARG(p.B <= 65535 && p.H <= 0x7fffffff, "launch_ssd_scan: grid too large");
    if (p.B == 0) return;
    // The head's rows spread over ceil(P / 8) blocks of one row per warp: H * P / 8 blocks
    // (each stages the group's B and C itself; they come from L2).
    const int rpw = 1, spl = int(ceil_div(p.N, 32));
    const dim3 grid(unsigned(p.H), unsigned(p.B), unsigned(ceil_div(p.P, kSsdWarps)));
    const size_t smem = size_t(kT * (2 * p.N + 2 * p.P + 2)) * sizeof(float);
    static_assert(kSsdWarps == 8, "one row per warp");
    (void)rpw;
    if (bf16)
        dispatch_spl<1, __nv_bfloat16>(p, spl, grid, smem, s);
    else
        dispatch_spl<1, float>(p, spl, grid, smem, s);
    check_launch("ssd_scan_kernel", s);
}

}  // namespace cuda
}  // namespace mambart
