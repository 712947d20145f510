// L2 compute: the parameter structs of the Backend ops (backend.h), defined once and used by
// the layer units that fill them, the backends that run them and the CUDA kernels' launchers
// (cuda/kernels.h), so no field is copied between look-alike structs.
//
// Conventions (see backend.h): fp32 activations and states (an SSM state may be bf16: the
// ssm_state_bf16 fields below), sizes and strides in elements,
// mamba_ssm's dimension names (B batch rows, L tokens per row, d d_model, E d_inner, N d_state,
// W d_conv, H nheads, P headdim, G ngroups), row-major, device pointers of the backend.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace mambart {

// A large matrix (N rows of K elements) in its storage dtype, or quantized (issue 18):
//   quant None: data (N, K) in dtype (F32 / F16 / BF16);
//   quant Int8: data (N, K) int8 (dtype I8), w[n, k] = scales[n] * q[n, k]   (group == K);
//   quant Int4: data (N, K / 2) bytes (dtype U8), K % 32 == 0, group % 32 == 0, K % group == 0.
//     Each block of 32 weights along K is 16 bytes: byte j holds weight j in its low nibble and
//     weight j + 16 in its high nibble, unsigned u; w[n, k] = scales[n, k / group] * (u - 8).
//     (So 8 consecutive bytes widen to 8 consecutive weights twice, low then high nibbles: the
//     SIMD and CUDA kernels dequantize in registers without shuffles.)
struct Weight {
    const void* data = nullptr;
    DType dtype = DType::F32;
    int64_t rows = 0;  // N (output features)
    int64_t cols = 0;  // K (input features)
    QuantScheme quant = QuantScheme::None;
    const float* scales = nullptr;  // (N, K / group) fp32, quantized weights only
    int64_t group = 0;              // weights per scale along K (Int8: K)
};

// A small fp32 parameter vector or matrix.
struct Param {
    const float* data = nullptr;
    int64_t numel = 0;
};

struct ConvParams {          // causal depthwise conv1d (+ SiLU), with a rolling state
    const float* x;          // (B, L, C) pre-conv input, row stride ld_x
    int64_t ld_x;
    float* conv_state;       // (B, C, W) inout: the last W pre-conv inputs, oldest first
    const float* weight;     // (C, W)
    const float* bias;       // (C) or nullptr
    float* out;              // (B, L, C) post-SiLU, contiguous
    int64_t B, L, C, W;
    // Speculative verification (issue 25): (B, L, C, W) contiguous, or nullptr: the conv state
    // after each token (row (b, t) = the last W inputs up to token t of row b).
    float* state_trace = nullptr;
    bool silu = true;        // SiLU on the output (false: the plain conv, mamba2attn's qkv)
};

struct SelectiveScanParams {  // Mamba-1: fused dt softplus, scan, D skip, SiLU(z) gate
    const float* x;           // (B, L, E) post-conv input u, contiguous
    const float* dt;          // (B, L, E) dt before bias and softplus, contiguous
    const float* Bm;          // (B, L, N), row stride ld_bc
    const float* Cm;          // (B, L, N), row stride ld_bc
    int64_t ld_bc;
    const float* z;           // (B, L, E), row stride ld_z
    int64_t ld_z;
    const float* A;           // (E, N) = -exp(A_log)
    const float* D;           // (E)
    const float* dt_bias;     // (E)
    float* ssm_state;         // (B, E, N) inout (nullptr when ssm_state_bf16 is set)
    float* y;                 // (B, L, E) out, contiguous
    int64_t B, L, E, N;
    // Speculative verification (issue 25): (B, L, E, N) contiguous, or nullptr: the state
    // after each token (row (b, t) = ssm_state of row b after token t).
    float* state_trace = nullptr;
    // Option state_dtype bfloat16 (issue 18), or nullptr: the state (and trace) as bf16 bits in
    // place of ssm_state (state_trace), same shapes. See BF16_STATE_RULE below.
    uint16_t* ssm_state_bf16 = nullptr;
    uint16_t* state_trace_bf16 = nullptr;
};

struct SsdParams {            // Mamba-2: dt softplus + clamp, chunked SSD scan, D skip, optional gate
    const float* x;           // (B, L, H*P), row stride ld_xbc
    const float* Bm;          // (B, L, G*N), row stride ld_xbc
    const float* Cm;          // (B, L, G*N), row stride ld_xbc
    int64_t ld_xbc;
    const float* dt;          // (B, L, H) before bias and softplus, row stride ld_dt
    int64_t ld_dt;
    const float* z;           // (B, L, H*P) row stride ld_z, or nullptr (gate applied later)
    int64_t ld_z;
    const float* A;           // (H) = -exp(A_log)
    const float* D;           // (H)
    const float* dt_bias;     // (H)
    float dt_min, dt_max;     // clamp of dt after softplus
    float* ssm_state;         // (B, H, P, N) inout (nullptr when ssm_state_bf16 is set)
    float* y;                 // (B, L, H*P) out, contiguous
    int64_t B, L, H, P, G, N;
    int64_t chunk_size;       // Q
    // Speculative verification (issue 25): (B, L, H, P, N) contiguous, or nullptr: the state
    // after each token (row (b, t) = ssm_state of row b after token t).
    float* state_trace = nullptr;
    // Option state_dtype bfloat16 (issue 18), or nullptr: as in SelectiveScanParams.
    uint16_t* ssm_state_bf16 = nullptr;
    uint16_t* state_trace_bf16 = nullptr;
    // The layer's projections are half precision (fp16 / bf16 weights): their GEMMs round
    // activations to 8 or 11 significant bits, so a chunked form may take plain TF32 products
    // (11 bits) at no loss against them (option cuda_ssd auto).
    bool half_weights = false;
};

// BF16_STATE_RULE (option state_dtype bfloat16, issue 18): a scan op given ssm_state_bf16
// reads the state as bf16, computes in fp32 exactly as with an fp32 state, and rounds the state
// to bf16 (nearest even) after every token, so a prompt prefilled leaves the state that decoding
// it token by token would, and a trace row equals the state a decode step would leave (exact
// speculative rollback). The fused Mamba-1 decode step (Mamba1DecodeParams) takes an fp32
// state only (the layer runs the separate ops with a bf16 state); the Mamba-2 one
// (Mamba2DecodeParams) takes either storage.

// Fused single-token (L = 1) mixer steps, optional: a backend that returns true from
// mamba1_decode_fused / mamba2_decode_fused has done the work of the ops listed, else the model
// runs those ops itself.
struct Mamba1DecodeParams {   // = linear(dt_proj) + selective_scan at L = 1
    const float* x;           // (B, E) post-conv x, contiguous
    const float* xdbl;        // (B, ld_xdbl): [dt_low (R) | B (N) | C (N)] (x_proj output)
    int64_t ld_xdbl;
    Weight dt_proj;           // (E, R)
    const float* z;           // (B, E) row stride ld_z
    int64_t ld_z;
    const float* A;           // (E, N)
    const float* D;           // (E)
    const float* dt_bias;     // (E)
    float* ssm_state;         // (B, E, N) inout
    float* y;                 // (B, E) out
    int64_t B, E, N, R;
};

// The persistent decode (issue 16; option cuda_persistent_decode; backends whose
// persistent_decode() returns true): one batch-1 decode step of a run of layers as one
// cooperative kernel (a launch per group of layers), stages separated by grid-wide barriers
// instead of kernel boundaries, each stage's first weight loads issued before its barrier.
// Per layer: norm(residual) -> in_proj (+ conv step) -> x_proj -> dt_proj + scan + gate ->
// out_proj added into the residual, with the same arithmetic as the separate kernels (the same
// values, bit for bit). A layer unit describes itself (Layer::persistent_layer); the model
// adds its block norm. Only kinds the backend knows run; any other layer keeps the whole step
// on the separate ops.
struct PersistentLayer {
    enum Kind : int { None = 0, Mamba1 = 1 };
    Kind kind = None;
    DType dtype = DType::F32;    // of every matrix below (unquantized)
    int64_t E = 0, N = 0, W = 0, R = 0;  // d_inner, d_state, d_conv, dt_rank
    const void* in_proj = nullptr;   // (2E, d)
    const float* in_bias = nullptr;  // (2E) or nullptr
    const float* conv_w = nullptr;   // (E, W)
    const float* conv_b = nullptr;   // (E) or nullptr
    const void* x_proj = nullptr;    // (R + 2N, E)
    const void* dt_proj = nullptr;   // (E, R)
    const float* dt_bias = nullptr;  // (E)
    const float* A = nullptr;        // (E, N) = -exp(A_log)
    const float* D = nullptr;        // (E)
    const void* out_proj = nullptr;  // (d, E)
    const float* out_bias = nullptr; // (d) or nullptr
    const float* norm_w = nullptr;   // (d) the block norm's weight (the model's), or nullptr: 1
    const float* norm_b = nullptr;   // (d) LayerNorm bias, or nullptr
    float* conv_state = nullptr;     // (E, W) inout, oldest first
    float* ssm_state = nullptr;      // (E, N) inout, fp32
    float* proj = nullptr;           // (2E) workspace: [x | z]
    float* xconv = nullptr;          // (E) workspace: post-conv, post-SiLU x
    float* xdbl = nullptr;           // (R + 2N) workspace: [dt_low | B | C]
    float* y = nullptr;              // (E) workspace: the gated scan output
};

struct PersistentDecodeParams {
    const PersistentLayer* layers = nullptr;  // host array of n_layers
    int64_t n_layers = 0;
    int64_t d = 0;              // d_model
    bool rms = true;            // block norms: RMSNorm, else LayerNorm
    float eps = 0.0f;
    float* residual = nullptr;  // (d) inout: the residual stream after the embedding (before
                                // layer 0's norm); after the call, after the last layer's add
};

// A decode projection with its neighbours folded in (option fused_projections; backends whose
// fused_projection(M, K) is true): y[M, N] = x[M, K] · Wᵀ + bias, where
//  - norm.residual != nullptr: x is not read; x[m, :] = norm(residual[m, :]) * w (+ b), the
//    model's pre-layer RMSNorm (rms) or LayerNorm, from residual (M, K) contiguous;
//  - gate.z != nullptr: x[m, :] is first put through Mamba-2's grouped gated RMSNorm
//    (norm_before_gate=False): v = x * silu(z); v * rsqrt(mean_group(v²) + eps) * w;
//  - accumulate: y += x · Wᵀ + bias (the residual add of a layer's output);
//  - conv.state != nullptr (Mamba-1's conv step at L = 1, on y's first conv.C columns):
//    conv.out[m, c] = silu(bias[c] + Σ_{k<W-1} w[c, k] state[m, c, k+1] + w[c, W-1] y[m, c]),
//    state[m, c, :] <- [state[m, c, 1:], y[m, c]]  (what conv1d does at L = 1).
// The result is the separate ops' (add_norm, linear, the add, conv1d) bit for bit.
// scratch_x (M, K) / scratch_y (M, N): buffers a backend that runs the separate ops may use.
struct ProjNorm {
    const float* residual = nullptr;  // (M, K) contiguous, or nullptr: x is read
    const float* w = nullptr;         // (K) or nullptr (no weight)
    const float* b = nullptr;         // (K) or nullptr (LayerNorm only)
    bool rms = true;
    float eps = 0.0f;
};
struct ProjGate {
    const float* z = nullptr;         // (M, K) row stride ld_z, or nullptr: no gated norm
    int64_t ld_z = 0;
    const float* w = nullptr;         // (K)
    int64_t group_size = 0;           // divides K
    float eps = 0.0f;
};
struct ProjConv {
    float* state = nullptr;           // (M, C, W) inout, or nullptr: no conv step
    const float* w = nullptr;         // (C, W)
    const float* bias = nullptr;      // (C) or nullptr
    float* out = nullptr;             // (M, C) contiguous, post-SiLU
    int64_t C = 0, W = 0;
};
struct ProjParams {
    const float* x = nullptr;         // (M, K) row stride ldx (unless norm.residual)
    int64_t ldx = 0;
    int64_t M = 0;
    Weight W;                         // (>= N, K)
    int64_t N = 0;
    const float* bias = nullptr;      // (N) or nullptr
    float* y = nullptr;               // (M, N) row stride ldy
    int64_t ldy = 0;
    ProjNorm norm;
    ProjGate gate;
    bool accumulate = false;
    ProjConv conv;
    float* scratch_x = nullptr;       // (M, K)
    float* scratch_y = nullptr;       // (M, N)
};

struct Mamba2DecodeParams {   // = conv1d + ssd_scan at L = 1
    ConvParams conv;          // conv of [x | B | C] (L = 1); conv.out is not written
    SsdParams ssd;            // x, Bm, Cm are ignored (the conv's results are used directly)
};

// Mamba-3 (SISO and MIMO of rank Rm), any L (spec section 4), defined by its recurrent form (a
// backend may run the equivalent chunked form for prefill: cuda/mamba3_chunked.cu): per row b,
// token t and head h (group g = h / (H / G)):
//   A = min(-f(dd_A), -a_floor) (f: heavy tail 1+x | 1/(1-x), or softplus); DT = softplus(dd_dt +
//   dt_bias); λ = sigmoid(trap); θ[i] = (θ[i] + π tanh(angles[i]) DT) mod 2π, i < S;
//   k_r = rms_N(B_r,g) w_B + B_bias[h, r], q_r likewise with C, both rotated by θ (pairwise
//   (2i, 2i+1) for SISO, halved (i, i + N/2) for MIMO); x_r = x ⊙ mimo_x[h, r];
//   α = exp(A DT), β = (1 - λ) DT α, γ = λ DT;
//   h ← α h + β Σ_r (v ⊙ mimo_x[h, r]) ⊗ k_prev_r + γ Σ_r x_r ⊗ k_r;
//   y_r = h q_r + D x_r; y_r ← y_r silu(z ⊙ mimo_z[h, r]) (or rms_P(y_r) w silu(...) with the
//   output norm); y = Σ_r y_r ⊙ mimo_o[h, r]; then k_prev ← k, v ← x.
// SISO: Rm = 1 and the mimo_* pointers are nullptr (ones).
struct Mamba3ScanParams {
    const float* proj;        // (B, L, ld_proj): [z (E) | x (E) | B (Rm, G, N) | C (Rm, G, N) |
                              //  dd_dt (H) | dd_A (H) | trap (H) | angles (S)], E = H * P
    int64_t ld_proj;
    const float* dt_bias;     // (H)
    const float* B_bias;      // (H, Rm, N)
    const float* C_bias;      // (H, Rm, N)
    const float* B_norm_w;    // (N)
    const float* C_norm_w;    // (N)
    const float* D;           // (H)
    const float* mimo_x;      // (H, Rm, P) or nullptr (SISO)
    const float* mimo_z;      // (H, Rm, P) or nullptr
    const float* mimo_o;      // (H, Rm, P) or nullptr
    const float* norm_w;      // (E): the per-head gated RMSNorm, or nullptr (y silu(z) only)
    float* angle_state;       // (B, H, S) inout, in [0, 2π)
    float* ssm_state;         // (B, H, P, N) inout
    float* k_state;           // (B, Rm, H, N) inout: the last token's rotated k
    float* v_state;           // (B, H, P) inout: the last token's x
    float* y;                 // (B, L, E) out (before out_proj)
    int64_t B, L, H, P, N, G, Rm, S;
    bool halved;              // rotation pairs (i, i + N/2) (MIMO) instead of (2i, 2i+1)
    bool softplus_a;          // A activation softplus (older checkpoints) instead of heavy tail
    float a_floor;            // A <= -a_floor
    float eps;                // of the B/C norms and the output norm
};

// Causal multi-head / grouped-query attention with a per-sequence KV cache (the attention
// layer unit, cpp/layers/attention/), any L. Per row b with cache length n0 = pos[b] (tokens
// seen before this call), token t (absolute position n0 + t), q head h (kv head
// j = h / (Hq / Hkv)):
//   q, k <- rope(q, k; position n0 + t) on their first rotary_dim dims (rotate-half / NeoX form,
//   inv_freq_i = theta^(-2i / rotary_dim), i < rotary_dim / 2; none when rotary_dim = 0);
//   k_cache[b, n0 + t, j] = k; v_cache[b, n0 + t, j] = v;
//   o[b, t, h] = softmax_s(scale q·k_cache[b, s, j]) · v_cache[b, s, j] over the keys
//   s <= n0 + t with s > n0 + t - window (window 0: all);
//   then pos[b] = n0 + L.
// A row whose n0 + L would exceed max_ctx is refused (the CPU backend throws; device backends
// never write past max_ctx: callers check lengths up front, ModelConfig::max_context()).
struct AttentionParams {
    float* qkv;               // (B, L, ld_qkv) inout: [q (Hq, hd) | k (Hkv, hd) | v (Hkv, hd)];
                              //   q and k are rotated in place
    int64_t ld_qkv;
    float* k_cache;           // (B, max_ctx, Hkv, hd) inout, per row at stride cache_stride
    float* v_cache;           // (B, max_ctx, Hkv, hd) inout, per row at stride cache_stride
    int64_t cache_stride;     // floats between rows' caches (and between rows' pos)
    float* pos;               // (B) inout at stride pos_stride: tokens in the cache (an integer)
    int64_t pos_stride;
    float* o;                 // (B, L, Hq, hd) out, contiguous
    float* partial;           // (>= B * Hq * max_splits * (hd + 2)) decode split-K scratch, or
    int64_t max_splits;       //   nullptr / 0 (no split); backends that do not split ignore it
    int64_t B, L, Hq, Hkv, hd;
    int64_t max_ctx;          // cache capacity per row, in tokens
    int64_t rotary_dim;       // 0 (NoPE) or even, <= hd
    float rope_theta;
    int64_t window;           // sliding window in tokens (0: none)
    float scale;              // softmax scale (usually hd^-1/2)
};

// A mixture of experts over R token rows (the MoE layer unit, cpp/layers/moe/): routing from the
// router logits, then per routed (row, slot) the SwiGLU expert, accumulated into `out`:
//   sel  = the k largest logits of row r (ties: the lower expert id), in descending order;
//   w_j  = normalize ? softmax over the k selected logits
//                    : the full softmax over all X logits, taken at the k selected;
//   out[r] += scale * Σ_j w_j · W_out[e_j] (silu(W_gate[e_j] x_r) * (W_up[e_j] x_r))
// with W_gate[e] = rows [0, I) and W_up[e] = rows [I, 2I) of expert e's (2I, d) input matrix.
constexpr int64_t kMoeMaxTopK = 32;  // the most experts one token routes to (k)
struct MoeParams {
    const float* x;           // (R, d) the normed input
    const float* logits;      // (R, X) router logits (fp32)
    Weight w_in;              // (X, 2I * d): expert e's (2I, d) gate|up matrix at row e
    Weight w_out;             // (X, d * I): expert e's (d, I) output matrix at row e
    float* route;             // (R, 2k) scratch: per row k expert ids (int32 bits), k weights
    float* h;                 // (R, max(k, 2) * I) scratch: activated expert hiddens
    float* xy;                // (R, 2d) scratch: gathered rows (backends that group by expert)
    float* out;               // (R, d) inout: the routed experts are added
    int64_t R, d, X, k, I;
    bool normalize = true;    // renormalized top-k weights (see above)
    float scale = 1.0f;       // a routed scaling factor (1: none)
};

// Device-side sampling of one token per row (decode fast path), with mambart::Sampler's
// semantics (cpp/sampling.h) given the same draw uniform(seed, stream, counter).
struct DeviceSampleParams {
    const float* logits;       // (B, V) row stride ld
    int64_t ld, B, V;
    float temperature;         // 0: greedy
    int64_t top_k;             // 0: off
    float top_p, min_p;        // 1: off, 0: off
    float repetition_penalty;  // 1: off
    const uint64_t* rng;       // (B, 3) device: per row (seed, stream, counter) of the draw,
                               // read when the op runs (graphs replay with new values)
    uint8_t* seen;             // (B, V) device: ids seen per row, the sampled id gets marked; or nullptr
    int32_t* out;              // (B) device: the sampled ids; -1 for a row with a non-finite logit
};

}  // namespace mambart
