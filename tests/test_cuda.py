"""The CUDA backend against the CPU backend (the reference): every op on odd shapes through the
test-only `_C._ops` module, then whole models (CPU, transformers), the decode fast path (CUDA
graphs + device sampling) and its invariants. Every test carries the `cuda` marker and is
skipped where there is no GPU (conftest.py).

Tolerances. fp32 ops: a few ulps of the output scale (summation orders differ). Low-precision
weights follow the rule "no more than twice the error of the CPU reference run in the same low
precision": with ref32 the CPU result on fp32 weights and cpu_lp the CPU result on weights
rounded to fp16/bf16, max|cuda_lp - ref32| <= 2 * max|cpu_lp - ref32| + atol."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mambart import _C

pytestmark = pytest.mark.cuda

DTYPES = ["float32", "float16", "bfloat16"]


@pytest.fixture(scope="module")
def gpu():
    return _C._ops.Backend("cuda")


@pytest.fixture(scope="module")
def cpu():
    return _C._ops.Backend("cpu")


def rnd(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def close(got, ref, rel=2e-5, what=""):
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    assert err <= rel * scale, f"{what}: max abs err {err:.3g} (scale {scale:.3g})"


def lowp_rule(cuda_lp, cpu_lp, ref32, atol, what=""):
    e_cuda = float(np.abs(cuda_lp - ref32).max())
    e_cpu = float(np.abs(cpu_lp - ref32).max())
    assert e_cuda <= 2 * e_cpu + atol, f"{what}: cuda err {e_cuda:.3g} > 2 x cpu err {e_cpu:.3g} + {atol}"


def stream_steps(g, prompts, n):
    """Greedy decode of `prompts` (one batch, n tokens a row) on the generation stream: each
    row's tokens and the logits of each step."""
    opts = _C.GenerationOptions()
    opts.max_new_tokens = n
    opts.ignore_eos = True
    stream = g._g.start(prompts, opts)
    toks = [[] for _ in prompts]
    logits = [[] for _ in prompts]
    while True:
        ev = stream.next()
        if ev is None:
            break
        for r, t in ev:
            logits[r].append(stream.last_logits[r].copy())
            toks[r].append(t)
    for r in range(len(prompts)):
        assert len(toks[r]) == n
    return toks, logits


def steps_match(g, path, dtype, prompts, toks, step_logits, what):
    """Decode-step logits of the graph path (graph replay, device sampling, a batch of rows)
    against an eager run. fp32: a prefill of each row's tokens, to 1e-4 of the scale. fp16 /
    bf16: a prefill rounds the activations to the weight dtype for its GEMMs while decode steps
    keep them in fp32 (a few % of the logits; near-tied top-k expert choices flip), so the
    reference is the same batch decoded by a generator with cuda_graphs off (the same kernels
    launched one by one), to 1e-4 of the scale, with the same tokens."""
    if dtype == "float32":
        for r, p in enumerate(prompts):
            full = g.logits(p + toks[r])
            for i, lg in enumerate(step_logits[r]):
                close(lg, full[len(p) - 1 + i], 1e-4, f"{what} row {r} step {i}")
        return
    import mambart

    mambart.set_options(cuda_graphs=False)
    try:
        eager = _gen(path, "cuda", dtype)
    finally:
        mambart.set_options(cuda_graphs=None)
    etoks, elogits = stream_steps(eager, prompts, len(toks[0]))
    assert etoks == toks, what
    for r in range(len(prompts)):
        for i, lg in enumerate(step_logits[r]):
            close(lg, elogits[r][i], 1e-4, f"{what} row {r} step {i}")

# ---- ops ------------------------------------------------------------------------------------


def test_cuda_available_and_name(gpu):
    assert _C.cuda_available()
    assert gpu.name.startswith("cuda:0")


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding(gpu, cpu, dtype):
    rng = np.random.default_rng(0)
    table = rnd(rng, 101, 37)
    ids = rng.integers(0, 101, size=13).astype(np.int32)
    np.testing.assert_array_equal(gpu.embedding(ids, table, dtype), cpu.embedding(ids, table, dtype))


@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("n,d", [(1, 16), (3, 37), (5, 1000), (2, 2560)])
@pytest.mark.parametrize("with_hidden", [False, True])
def test_add_norm(gpu, cpu, kind, n, d, with_hidden):
    rng = np.random.default_rng(n * d)
    res, hid, w, b = rnd(rng, n, d), rnd(rng, n, d), rnd(rng, d), rnd(rng, d)
    h = hid if with_hidden else None
    bb = b if kind == "ln" else None
    r_gpu, o_gpu = gpu.add_norm(res, h, w, bb, kind, 1e-5)
    r_cpu, o_cpu = cpu.add_norm(res, h, w, bb, kind, 1e-5)
    close(r_gpu, r_cpu, 1e-6, "residual")
    close(o_gpu, o_cpu, 2e-5, "normed")


LINEAR_SHAPES = [(1, 16, 5), (3, 37, 64), (8, 256, 130), (1, 512, 2048), (5, 200, 1100),
                 (9, 64, 33), (40, 2048, 200),
                 (70, 136, 96), (200, 512, 257), (333, 1024, 384)]


def cuda_backend_with(var, value):
    """A CUDA op backend made while the environment variable `var` is `value` (the backend
    reads its MAMBART_* switches when it is made); the environment is restored after."""
    old = os.environ.get(var)
    os.environ[var] = value
    try:
        return _C._ops.Backend("cuda")
    finally:
        if old is None:
            del os.environ[var]
        else:
            os.environ[var] = old


@pytest.fixture(scope="module")
def gpu_own_gemm():
    """A CUDA backend that never uses cuBLAS (MAMBART_CUBLAS=0)."""
    return cuda_backend_with("MAMBART_CUBLAS", "0")


def test_gemm_named(gpu, gpu_own_gemm):
    # The backend says which GEMM its projections use (cuBLAS, or why not).
    assert "GEMM: " in gpu.name
    assert "GEMM: hand-written (MAMBART_CUBLAS=0)" in gpu_own_gemm.name


@pytest.mark.parametrize("own_gemm", [False, True])
@pytest.mark.parametrize("M,K,N", LINEAR_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("pad", [3, 8])
def test_linear(gpu, gpu_own_gemm, cpu, own_gemm, M, K, N, dtype, bias, pad):
    # own_gemm=False: the default backend (cuBLAS for M > 8 where libcublas loads);
    # own_gemm=True: the hand-written GEMV / GEMM kernels.
    if own_gemm:
        gpu = gpu_own_gemm
    rng = np.random.default_rng(M * 1000 + K + N)
    # rows with stride ldx = K + pad (a column slice of a wider buffer); pad 8 keeps rows
    # 16-byte aligned (the vectorised GEMV / pipelined GEMM paths), pad 3 does not
    x = rnd(rng, M, K + pad)
    W = rnd(rng, N + 2, K, scale=K ** -0.5)  # N < rows: only the first N rows are used
    bvec = rnd(rng, N) if bias else None
    ref32 = cpu.linear(x, W, "float32", bvec, N)
    got = gpu.linear(x, W, dtype, bvec, N)
    assert got.shape == (M, N)
    if dtype == "float32":
        close(got, ref32, 2e-5, "linear fp32")
    else:
        lowp_rule(got, cpu.linear(x, W, dtype, bvec, N), ref32, 1e-3, f"linear {dtype}")


@pytest.fixture(scope="module")
def gpu_gemv_tc():
    """A CUDA backend whose decode-batch projections take the tensor-core GEMV
    (MAMBART_CUDA_GEMV_TC=1: 4..32 rows, fp16/bf16 weights, K % 32 == 0, aligned x)."""
    return cuda_backend_with("MAMBART_CUDA_GEMV_TC", "1")


@pytest.mark.parametrize("M", [4, 7, 8, 9, 16, 17, 32])
@pytest.mark.parametrize("K,N", [(32, 5), (96, 33), (2048, 1100), (4096, 16), (128, 4096)])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_gemv_tc(gpu_gemv_tc, cpu, M, K, N, dtype, bias):
    # rows 16-byte aligned (pad 8): every case takes gemv_tc_kernel (one, two and four 8-row
    # n-blocks, a partial last 16-column block, fewer K steps than warps)
    rng = np.random.default_rng(M * 1000 + K + N)
    x = rnd(rng, M, K + 8)
    W = rnd(rng, N + 2, K, scale=K ** -0.5)
    bvec = rnd(rng, N) if bias else None
    ref32 = cpu.linear(x, W, "float32", bvec, N)
    got = gpu_gemv_tc.linear(x, W, dtype, bvec, N)
    assert got.shape == (M, N)
    lowp_rule(got, cpu.linear(x, W, dtype, bvec, N), ref32, 1e-3, f"gemv_tc {dtype}")


@pytest.mark.parametrize("B,L", [(1, 1), (2, 1), (1, 3), (2, 33), (1, 100), (3, 70)])
@pytest.mark.parametrize("C,W", [(5, 4), (130, 4), (64, 2), (33, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv1d(gpu, cpu, B, L, C, W, bias):
    rng = np.random.default_rng(B * L * C * W)
    x = rnd(rng, B, L, C + 7)  # ld_x = C + 7: x is a column slice of in_proj's output
    state = rnd(rng, B, C, W)
    w, b = rnd(rng, C, W), (rnd(rng, C) if bias else None)
    o_g, s_g = gpu.conv1d(x, C, state, w, b)
    o_c, s_c = cpu.conv1d(x, C, state, w, b)
    close(o_g, o_c, 1e-5, "conv out")
    np.testing.assert_array_equal(s_g, s_c)


@pytest.mark.parametrize("B,L", [(1, 1), (3, 1), (1, 7), (2, 70), (1, 300)])
@pytest.mark.parametrize("E,N", [(6, 16), (40, 16), (33, 5), (16, 64), (8, 128), (4, 1)])
def test_selective_scan(gpu, cpu, B, L, E, N):
    rng = np.random.default_rng(B * L * E * N)
    X = 3 + 2 * N  # x_proj output: [dt_low (3) | B | C]
    x, dt = rnd(rng, B, L, E), rnd(rng, B, L, E)
    dt[0, 0, 0] = 30.0  # the softplus threshold branch
    bc = rnd(rng, B, L, X)
    z = rnd(rng, B, L, 2 * E)  # z is the second half of xz
    A = -np.exp(rnd(rng, E, N, scale=0.5))
    D, dtb = rnd(rng, E), rnd(rng, E, scale=0.5)
    state = rnd(rng, B, E, N)
    y_g, s_g = gpu.selective_scan(x, dt, bc, 3, 3 + N, z, E, A, D, dtb, state)
    y_c, s_c = cpu.selective_scan(x, dt, bc, 3, 3 + N, z, E, A, D, dtb, state)
    close(y_g, y_c, 5e-5, "y")
    close(s_g, s_c, 5e-5, "state")


SSD_CASES = [
    # B, L, H, P, G, N, chunk
    (1, 1, 4, 8, 2, 16, 8),
    (2, 1, 8, 64, 1, 128, 256),
    (1, 9, 4, 8, 2, 16, 8),  # L not a multiple of the chunk
    (2, 64, 4, 16, 4, 64, 16),
    (1, 130, 8, 64, 2, 128, 64),
    (3, 17, 6, 5, 3, 7, 4),
    (1, 40, 2, 128, 1, 256, 16),
]


@pytest.mark.parametrize("B,L,H,P,G,N,Q", SSD_CASES)
@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("dt_limit", [(0.0, float("inf")), (0.01, 0.3)])
def test_ssd_scan(gpu, cpu, B, L, H, P, G, N, Q, gate, dt_limit):
    rng = np.random.default_rng(B * L * H * P * G * N + Q)
    E = H * P
    xbc = rnd(rng, B, L, E + 2 * G * N + 3)  # [x | B | C | pad]
    dt = rnd(rng, B, L, H + 5)  # dt at column 5 of a wider row
    dt[0, 0, 5] = 25.0
    z = rnd(rng, B, L, E) if gate else None
    A = -np.exp(rnd(rng, H, scale=0.5))
    D, dtb = rnd(rng, H), rnd(rng, H, scale=0.5)
    state = rnd(rng, B, H, P, N, scale=0.5)
    args = (xbc, E, E + G * N, dt, 5, z, A, D, dtb, dt_limit[0], dt_limit[1], state, G, Q)
    y_g, s_g = gpu.ssd_scan(*args)
    y_c, s_c = cpu.ssd_scan(*args)
    close(y_g, y_c, 1e-4, "y")
    close(s_g, s_c, 1e-4, "state")


def _ssd_f64(xbc, b_off, c_off, dt, dt_off, z, A, D, dtb, dt_min, dt_max, state, G):
    """The SSD recurrence in float64 numpy (an independent reference for the error rule)."""
    Bn, L = xbc.shape[:2]
    H, P, N = state.shape[1:]
    E = H * P
    s = state.astype(np.float64).copy()
    y = np.zeros((Bn, L, H, P))
    hg = np.arange(H) // (H // G)
    for t in range(L):
        x = xbc[:, t, :E].astype(np.float64).reshape(Bn, H, P)
        Bm = xbc[:, t, b_off:b_off + G * N].astype(np.float64).reshape(Bn, G, N)[:, hg]
        Cm = xbc[:, t, c_off:c_off + G * N].astype(np.float64).reshape(Bn, G, N)[:, hg]
        v = dt[:, t, dt_off:dt_off + H].astype(np.float64) + dtb
        sp = np.where(v > 20.0, v, np.log1p(np.exp(np.minimum(v, 20.0))))
        d = np.clip(sp, dt_min, dt_max)  # (B, H)
        s = s * np.exp(d * A)[:, :, None, None] + (d[:, :, None] * x)[..., None] * Bm[:, :, None, :]
        yt = np.einsum("bhpn,bhn->bhp", s, Cm) + D[None, :, None] * x
        if z is not None:
            zt = z[:, t].astype(np.float64).reshape(Bn, H, P)
            yt = yt * zt / (1.0 + np.exp(-zt))
        y[:, t] = yt
    return y.reshape(Bn, L, H * P), s


SSD_CHUNKED_CASES = [
    # B, L, H, P, G, N, chunk: L = 1 (the recurrent decode form), short and long prompts,
    # L not a multiple of the chunk, ngroups 1/2/4, d_state 16/64/128 and odd sizes
    (1, 1, 4, 16, 1, 16, 5),
    (2, 7, 4, 16, 2, 16, 5),
    (1, 7, 8, 64, 4, 64, 8),
    (2, 130, 4, 16, 1, 128, 8),
    (1, 130, 8, 64, 2, 128, 64),
    (1, 300, 4, 32, 4, 64, 64),
    (1, 300, 6, 5, 3, 7, 256),
    (2, 300, 4, 40, 2, 33, 5),
    (1, 1000, 8, 64, 2, 128, 256),
    (1, 1000, 4, 16, 1, 16, 5),
    (2, 1000, 2, 64, 2, 64, 64),
]


@pytest.mark.parametrize("B,L,H,P,G,N,Q", SSD_CHUNKED_CASES)
@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("dt_limit", [(0.0, float("inf")), (0.01, 0.3)])
def test_ssd_chunked_vs_cpu_and_f64(gpu, cpu, B, L, H, P, G, N, Q, gate, dt_limit):
    """The chunked SSD kernels (L > 1) against the CPU backend's chunked SSD, with a nonzero
    initial state; and against a float64 recurrence: the GPU's error may not exceed twice the
    CPU's (+ 1e-5 of the output scale)."""
    rng = np.random.default_rng(L * 7919 + H * P * G * N + Q)
    E = H * P
    xbc = rnd(rng, B, L, E + 2 * G * N + 3)
    dt = rnd(rng, B, L, H + 2)
    dt[0, 0, 2] = 25.0  # the softplus threshold branch
    z = rnd(rng, B, L, E) if gate else None
    A = -np.exp(rnd(rng, H, scale=0.5))
    D, dtb = rnd(rng, H), rnd(rng, H, scale=0.5)
    state = rnd(rng, B, H, P, N, scale=0.5)
    args = (xbc, E, E + G * N, dt, 2, z, A, D, dtb, dt_limit[0], dt_limit[1], state, G, Q)
    y_g, s_g = gpu.ssd_scan(*args)
    y_c, s_c = cpu.ssd_scan(*args)
    close(y_g, y_c, 1e-4, "y")
    close(s_g, s_c, 1e-4, "state")
    if L * H * P * N <= 130 * 8 * 64 * 128:
        y64, s64 = _ssd_f64(*args[:-1])
        for got, ref, f64, what in ((y_g, y_c, y64, "y"), (s_g, s_c, s64.reshape(s_g.shape), "s")):
            e_gpu = float(np.abs(got - f64).max())
            e_cpu = float(np.abs(ref - f64).max())
            atol = 1e-5 * max(1.0, float(np.abs(f64).max()))
            assert e_gpu <= 2 * e_cpu + atol, f"{what}: gpu err {e_gpu:.3g}, cpu err {e_cpu:.3g}"


@pytest.mark.parametrize("n,E,group", [(1, 64, 64), (5, 64, 16), (3, 96, 32), (2, 4096, 4096)])
def test_gated_rmsnorm(gpu, cpu, n, E, group):
    rng = np.random.default_rng(n * E + group)
    y, z, w = rnd(rng, n, E), rnd(rng, n, E + 9), rnd(rng, E)
    close(gpu.gated_rmsnorm(y, z, w, group, 1e-5), cpu.gated_rmsnorm(y, z, w, group, 1e-5), 2e-5)


def test_silu_gate(gpu, cpu):
    rng = np.random.default_rng(3)
    y, z = rnd(rng, 7, 45), rnd(rng, 7, 90)
    close(gpu.silu_gate(y, z), cpu.silu_gate(y, z), 1e-6)


def test_gelu_gate(gpu, cpu):
    rng = np.random.default_rng(4)
    y, z = rnd(rng, 7, 45), rnd(rng, 7, 90, scale=3.0)
    close(gpu.gelu_gate(y, z), cpu.gelu_gate(y, z), 1e-6)


@pytest.mark.parametrize("n,d", [(3, 64), (70, 200)])
def test_add_norm_without_output_is_the_add(gpu, cpu, n, d):
    rng = np.random.default_rng(n + d)
    res, h = rnd(rng, n, d), rnd(rng, n, d)
    r_gpu, o_gpu = gpu.add_norm(res, h, None, None, "rms", 1e-5, add_only=True)
    r_cpu, _ = cpu.add_norm(res, h, None, None, "rms", 1e-5, add_only=True)
    assert o_gpu is None
    close(r_gpu, r_cpu, 1e-6)


SAMPLING = [
    dict(temperature=0.0),
    dict(temperature=0.0, repetition_penalty=1.3),
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.2),
    dict(temperature=1.0, top_k=1),
    dict(temperature=2.0, top_p=0.05),
]


@pytest.mark.parametrize("opts", SAMPLING, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_sample_matches_host_sampler(gpu, cpu, opts):
    """The device sampler picks the same ids as mambart::Sampler given the same draws."""
    rng = np.random.default_rng(11)
    B, V = 6, 300
    agree = total = 0
    for counter in range(25):
        logits = rnd(rng, B, V, scale=3.0)
        logits[0, 10] = logits[0, 20] = logits[0].max() + 1.0  # a tie: lower id wins
        seen = (rng.random((B, V)) < 0.05).astype(np.uint8)
        ids_g, seen_g = gpu.sample(logits, seed=5, counter=counter, seen=seen, **opts)
        ids_c, seen_c = cpu.sample(logits, seed=5, counter=counter, seen=seen, **opts)
        agree += int((ids_g == ids_c).sum())
        total += B
        np.testing.assert_array_equal(seen_g[ids_g == ids_c], seen_c[ids_g == ids_c])
    assert agree == total, f"{total - agree} of {total} draws differ"


def test_sample_large_vocab_and_nonfinite(gpu, cpu):
    rng = np.random.default_rng(12)
    logits = rnd(rng, 3, 50280, scale=2.0)
    for opts in SAMPLING:
        ids_g, _ = gpu.sample(logits, seed=1, counter=3, **opts)
        ids_c, _ = cpu.sample(logits, seed=1, counter=3, **opts)
        np.testing.assert_array_equal(ids_g, ids_c, err_msg=str(opts))
    logits[1, 7] = np.nan
    ids_g, _ = gpu.sample(logits, temperature=0.0)
    assert ids_g[1] == -1 and ids_g[0] >= 0 and ids_g[2] >= 0


# Degenerate distributions (issue 23, class 4): the device sampler's one argmax helper
# (block_argmax in cuda/sampling.cu) serves both the scaled maximum and the greedy fallback, and
# must pick what mambart::Sampler picks where 1/T overflows, the scaled logits overflow to
# +-inf, top-p keeps a single token, or every logit is far below one.
DEGENERATE = [
    dict(temperature=1e-38),
    dict(temperature=1e-39),
    dict(temperature=1e-45),                       # 1/T = inf
    dict(temperature=3e-39, top_k=5),
    dict(temperature=1e-38, top_p=0.9, min_p=0.1),
    dict(temperature=1e-38, repetition_penalty=1e-38),
    dict(temperature=1.0),                         # huge logits at an ordinary temperature
    dict(temperature=1.0, top_p=1e-7),             # top_p tiny: the most likely token
    dict(temperature=0.5, top_p=1e-30, top_k=3),
    dict(temperature=0.0, repetition_penalty=1e-30),
]


def _tie_id(V):
    return 7 if V > 9 else 1


def _degenerate_logits(rng, V):
    big = np.float32(3e38)
    rows = [rnd(rng, V, scale=3.0)]                     # ordinary
    r = np.full(V, -big, np.float32)
    r[V // 3] = 0.0
    rows.append(r)                                      # all -3e38 (-inf once scaled) but one
    rows.append(np.clip(rnd(rng, V, scale=1e38), -big, big))  # huge logits, either sign
    rows.append(np.full(V, 2.5, np.float32))            # all equal: the lowest id
    r = np.full(V, -1e30, np.float32)
    r[[_tie_id(V), V - 2]] = big                        # a tie at the largest float
    rows.append(r)
    return np.stack(rows)


@pytest.mark.parametrize("V", [5, 1031, 50280])
@pytest.mark.parametrize("opts", DEGENERATE,
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_sample_degenerate_matches_host_sampler(gpu, cpu, opts, V):
    rng = np.random.default_rng(14)
    logits = _degenerate_logits(rng, V)
    seen = (rng.random(logits.shape) < 0.1).astype(np.uint8)
    for counter in range(3):
        ids_g, seen_g = gpu.sample(logits, seed=9, counter=counter, seen=seen, **opts)
        ids_c, seen_c = cpu.sample(logits, seed=9, counter=counter, seen=seen, **opts)
        np.testing.assert_array_equal(ids_g, ids_c, err_msg=f"V={V} {opts}")
        np.testing.assert_array_equal(seen_g, seen_c)
    assert ids_g[1] == V // 3, ids_g  # the one logit far above the others
    # Greedy where a row's scaled distribution is degenerate (1/T or its largest logit / T
    # overflows float32), or where top_p keeps only the most likely token. At T = 1e-38 the
    # all-equal row 3 scales to 2.5e38, still finite: a uniform draw there, as on the host.
    with np.errstate(over="ignore", divide="ignore"):
        T = np.float32(opts["temperature"])
        inv_t = np.float32(1.0) / T if T > 0 else np.float32(np.inf)
        row3_inf = not np.isfinite(np.float32(2.5) * inv_t)
    tiny_p = opts.get("top_p", 1.0) < 1e-6
    if "repetition_penalty" not in opts and (row3_inf or tiny_p):
        assert ids_g[3] == 0, ids_g  # ties: the lowest id
    if "repetition_penalty" not in opts and (opts["temperature"] < 1e-30 or tiny_p):
        assert ids_g[4] == _tie_id(V), ids_g  # 3e38 / T overflows: greedy, lowest id of the tie
    if T > 0 and not np.isfinite(inv_t):  # the T -> 0 limit: greedy on the penalised logits
        greedy = {k: v for k, v in opts.items() if k == "repetition_penalty"}
        ids_0, _ = gpu.sample(logits, temperature=0.0, seen=seen, **greedy)
        np.testing.assert_array_equal(ids_g, ids_0)


def test_sample_nonfinite_logits_are_refused(gpu, cpu):
    """NaN or infinite logits: -1 from the device sampler (as from the raw CPU entry point) in
    that row only, at every temperature; the generator turns it into an error naming the row."""
    rng = np.random.default_rng(15)
    logits = rnd(rng, 4, 1000)
    logits[1, 3] = np.nan
    logits[2, :] = -np.inf
    logits[2, 5] = 0.0  # all -inf but one: still not a distribution the sampler accepts
    logits[3, 999] = np.inf
    for opts in (dict(temperature=0.0), dict(temperature=1.0), dict(temperature=1e-45),
                 dict(temperature=0.7, top_k=5, top_p=0.5)):
        ids_g, _ = gpu.sample(logits, seed=2, **opts)
        ids_c, _ = cpu.sample(logits, seed=2, **opts)
        assert ids_g.tolist()[1:] == [-1, -1, -1] and ids_g[0] >= 0, (opts, ids_g)
        np.testing.assert_array_equal(ids_g, ids_c)


def test_model_with_nonfinite_logits_raises_on_both_backends(tmp_path):
    """An lm_head whose products overflow float32 (finite weights, so the model loads): the
    decode fast path (device sampling) and the CPU backend both raise naming the non-finite
    logit, never return a token drawn from it."""
    import mambart
    from model_dirs import config_dict, model_tensors

    c = config_dict("mamba1", tie_embeddings=False)
    t = model_tensors(c)
    t["lm_head.weight"] = np.where(np.arange(t["lm_head.weight"].size).reshape(
        t["lm_head.weight"].shape) % 2 == 0, 3e38, -3e38).astype(np.float32)
    d = _model_dir(tmp_path / "m", "mamba1", tensors=t, tie_embeddings=False, d_model=16,
                   vocab_size=100, vocab_size_padded=104, d_inner=32, d_state=6, dt_rank=3)
    for device in ("cpu", "cuda"):
        for kw in (dict(), dict(temperature=1.0, seed=1), dict(temperature=1e-45)):
            with pytest.raises(RuntimeError, match="non-finite logit"):
                mambart.Generator(str(d), device=device).generate([1, 2, 3], max_new_tokens=4, **kw)


def test_batch_beyond_free_device_memory_is_refused(model_dirs, monkeypatch):
    """Issue 23, class 5: a batch whose kept states cannot fit the free device memory is
    refused before allocating, with the estimate (free memory capped by the test hook
    MAMBART_CUDA_FREE_BYTES_LIMIT), and the generator still works afterwards. (Without kept
    states the engine's device memory is its decode slots, bounded whatever the batch.)"""
    monkeypatch.setenv("MAMBART_CUDA_FREE_BYTES_LIMIT", str(64 << 20))
    g = _gen(model_dirs["m1"], "cuda", "float32")
    want = g.generate([1, 2, 3], max_new_tokens=5, ignore_eos=True).token_ids
    with pytest.raises(MemoryError, match=r"generating 20000 rows needs about \d+ bytes .* of "
                                          r"device memory .*the kept prompt and final states.* but "
                                          r"cuda:0.* has 67108864 bytes"):
        g.generate([[1, 2]] * 20000, max_new_tokens=1, return_state=True)
    assert g.generate([1, 2, 3], max_new_tokens=5, ignore_eos=True).token_ids == want
    assert len(g.generate([[1, 2]] * 64, max_new_tokens=2)) == 64  # a batch that fits runs


def test_bad_arguments_raise(gpu):
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(NotImplementedError, match="d_conv"):
        gpu.conv1d(np.zeros((1, 2, 4), np.float32), 4, np.zeros((1, 4, 9), np.float32),
                   np.zeros((4, 9), np.float32), None)
    with pytest.raises(ValueError, match="ngroups"):
        gpu.ssd_scan(np.zeros((1, 2, 40), np.float32), 8, 16, np.zeros((1, 2, 3), np.float32), 0,
                     None, np.zeros(3, np.float32), np.zeros(3, np.float32),
                     np.zeros(3, np.float32), 0.0, 1.0, np.zeros((1, 3, 2, 4), np.float32), 2, 4)
    with pytest.raises(ValueError):
        gpu.linear(x, np.zeros((3, 16), np.float32), "float32")  # K = 16 > ldx = 8
    with pytest.raises(ValueError):
        _C._ops.Backend("cuda:x")


def test_out_of_memory_is_a_python_error(gpu):
    with pytest.raises(RuntimeError, match="out of device memory"):
        gpu.alloc(1 << 50)
    gpu.alloc(1 << 20)  # the backend still works afterwards


# ---- whole models ---------------------------------------------------------------------------


def _model_dir(tmp, arch, dtype="float32", seed=0, **kw):
    sys.path.insert(0, os.path.dirname(__file__))
    from model_dirs import make_model_dir

    if arch == "mamba1":
        base = dict(d_model=64, n_layer=2, vocab_size=300, vocab_size_padded=304, d_inner=128,
                    d_state=16, dt_rank=4)
    else:
        base = dict(d_model=64, n_layer=2, vocab_size=300, vocab_size_padded=304, d_inner=128,
                    d_state=64, headdim=16, nheads=8, ngroups=2, chunk_size=16)
    base.update(kw)
    return make_model_dir(tmp, arch, dtype=dtype, seed=seed, **base)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    out = {}
    out["m1"] = _model_dir(tmp_path_factory.mktemp("m1"), "mamba1")
    out["m1-ln"] = _model_dir(tmp_path_factory.mktemp("m1ln"), "mamba1", norm="layernorm",
                              bias=True, d_conv=3, residual_in_fp32=False, tie_embeddings=False)
    out["m2"] = _model_dir(tmp_path_factory.mktemp("m2"), "mamba2")
    out["m2-g4"] = _model_dir(tmp_path_factory.mktemp("m2g4"), "mamba2", ngroups=4, d_state=128,
                              headdim=32, nheads=4, chunk_size=8, dt_limit=[0.01, 0.5],
                              gated_norm=False)
    return out


def _gen(path, device, dtype=None):
    import mambart

    return mambart.Generator(str(path), device=device, dtype=dtype)


def _ids(n, seed=0, V=300):
    return [int(t) for t in np.random.default_rng(seed).integers(0, V, size=n)]


@pytest.mark.parametrize("name", ["m1", "m1-ln", "m2", "m2-g4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_model_logits_cuda_vs_cpu(model_dirs, name, dtype):
    d = model_dirs[name]
    ids = _ids(150, seed=1)
    ref32 = _gen(d, "cpu", "float32").logits(ids)
    got = _gen(d, "cuda", dtype).logits(ids)
    assert got.shape == ref32.shape
    if dtype == "float32":
        close(got, ref32, 2e-4, f"{name} fp32")
    else:
        cpu_lp = _gen(d, "cpu", dtype).logits(ids)
        lowp_rule(got, cpu_lp, ref32, 2e-3 * max(1.0, float(np.abs(ref32).max())), f"{name} {dtype}")


@pytest.mark.parametrize("name", ["m1", "m2"])
def test_long_prompt_chunked_prefill(model_dirs, name):
    d = model_dirs[name]
    ids = _ids(1100, seed=2)  # > 2 prefill chunks of 512
    g, c = _gen(d, "cuda"), _gen(d, "cpu")
    a = g.generate(ids, max_new_tokens=8, ignore_eos=True)
    b = c.generate(ids, max_new_tokens=8, ignore_eos=True)
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("name", ["m1", "m2", "m2-g4"])
def test_prefill_equals_prefill_plus_steps_cuda(model_dirs, name):
    g = _gen(model_dirs[name], "cuda")
    ids = _ids(45, seed=3)
    full = g.logits(ids)
    steps = g._g.logits(ids, 1)
    chunked = g._g.logits(ids, 7)
    close(steps, full, 1e-4, "steps")
    close(chunked, full, 1e-4, "chunks of 7")


@pytest.mark.parametrize("name", ["m1", "m2"])
def test_decode_graph_steps_equal_prefill_logits(model_dirs, name):
    """The decode fast path (graph replay, device sampling) sees the logits a prefill of the
    same tokens gives: stream.last_logits at each step vs logits(prompt + generated)."""
    g = _gen(model_dirs[name], "cuda")
    prompt = _ids(20, seed=4)
    opts = _C.GenerationOptions()
    opts.max_new_tokens = 24
    opts.ignore_eos = True
    stream = g._g.start([prompt], opts)
    toks, step_logits = [], []
    while True:
        ev = stream.next()
        if ev is None:
            break
        step_logits.append(stream.last_logits[0].copy())
        toks += [t for _, t in ev]
    full = g.logits(prompt + toks)
    for i, lg in enumerate(step_logits):
        close(lg, full[len(prompt) - 1 + i], 1e-4, f"step {i}")
        assert int(np.argmax(lg)) == toks[i]


@pytest.mark.parametrize("name", ["m1", "m1-ln", "m2", "m2-g4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_decode_vs_unfused_and_cpu(model_dirs, monkeypatch, name, dtype):
    """Token-by-token forward (L = 1 per call: the fused decode mixers) against the unfused ops
    (MAMBART_CUDA_FUSED=0) and the CPU."""
    d = model_dirs[name]
    ids = _ids(40, seed=9)
    fused = _gen(d, "cuda", dtype)._g.logits(ids, 1)
    monkeypatch.setenv("MAMBART_CUDA_FUSED", "0")
    unfused = _gen(d, "cuda", dtype)._g.logits(ids, 1)
    monkeypatch.delenv("MAMBART_CUDA_FUSED")
    ref32 = _gen(d, "cpu", "float32").logits(ids)
    scale = max(1.0, float(np.abs(ref32).max()))
    if dtype == "float32":
        close(fused, unfused, 1e-4, f"{name} fused vs unfused")
        close(fused, ref32, 2e-4, f"{name} fused vs cpu")
    else:
        cpu_lp = _gen(d, "cpu", dtype).logits(ids)
        lowp_rule(fused, cpu_lp, ref32, 2e-3 * scale, f"{name} fused {dtype}")
        lowp_rule(unfused, cpu_lp, ref32, 2e-3 * scale, f"{name} unfused {dtype}")


@pytest.mark.parametrize("name", ["m2", "m2-g4"])
def test_prefill_chunked_ssd_equals_recurrent(model_dirs, monkeypatch, name):
    """Whole-model prefill: the chunked SSD kernels against the recurrent form
    (MAMBART_CUDA_SSD=recurrent), on a prompt of several chunks plus a partial one."""
    d = model_dirs[name]
    ids = _ids(301, seed=10)
    chunked = _gen(d, "cuda").logits(ids)
    monkeypatch.setenv("MAMBART_CUDA_SSD", "recurrent")
    recurrent = _gen(d, "cuda").logits(ids)
    close(chunked, recurrent, 1e-4, f"{name} chunked vs recurrent")


def _run_isolated(code, env):
    e = dict(os.environ)
    e.update(env)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=e)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


GEN_CODE = """
import json, sys, numpy as np
import mambart
g = mambart.Generator({path!r}, device="cuda")
prompts = [[int(t) for t in np.random.default_rng(s).integers(0, 300, size=n)]
           for s, n in ((1, 5), (2, 17), (3, 1))]
out = []
for kw in ({{}}, dict(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=7),
           dict(temperature=1.0, min_p=0.05, seed=3)):
    res = g.generate(prompts, max_new_tokens=40, ignore_eos=True, **kw)
    out.append([r.token_ids for r in res])
print(json.dumps(out))
"""


LOGITS_CODE = """
import hashlib, numpy as np
import mambart
g = mambart.Generator({path!r}, device="cuda", dtype={dtype!r})
ids = [int(t) for t in np.random.default_rng(9).integers(0, 300, size=150)]
full = g.logits(ids)
steps = g._g.logits(ids[:40], 1)
print(hashlib.sha256(full.tobytes() + steps.tobytes()).hexdigest())
"""


@pytest.mark.parametrize("name", ["m1-ln", "m2", "m2-g4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_ahead_kernels_are_bitwise_the_loops(model_dirs, name, dtype):
    """MAMBART_CUDA_LOAD_AHEAD (conv1d's register window, the gated RMSNorm's registers, the SSD
    state passing's lookahead) sums the same terms in the same order as the loops it replaces:
    a 150-token prefill's logits and 40 one-token steps are bitwise equal on and off."""
    code = LOGITS_CODE.format(path=str(model_dirs[name]), dtype=dtype)
    on = _run_isolated(code, {"MAMBART_CUDA_LOAD_AHEAD": "1"})
    off = _run_isolated(code, {"MAMBART_CUDA_LOAD_AHEAD": "0"})
    assert on == off


@pytest.mark.parametrize("name", ["m2", "m2-g4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_ssd_auto_picks_the_products_by_weight_dtype(model_dirs, name, dtype):
    """MAMBART_CUDA_SSD=auto: a Mamba-2 layer with bf16 weights runs the chunked SSD with plain
    TF32 products (bitwise what `tf32` gives), one with fp32 weights the split products (bitwise
    what `chunked` gives); the two forms differ, so the check can fail."""
    code = LOGITS_CODE.format(path=str(model_dirs[name]), dtype=dtype)
    half = dtype == "bfloat16"
    auto = _run_isolated(code, {"MAMBART_CUDA_SSD": "auto"})
    same = _run_isolated(code, {"MAMBART_CUDA_SSD": "tf32" if half else "chunked"})
    other = _run_isolated(code, {"MAMBART_CUDA_SSD": "chunked" if half else "tf32"})
    assert auto == same
    assert auto != other


@pytest.mark.parametrize("name", ["m1", "m1-ln", "m2", "m2-g4"])
def test_graph_replay_equals_eager_and_host_sampling(model_dirs, name):
    code = GEN_CODE.format(path=str(model_dirs[name]))
    graphs = _run_isolated(code, {})
    eager = _run_isolated(code, {"MAMBART_CUDA_GRAPHS": "0"})
    host = _run_isolated(code, {"MAMBART_DEVICE_SAMPLING": "0"})
    assert graphs == eager
    assert graphs == host
    # the unfused decode ops give the same greedy tokens (40 steps, 3 prompts)
    unfused = _run_isolated(code, {"MAMBART_CUDA_FUSED": "0"})
    assert json.loads(graphs)[0] == json.loads(unfused)[0]


@pytest.mark.parametrize("name", ["m1", "m1-ln", "m2", "m2-g4"])
def test_greedy_64_tokens_equal_cpu_fp32(model_dirs, name):
    prompts = [_ids(9, seed=5), _ids(30, seed=6)]
    a = _gen(model_dirs[name], "cuda").generate(prompts, max_new_tokens=64, ignore_eos=True)
    b = _gen(model_dirs[name], "cpu").generate(prompts, max_new_tokens=64, ignore_eos=True)
    for ra, rb in zip(a, b):
        assert ra.token_ids == rb.token_ids


def test_model_larger_than_free_memory_fails_at_load(model_dirs, monkeypatch):
    """The load-time check: weights that do not fit the free device memory are refused before
    the first allocation, with the bytes needed and free (free memory capped by the test hook
    MAMBART_CUDA_FREE_BYTES_LIMIT; a real model larger than the GPU cannot be written here)."""
    monkeypatch.setenv("MAMBART_CUDA_FREE_BYTES_LIMIT", "100000")
    with pytest.raises(Exception, match=r"the weights need \d+ bytes of device memory .* has "
                                        r"100000 bytes free"):
        _gen(model_dirs["m1"], "cuda", "float32")
    monkeypatch.setenv("MAMBART_CUDA_FREE_BYTES_LIMIT", str(1 << 40))
    _gen(model_dirs["m1"], "cuda", "float32")  # fits: loads


def test_auto_device_picks_cuda(model_dirs):
    g = _gen(model_dirs["m1"], "auto")
    assert g.device.startswith("cuda")


# ---- against transformers on the GPU --------------------------------------------------------


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_against_transformers_on_gpu(tmp_path, arch, dtype):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    sys.path.insert(0, os.path.dirname(__file__))
    import mambart
    from hf_models import build, mamba1_config, mamba2_config

    # ngroups 1 for Mamba-2: transformers before 5.2x normalised the gated RMSNorm over all of
    # d_inner instead of per group (the GPU machine has 5.17); with one group both agree.
    cfg = mamba1_config() if arch == "mamba1" else mamba2_config(n_groups=1)
    hf = build(cfg, tmp_path / "hf", seed=3)
    conv = mambart.convert(tmp_path / "hf", tmp_path / "mb")
    ids = _ids(37, seed=8, V=cfg.vocab_size)
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    dev = "cuda"
    with torch.no_grad():
        ref32 = hf.to(dev)(torch.tensor([ids], device=dev)).logits[0].float().cpu().numpy()
        hf_lp = hf.to(tdt)(torch.tensor([ids], device=dev)).logits[0].float().cpu().numpy()
    got = _gen(conv, "cuda", dtype).logits(ids)
    V = got.shape[1]
    ref32, hf_lp = ref32[:, :V], hf_lp[:, :V]
    scale = max(1.0, float(np.abs(ref32).max()))
    if dtype == "float32":
        close(got, ref32, 1e-3, "vs transformers fp32")
    else:
        # ours may not be worse than twice transformers' own low-precision error
        lowp_rule(got, hf_lp, ref32, 2e-3 * scale, f"vs transformers {dtype}")


# ---- chunked SSD on tensor cores at the real head shapes (issue 5) --------------------------
#
# cuda/ssd_chunked.cu runs its four matrix products (C·Bᵀ, M·X, Xᵀ·(w∘B), C'·Sᵀ) as TF32 WMMA
# with fp32 accumulation. Default: split TF32 (each operand v = hi + lo, hi = tf32(v),
# lo = tf32(v - hi); three products), about 21 bits per operand, so the fp32 tolerances of the
# tests above hold. MAMBART_CUDA_SSD=tf32: one product of TF32-rounded operands.
#
# The TF32 bound. Rounding an fp32 operand to TF32 (10 explicit mantissa bits, round to nearest)
# has relative error <= u = 2^-11. Every term of y passes through at most four such roundings:
#   Y_diag: CB = Σ tf32(C)·tf32(B) (2), M = tf32(CB·decay·δ) (1), tf32(x) (1);
#   Y_off:  S = decayed Σ tf32(x·w)·tf32(B) (2), tf32(S) (1), tf32(exp(Λ)·C) (1);
# and the state's terms through two. Accumulation is fp32 (K <= 256 terms: ~1e-5 relative, far
# below u). So, to first order, |y_tf32 - y| <= 4u · ŷ and |s_tf32 - s| <= 2u · ŝ, where ŷ, ŝ
# are the same scan run on |x|, |B|, |C|, |initial state| with D = 0 (the D skip is exact fp32)
# and scaled by |silu(z)| when gated: the sum of the absolute values of the terms, i.e. the
# output scale of each element before cancellation. The test allows 5u and 3u (second-order
# terms) plus 1e-5 of the output scale for the fp32 reference's own rounding. In practice the
# errors are ~1e-3 of max|y| (numpy emulation of the kernels' rounding: 2e-4 .. 1.4e-3).
#
# Whole models: in fp32, TF32's ~1e-3 relative error in y exceeds the fp32 logits tolerances
# of test_model_logits_cuda_vs_cpu (2e-4), test_prefill_equals_prefill_plus_steps_cuda (1e-4),
# test_prefill_chunked_ssd_equals_recurrent (1e-4), test_decode_graph_steps_equal_prefill_logits
# (1e-4) and most likely test_against_transformers_on_gpu[mamba2-float32] (1e-3): that is why
# the default is split TF32 and plain TF32 is opt-in.

TF32_U = 2.0 ** -11
SSD_REAL_L = [1, 255, 256, 257, 1000, 2048]


def _ssd_real_args(rng, B, L, H, G, pad, gate, P=64, N=128, Q=256):
    E = H * P
    xbc = rnd(rng, B, L, E + 2 * G * N + pad)  # pad 0: 16-byte rows (the vectorised loads)
    dt = rnd(rng, B, L, H + 4)
    dt[0, 0, 4] = 25.0  # the softplus threshold branch
    z = rnd(rng, B, L, E) if gate else None
    A = -np.exp(rnd(rng, H, scale=0.5))
    D, dtb = rnd(rng, H), rnd(rng, H, scale=0.5)
    state = rnd(rng, B, H, P, N, scale=0.5)
    return (xbc, E, E + G * N, dt, 4, z, A, D, dtb, 0.0, float("inf"), state, G, Q)


def _abs_scan(cpu, args):
    """ŷ, ŝ: the scan of the absolute values (see the TF32 bound above)."""
    xbc, b_off, c_off, dt, dt_off, z, A, D, dtb, lo, hi, state, G, Q = args
    y, s = cpu.ssd_scan(np.abs(xbc), b_off, c_off, dt, dt_off, None, A, np.zeros_like(D), dtb, lo,
                        hi, np.abs(state), G, Q)
    if z is not None:
        y = y * np.abs(z / (1.0 + np.exp(-z)))
    return y, s


@pytest.fixture(scope="module")
def cpu_chunked():
    """A CPU backend running the SSD in its chunked form (option cpu_ssd, read when a backend is
    made): the published shapes' default there is the recurrent scan, more accurate than any
    chunked form, so it is not the bound for the GPU's chunked one."""
    import mambart

    mambart.set_options(cpu_ssd="chunked")
    try:
        return _C._ops.Backend("cpu")
    finally:
        mambart.set_options(cpu_ssd=None)


@pytest.mark.parametrize("L", SSD_REAL_L)
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("G", [1, 2])
def test_ssd_chunked_real_heads(gpu, cpu_chunked, L, B, G):
    """Default (split TF32) chunked SSD at mamba2-1.3b's head shape (headdim 64, d_state 128,
    chunk 256; 8 heads here), nonzero initial state, against the CPU backend's chunked form
    (fp32) and the float64 recurrence with the fp32 tolerances of
    test_ssd_chunked_vs_cpu_and_f64."""
    cpu = cpu_chunked
    rng = np.random.default_rng(L * 31 + B * 7 + G)
    args = _ssd_real_args(rng, B, L, 8, G, pad=0 if L % 2 else 3, gate=L % 3 != 0)
    y_g, s_g = gpu.ssd_scan(*args)
    y_c, s_c = cpu.ssd_scan(*args)
    close(y_g, y_c, 1e-4, "y")
    close(s_g, s_c, 1e-4, "state")
    y64, s64 = _ssd_f64(*args[:-1])
    for got, ref, f64, what in ((y_g, y_c, y64, "y"), (s_g, s_c, s64.reshape(s_g.shape), "s")):
        e_gpu = float(np.abs(got - f64).max())
        e_cpu = float(np.abs(ref - f64).max())
        atol = 1e-5 * max(1.0, float(np.abs(f64).max()))
        assert e_gpu <= 2 * e_cpu + atol, f"{what}: gpu err {e_gpu:.3g}, cpu err {e_cpu:.3g}"


@pytest.mark.parametrize("B,L,H,G", [(1, 1000, 64, 1), (2, 513, 64, 1)])
def test_ssd_chunked_real_model_heads(gpu, cpu, B, L, H, G):
    """All 64 heads of mamba2-1.3b (the grid's H * P-tile * N-tile = 128 blocks per chunk)."""
    rng = np.random.default_rng(L + H)
    args = _ssd_real_args(rng, B, L, H, G, pad=0, gate=True)
    y_g, s_g = gpu.ssd_scan(*args)
    y_c, s_c = cpu.ssd_scan(*args)
    close(y_g, y_c, 1e-4, "y")
    close(s_g, s_c, 1e-4, "state")


@pytest.fixture(scope="module")
def gpu_tf32():
    return cuda_backend_with("MAMBART_CUDA_SSD", "tf32")


@pytest.mark.parametrize("L", SSD_REAL_L)
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("G", [1, 2])
def test_ssd_chunked_tf32_real_heads(gpu, gpu_tf32, cpu, L, B, G):
    """Plain TF32 (MAMBART_CUDA_SSD=tf32) within the TF32 bound above, per element."""
    rng = np.random.default_rng(L * 37 + B * 5 + G)
    args = _ssd_real_args(rng, B, L, 8, G, pad=0 if L % 2 else 3, gate=L % 3 != 1)
    y_t, s_t = gpu_tf32.ssd_scan(*args)
    y_c, s_c = cpu.ssd_scan(*args)
    y_abs, s_abs = _abs_scan(cpu, args)
    y_atol = 1e-5 * max(1.0, float(np.abs(y_c).max()))
    s_atol = 1e-5 * max(1.0, float(np.abs(s_c).max()))
    e_y, e_s = np.abs(y_t - y_c), np.abs(s_t - s_c)
    bad_y = e_y > 5 * TF32_U * y_abs + y_atol
    bad_s = e_s > 3 * TF32_U * s_abs + s_atol
    assert not bad_y.any(), (f"y: {int(bad_y.sum())} elements past the TF32 bound; max err "
                             f"{e_y.max():.3g}, max|y| {np.abs(y_c).max():.3g}")
    assert not bad_s.any(), (f"state: {int(bad_s.sum())} elements past the TF32 bound; max err "
                             f"{e_s.max():.3g}, max|s| {np.abs(s_c).max():.3g}")
    if L > 1:  # the switch took effect: plain TF32 rounds differently from the split form
        y_g, _ = gpu.ssd_scan(*args)
        assert not np.array_equal(y_t, y_g)


# ---- Mamba-1 scan: the chunked (time-parallel) form for long prompts --------------------------
# The CUDA backend runs the selective scan in segments (cuda/selective_scan.cu) when L >= 64
# and the GPU is not already filled by B x E: by default where a thread owns a channel
# (d_state <= 16), for every d_state under MAMBART_CUDA_SCAN=chunked. Both forms, in both
# channel mappings (a thread per channel for N = 16 and 5, lane groups for N = 64 and 130; and
# MAMBART_CUDA_SCAN=lanes, the lane groups for N <= 16 too) are checked against the CPU backend
# and each other.


@pytest.fixture(scope="module")
def gpu_scan_chunked():
    """A CUDA backend that runs every long Mamba-1 scan in the chunked form
    (MAMBART_CUDA_SCAN=chunked)."""
    return cuda_backend_with("MAMBART_CUDA_SCAN", "chunked")


@pytest.fixture(scope="module")
def gpu_scan_sequential():
    """A CUDA backend whose Mamba-1 scan is always sequential (MAMBART_CUDA_SCAN is read when
    the backend is made)."""
    return cuda_backend_with("MAMBART_CUDA_SCAN", "sequential")


@pytest.fixture(scope="module")
def gpu_scan_lanes():
    """A CUDA backend whose Mamba-1 scan is the sequential lane-group kernel at every d_state
    (MAMBART_CUDA_SCAN=lanes: the default before the thread-per-channel kernels)."""
    return cuda_backend_with("MAMBART_CUDA_SCAN", "lanes")


def _scan_args(rng, B, L, E, N, decay):
    """selective_scan arguments; decay "slow" (|δA| ~ 1e-3) makes the state carry over
    thousands of tokens, so every segment's entry state and the initial state matter."""
    X = 3 + 2 * N + 2  # x_proj output [dt_low (3) | B | C] plus 2 padding columns
    x, dt = rnd(rng, B, L, E), rnd(rng, B, L, E)
    dt[0, 0, 0] = 30.0  # the softplus threshold branch
    bc = rnd(rng, B, L, X)
    z = rnd(rng, B, L, 2 * E)
    A = -np.exp(rnd(rng, E, N, scale=0.5))
    if decay == "slow":
        A *= np.float32(1e-3)
        dt -= np.float32(2.0)
    D, dtb = rnd(rng, E), rnd(rng, E, scale=0.5)
    state = rnd(rng, B, E, N)
    return (x, dt, bc, 3, 3 + N, z, E, A, D, dtb, state)


# L: 63 (sequential: below the threshold), 64 (two segments), 65 (a one-token last segment),
# 300, 2048, 4100 (many segments, a partial last one). E: 37 and 100 are not multiples of the
# channels per block (8 for N = 16, 16 for N = 5); N = 64 and 130 take 2 and 8 states per lane.
@pytest.mark.parametrize("B,L", [(1, 63), (1, 64), (3, 65), (1, 300), (3, 300), (1, 2048),
                                 (3, 2048), (1, 4100), (3, 4100)])
@pytest.mark.parametrize("E,N", [(37, 16), (100, 5), (24, 64), (9, 130)])
@pytest.mark.parametrize("decay", ["fast", "slow"])
def test_selective_scan_long(gpu_scan_chunked, gpu_scan_sequential, cpu, B, L, E, N, decay):
    rng = np.random.default_rng(B * 7919 + L * 31 + E * N + (decay == "slow"))
    args = _scan_args(rng, B, L, E, N, decay)
    y_g, s_g = gpu_scan_chunked.selective_scan(*args)
    y_s, s_s = gpu_scan_sequential.selective_scan(*args)
    y_c, s_c = cpu.selective_scan(*args)
    assert np.isfinite(y_g).all() and np.isfinite(s_g).all()
    close(y_g, y_c, 5e-5, "y vs cpu")
    close(s_g, s_c, 5e-5, "state vs cpu")
    # Both forms are within 5e-5 of the CPU; against each other, within the sum of those bounds
    # (measured on an H100: up to 3.5e-5 of the scale on slow-decay 4100-token scans, whose
    # states sum thousands of terms in different orders).
    close(y_g, y_s, 1e-4, "y vs sequential")
    close(s_g, s_s, 1e-4, "state vs sequential")


# Model-sized channel counts, where the segment length comes from the heuristic (not its
# 32-token floor): mamba-130m-like E = 1536 and mamba-1.4b-like E = 4096 (a 512-token prefill
# chunk), and a batch of 2 with E = 2560.
@pytest.mark.parametrize("B,L,E", [(1, 512, 1536), (1, 2048, 1536), (1, 512, 4096),
                                   (2, 512, 2560)])
def test_selective_scan_long_real_width(gpu, gpu_scan_chunked, gpu_scan_sequential,
                                       gpu_scan_lanes, cpu, B, L, E):
    rng = np.random.default_rng(L + E + B)
    args = _scan_args(rng, B, L, E, 16, "slow")
    y_g, s_g = gpu_scan_chunked.selective_scan(*args)
    y_s, s_s = gpu_scan_sequential.selective_scan(*args)
    y_l, s_l = gpu_scan_lanes.selective_scan(*args)
    y_d, s_d = gpu.selective_scan(*args)  # the default: chunked, a thread per channel
    y_c, s_c = cpu.selective_scan(*args)
    close(y_g, y_c, 5e-5, "y vs cpu")
    close(s_g, s_c, 5e-5, "state vs cpu")
    close(y_l, y_c, 5e-5, "lanes y vs cpu")
    close(s_l, s_c, 5e-5, "lanes state vs cpu")
    np.testing.assert_array_equal(y_d, y_g)  # the same kernels as MAMBART_CUDA_SCAN=chunked
    np.testing.assert_array_equal(s_d, s_g)
    # Both forms are within 5e-5 of the CPU; against each other, within the sum of those bounds
    # (measured on an H100: up to 3.5e-5 of the scale on slow-decay 4100-token scans, whose
    # states sum thousands of terms in different orders).
    close(y_g, y_s, 1e-4, "y vs sequential")
    close(s_g, s_s, 1e-4, "state vs sequential")


def test_selective_scan_long_then_decode(gpu_scan_chunked, cpu):
    """A chunked prefill's final state continues exactly: prefill(L) then single-token scans
    equal prefill(L + k) on the CPU."""
    rng = np.random.default_rng(5)
    B, L, k, E, N = 2, 700, 3, 40, 16
    x, dt, bc, b_off, c_off, z, z_off, A, D, dtb, state = _scan_args(rng, B, L + k, E, N, "slow")
    y_ref, s_ref = cpu.selective_scan(x, dt, bc, b_off, c_off, z, z_off, A, D, dtb, state)
    ys = []
    y, s = gpu_scan_chunked.selective_scan(x[:, :L], dt[:, :L], bc[:, :L], b_off, c_off, z[:, :L], z_off, A,
                              D, dtb, state)
    ys.append(y)
    for t in range(L, L + k):
        sl = slice(t, t + 1)
        y, s = gpu_scan_chunked.selective_scan(x[:, sl], dt[:, sl], bc[:, sl], b_off, c_off, z[:, sl], z_off,
                                  A, D, dtb, s)
        ys.append(y)
    close(np.concatenate(ys, axis=1), y_ref, 5e-5, "y")
    close(s, s_ref, 5e-5, "state")


def _prefill_then_steps(g, ids, n_new):
    """The logits after prefilling `ids` in one go (generate's big prefill chunks), then after
    each of n_new greedy steps; and the tokens."""
    opts = _C.GenerationOptions()
    opts.max_new_tokens = n_new
    opts.ignore_eos = True
    stream = g._g.start([ids], opts)
    logits, toks = [], []
    while True:
        ev = stream.next()
        if ev is None:
            break
        logits.append(stream.last_logits[0].copy())
        toks += [t for _, t in ev]
    return np.stack(logits), toks


@pytest.mark.parametrize("name", ["m1", "m1-ln"])
def test_prefill_chunked_scan_equals_sequential(model_dirs, monkeypatch, name):
    """Whole-model prefill of 1100 tokens (one scan call of 35 segments) and decode steps from
    its final state: the chunked Mamba-1 scan against the sequential kernel
    (MAMBART_CUDA_SCAN=sequential) and against the CPU."""
    d = model_dirs[name]
    ids = _ids(1100, seed=11)
    monkeypatch.setenv("MAMBART_CUDA_SCAN", "chunked")
    chunked, t_chunked = _prefill_then_steps(_gen(d, "cuda"), ids, 4)
    monkeypatch.setenv("MAMBART_CUDA_SCAN", "sequential")
    sequential, t_sequential = _prefill_then_steps(_gen(d, "cuda"), ids, 4)
    monkeypatch.setenv("MAMBART_CUDA_SCAN", "lanes")
    lanes, t_lanes = _prefill_then_steps(_gen(d, "cuda"), ids, 4)
    monkeypatch.delenv("MAMBART_CUDA_SCAN")
    ref, t_ref = _prefill_then_steps(_gen(d, "cpu", "float32"), ids, 4)
    assert t_chunked == t_sequential == t_lanes == t_ref
    close(chunked, sequential, 1e-4, f"{name} chunked vs sequential")
    close(chunked, lanes, 1e-4, f"{name} chunked vs lanes")
    close(chunked, ref, 2e-4, f"{name} chunked vs cpu")


def _batch_steps(g, prompts, n_new):
    """Per-step logits (steps, rows, V) and each row's tokens of a greedy batch."""
    opts = _C.GenerationOptions()
    opts.max_new_tokens = n_new
    opts.ignore_eos = True
    stream = g._g.start(prompts, opts)
    logits, toks = [], [[] for _ in prompts]
    while True:
        ev = stream.next()
        if ev is None:
            break
        logits.append(stream.last_logits.copy())
        for row, t in ev:
            toks[row].append(t)
    return np.stack(logits), toks


@pytest.mark.parametrize("name", ["m1", "m1-ln"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mamba1_decode_large_batch(model_dirs, monkeypatch, name, dtype):
    """Mamba-1 decode beyond MAMBART_CUDA_FUSED_MAX_BATCH (8) rows runs the separate ops:
    dt_proj as a GEMM and the scan with a thread per channel at L = 1. On a batch of 34 rows:
    the default against the fused lane-group step (the switch raised), the unfused ops
    (MAMBART_CUDA_FUSED=0) and the CPU; on one row, the fused step
    against the unfused ops. (MAMBART_CUDA_FUSED=0 also unfuses the staged prefill's
    single-token stages of a few rows, so it is compared within rounding, not bitwise.)"""
    d = model_dirs[name]
    prompts = [_ids(3 + 5 * i % 37, seed=100 + i) for i in range(34)]
    runs = {}
    for label, env in [("default", {}), ("fused", {"MAMBART_CUDA_FUSED_MAX_BATCH": "100000"}),
                       ("unfused", {"MAMBART_CUDA_FUSED": "0"})]:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        runs[label] = _batch_steps(_gen(d, "cuda", dtype), prompts, 5)
        for k in env:
            monkeypatch.delenv(k)
    one_fused = _batch_steps(_gen(d, "cuda", dtype), prompts[:1], 5)
    monkeypatch.setenv("MAMBART_CUDA_FUSED", "0")
    one_unfused = _batch_steps(_gen(d, "cuda", dtype), prompts[:1], 5)
    monkeypatch.delenv("MAMBART_CUDA_FUSED")
    got = runs["default"][0]
    if dtype == "float32":
        close(got, runs["unfused"][0], 1e-5, f"{name} default vs unfused")
        ref32, ref_toks = _batch_steps(_gen(d, "cpu", "float32"), prompts, 5)
        close(got, runs["fused"][0], 1e-4, f"{name} unfused vs fused")
        close(one_unfused[0], one_fused[0], 1e-4, f"{name} one row")
        close(got, ref32, 2e-4, f"{name} vs cpu")
        assert runs["default"][1] == runs["fused"][1] == runs["unfused"][1] == ref_toks
        assert one_unfused[1] == one_fused[1] == ref_toks[:1]
    else:
        # The fused and unfused steps differ in dt_proj's rounding (a bf16 GEMM vs an fp32
        # dot product) and the scan's summation order, so logits agree to bf16 rounding; near
        # ties may then pick other tokens, so tokens are compared on fp32 only (above).
        close(got[:2], runs["fused"][0][:2], 5e-2, f"{name} unfused vs fused {dtype}")
        close(got[:2], runs["unfused"][0][:2], 5e-2, f"{name} default vs unfused {dtype}")
        close(one_unfused[0][:2], one_fused[0][:2], 5e-2, f"{name} one row {dtype}")
        assert np.isfinite(got).all()


@pytest.mark.parametrize("shape", ["m2", "m2-g4", "m2-n48"])
@pytest.mark.parametrize("state", ["float32", "bfloat16"])
def test_mamba2_decode_large_batch(model_dirs, tmp_path, monkeypatch, shape, state):
    """Mamba-2's fused decode step (MAMBART_CUDA_M2_DECODE_WIDE=1: at every batch size) at a
    batch wide enough for its 64-rows-a-block form (72 rows:
    H x 72 >= 2 blocks per SM on an H100 / H200) with each state access width: N = 64 (2 states
    a lane access), 128 (4) and 48 (1); fp32 and bf16 state storage. Against the separate
    conv1d + ssd_scan ops (MAMBART_CUDA_FUSED=0, same state storage) and, for the fp32 state,
    the CPU (logits and greedy tokens)."""
    d = model_dirs[shape] if shape in model_dirs else _model_dir(tmp_path, "mamba2", d_state=48)
    prompts = [_ids(2 + 3 * i % 23, seed=300 + i) for i in range(72)]

    def run(device, env):
        import mambart

        for k, v in env.items():
            monkeypatch.setenv(k, v)
        try:
            g = mambart.Generator(str(d), device=device, dtype="float32", state_dtype=state)
            return _batch_steps(g, prompts, 6)
        finally:
            for k in env:
                monkeypatch.delenv(k)

    fused = run("cuda", {"MAMBART_CUDA_M2_DECODE_WIDE": "1"})
    unfused = run("cuda", {"MAMBART_CUDA_FUSED": "0"})
    if state == "float32":
        close(fused[0], unfused[0], 1e-4, f"{shape} fused vs unfused")
        ref = run("cpu", {})
        close(fused[0], ref[0], 2e-4, f"{shape} fused vs cpu")
        assert fused[1] == unfused[1] == ref[1]
    else:
        # Both round the state to bf16 after every token; the fused step sums its n in
        # another order, so a stored state may differ by one bf16 ulp from the separate ops'.
        close(fused[0], unfused[0], 2e-2, f"{shape} fused vs unfused, bf16 state")
        assert np.isfinite(fused[0]).all()


@pytest.mark.parametrize("name", ["m1", "m2-g4"])
def test_gemv_tc_decode_batch(model_dirs, monkeypatch, name):
    """A bf16 decode batch of 12 rows (its projections on the tensor-core GEMV with
    MAMBART_CUDA_GEMV_TC=1, through the CUDA graph) against the default (cuBLAS) path: both
    round the rows to bf16 for the products, so logits agree to bf16 rounding."""
    d = model_dirs[name]
    prompts = [_ids(3 + 2 * i, seed=500 + i) for i in range(12)]
    base = _batch_steps(_gen(d, "cuda", "bfloat16"), prompts, 6)
    monkeypatch.setenv("MAMBART_CUDA_GEMV_TC", "1")
    got = _batch_steps(_gen(d, "cuda", "bfloat16"), prompts, 6)
    monkeypatch.delenv("MAMBART_CUDA_GEMV_TC")
    close(got[0][:2], base[0][:2], 5e-2, f"{name} gemv_tc vs cuBLAS")
    assert np.isfinite(got[0]).all()


@pytest.mark.parametrize("name", ["m1", "m2"])
def test_engine_launch_ahead_equals_plain_steps_cuda(model_dirs, name):
    """The engine launches the next decode before collecting the previous one's tokens (feeding
    the sampled ids in place) only while no row needs its final state; return_state=True turns
    that off. Sampled rows with their own seeds and lengths, some ending early on a stop id,
    must give the same tokens both ways (same kernels, same draws: the RNG counter of a decode
    launched ahead counts the token still in flight), and equal single-row runs."""
    g = _gen(model_dirs[name], "cuda")
    n = 6
    prompts = [_ids(3 + 2 * i, seed=70 + i) for i in range(n)]
    kw = dict(max_new_tokens=[9 + 4 * i for i in range(n)], temperature=0.9, top_p=0.95,
              seed=[100 + i for i in range(n)], ignore_eos=True)
    s0 = g.engine_stats()["steps_ahead"]
    ahead = g.generate(prompts, **kw)
    s1 = g.engine_stats()["steps_ahead"]
    plain = g.generate(prompts, return_state=True, **kw)
    assert g.engine_stats()["steps_ahead"] == s1, "return_state must not launch ahead"
    assert s1 - s0 > 0, "no decode was launched ahead"
    for a, p in zip(ahead, plain):
        assert a.token_ids == p.token_ids and a.finish_reason == p.finish_reason
        assert p.state.pending == 1  # the final state has not run the last token
    # A stop id taken from a row's own output ends it early, with the others still running.
    stop = ahead[2].token_ids[4]
    kw_stop = dict(kw, stop_token_ids=[stop])
    a2 = g.generate(prompts, **kw_stop)
    p2 = g.generate(prompts, return_state=True, **kw_stop)
    for a, p in zip(a2, p2):
        assert a.token_ids == p.token_ids and a.finish_reason == p.finish_reason
    # The switch (option engine_launch_ahead): off, no decode runs ahead and nothing changes.
    import mambart

    mambart.set_options(engine_launch_ahead=False)
    try:
        s2 = g.engine_stats()["steps_ahead"]
        off = g.generate(prompts, **kw)
        assert g.engine_stats()["steps_ahead"] == s2
    finally:
        mambart.set_options(engine_launch_ahead=None)
    assert [o.token_ids for o in off] == [a.token_ids for a in ahead]
    for i in (0, 2, 5):  # a per-row seed makes a row equal its single run
        one = g.generate(prompts[i], max_new_tokens=kw["max_new_tokens"][i], temperature=0.9,
                         top_p=0.95, seed=kw["seed"][i], ignore_eos=True)
        assert one.token_ids == ahead[i].token_ids, i


@pytest.mark.parametrize("name", ["m1", "m2"])
def test_engine_concurrent_streams_cuda(model_dirs, name):
    """The engine on CUDA (decode graph replay with device sampling, tokens handed out while the
    next step runs, slots growing, rows compacted with 2D copies as requests finish or are
    cancelled): 12 threads stream greedy requests of different lengths, two are cancelled
    mid-stream. Each survivor equals a lone CPU run of its prompt, except after a near tie
    (CPU top-2 logit gap < 1e-3) where float rounding may pick the other token."""
    import threading
    import time

    g = _gen(model_dirs[name], "cuda")
    c = _gen(model_dirs[name], "cpu")
    n = 12
    prompts = [_ids(2 + 3 * i, seed=40 + i) for i in range(n)]
    lengths = [6 + 5 * i for i in range(n)]
    got = [None] * n
    barrier = threading.Barrier(n)

    def client(i):
        barrier.wait()
        it = g.stream(prompts[i], max_new_tokens=10**6 if i in (3, 8) else lengths[i],
                      ignore_eos=True)
        out = []
        for tok in it:
            out.append(tok)
            if i in (3, 8) and len(out) == 7:
                it.close()
                break
        got[i] = out

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(n):
        want = c.generate(prompts[i], max_new_tokens=7 if i in (3, 8) else lengths[i],
                          ignore_eos=True).token_ids
        assert got[i] is not None and len(got[i]) == len(want), (i, got[i], want)
        k = next((j for j in range(len(want)) if got[i][j] != want[j]), None)
        if k is not None:  # only a near tie may differ
            lg = np.asarray(c.logits(prompts[i] + want[:k]))[-1]
            top2 = np.sort(lg)[-2:]
            assert top2[1] - top2[0] < 1e-3, (i, k, got[i], want)
    st = g.engine_stats()
    assert st["max_rows"] > 1 and st["cancelled"] >= 2 and st["finished"] == n, st
    deadline = time.time() + 10
    while g.engine_stats()["running"] and time.time() < deadline:
        time.sleep(0.01)
    assert g.engine_stats()["running"] == 0


# ---- Falcon-Mamba: mamba1 with weightless RMS norms on dt, B, C (dt_bc_rms_eps) ---------------


@pytest.mark.parametrize("n,d", [(1, 8), (7, 16), (64, 5), (130, 256)])
def test_add_norm_without_weight(gpu, cpu, n, d):
    rng = np.random.default_rng(n + d)
    res = rnd(rng, n, d)
    _, o_gpu = gpu.add_norm(res, None, None, None, "rms", 1e-6)
    _, o_cpu = cpu.add_norm(res, None, None, None, "rms", 1e-6)
    close(o_gpu, o_cpu, 2e-5, "weightless rms")


@pytest.fixture(scope="module", params=["falcon", "jamba"])
def falcon_dir(request, tmp_path_factory):
    """A tiny Falcon-Mamba directory (listed form, every layer mamba1 with dt_bc_rms_eps); or
    a Jamba-like one: mamba1 with the weighted dt / B / C norms (dt_bc_rms_weight), NoPE GQA
    attention, SwiGLU MLPs and MoEs with the full softmax (no shared expert)."""
    d = _model_dir(tmp_path_factory.mktemp(request.param), "mamba1", dt_rank=8,
                   tie_embeddings=False)
    from model_dirs import listed_mamba1, random_tensor, save_tensors

    cfg = listed_mamba1(json.loads((d / "config.json").read_text()), "falcon_mamba",
                        dt_bc_rms_eps=1e-6)
    if request.param == "jamba":
        m1 = dict(cfg["layers"][0], dt_bc_rms_weight=True)
        att = {"type": "attention", "num_heads": 8, "num_kv_heads": 2, "head_dim": 8,
               "rotary_dim": 0, "rope_theta": 10000.0, "window": 0, "qkv_bias": False,
               "out_bias": False, "scale": 8 ** -0.5, "max_context": 400, "fused_qkv": False,
               "d_conv": 0}
        moe = {"type": "moe", "num_experts": 6, "top_k": 2, "intermediate_size": 40,
               "shared_intermediate_size": 0, "activation": "swiglu", "normalize": False,
               "routed_scale": 1.0}
        mlp = {"type": "mlp", "intermediate_size": 96, "activation": "swiglu", "bias": False}
        cfg["layers"] = [m1, mlp, att, moe, m1, moe]
        cfg.update(architecture="jamba", n_layer=6)
        spec = _C.config_spec(json.dumps(dict(cfg, dtype="float32")), "jamba")
        rng = np.random.default_rng(9)
        save_tensors(d / "model.safetensors",
                     {s["name"]: random_tensor(s["name"], tuple(s["shape"]), rng)
                      for s in spec["tensors"]})
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("dtype", DTYPES)
def test_falcon_logits_cuda_vs_cpu(falcon_dir, dtype):
    ids = _ids(150, seed=21)
    ref32 = _gen(falcon_dir, "cpu", "float32").logits(ids)
    got = _gen(falcon_dir, "cuda", dtype).logits(ids)
    assert got.shape == ref32.shape
    if dtype == "float32":
        close(got, ref32, 2e-4, "falcon fp32")
    else:
        cpu_lp = _gen(falcon_dir, "cpu", dtype).logits(ids)
        lowp_rule(got, cpu_lp, ref32, 2e-3 * max(1.0, float(np.abs(ref32).max())),
                  f"falcon {dtype}")


def test_falcon_prefill_equals_prefill_plus_steps_cuda(falcon_dir):
    g = _gen(falcon_dir, "cuda")
    ids = _ids(45, seed=22)
    full = g.logits(ids)
    close(g._g.logits(ids, 1), full, 1e-4, "steps")
    close(g._g.logits(ids, 7), full, 1e-4, "chunks of 7")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_falcon_decode_graph_steps_equal_prefill_logits(falcon_dir, dtype):
    """The decode fast path (graph replay, device sampling; the fused Mamba-1 step is not used
    with the norms) of a batch of 3 rows: fp32 sees the logits a prefill of each row's tokens
    gives, bf16 those of eager decode steps (steps_match)."""
    g = _gen(falcon_dir, "cuda", dtype)
    prompts = [_ids(n, seed=23 + n) for n in (20, 5, 13)]
    toks, logits = stream_steps(g, prompts, 16)
    steps_match(g, falcon_dir, dtype, prompts, toks, logits, "falcon")
    cpu = _gen(falcon_dir, "cpu")
    if dtype == "float32":
        for r, p in enumerate(prompts):
            assert toks[r] == cpu.generate(p, max_new_tokens=16, ignore_eos=True).token_ids


# ---- attention and MLP layers, Nemotron-H-like hybrids (issue 19) ------------------------------

# (B, L, Hq, Hkv, hd, rotary_dim, window, n0 per row, max_ctx, max_splits)
ATTN_CASES = {
    "prefill-nope-gqa": (1, 77, 8, 2, 64, 0, 0, [0], 96, 0),
    "prefill-rope-cached": (2, 33, 4, 4, 24, 12, 0, [5, 40], 80, 0),
    "prefill-window": (1, 150, 4, 1, 128, 64, 37, [0], 160, 0),
    "prefill-hd256": (2, 19, 2, 1, 256, 256, 0, [0, 3], 24, 0),
    "prefill-hd8-odd": (3, 5, 6, 3, 8, 4, 3, [1, 0, 9], 16, 0),
    "decode-nosplit": (3, 1, 8, 2, 64, 32, 0, [0, 17, 200], 256, 0),
    "decode-split4": (3, 1, 8, 2, 64, 32, 0, [0, 17, 200], 256, 4),
    "decode-split64-few-keys": (2, 1, 4, 2, 128, 0, 0, [2, 9], 32, 64),
    "decode-split-window": (2, 1, 4, 4, 96, 48, 50, [300, 49], 512, 8),
}


@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_attention_op_cuda_vs_cpu(gpu, cpu, name):
    B, L, Hq, Hkv, hd, rd, win, n0, T, S = ATTN_CASES[name]
    rng = np.random.default_rng(len(name))
    qkv = rnd(rng, B, L, (Hq + 2 * Hkv) * hd)
    kc, vc = rnd(rng, B, T, Hkv, hd), rnd(rng, B, T, Hkv, hd)
    pos = np.array(n0, np.float32)
    args = (Hq, rd, 10000.0, win, hd ** -0.5, S)
    o_g, q_g, k_g, v_g, p_g = gpu.attention(qkv, kc, vc, pos, *args)
    o_c, q_c, k_c, v_c, p_c = cpu.attention(qkv, kc, vc, pos, *args)
    close(o_g, o_c, 2e-5, f"{name} o")
    close(q_g, q_c, 2e-5, f"{name} rotated q/k")
    close(k_g, k_c, 2e-5, f"{name} key cache")
    np.testing.assert_array_equal(v_g, v_c)
    np.testing.assert_array_equal(p_g, p_c)


def test_relu_sq_cuda(gpu, cpu):
    y = rnd(np.random.default_rng(3), 37, 101)
    np.testing.assert_array_equal(gpu.relu_sq(y), cpu.relu_sq(y))


@pytest.fixture(scope="module", params=["nemotron", "zamba2", "granite"])
def hybrid_dir(request, tmp_path_factory):
    """A Nemotron-H-like listed model: Mamba-2, NoPE GQA attention, relu² MLP blocks, a
    RoPE + window attention block with SwiGLU, and a mamba2attn block (fused qkv with a conv):
    the other options of the units; or a Zamba2-like one: Mamba-2 and zamba2_hybrid layers
    (a hybrid first: it norms its own input; RoPE MHA reading [h | embedding], a GeGLU MLP with
    biases, the mamba's gated_norm_eps and prefill-only dt clamp); or a Granite-4.0-H-like one
    (_granite_config: MoE blocks routed on the device, the multipliers)."""
    sys.path.insert(0, os.path.dirname(__file__))
    from model_dirs import random_tensor, save_tensors, write_config

    m2 = {"type": "mamba2", "d_inner": 128, "d_state": 32, "d_conv": 4, "conv_bias": True,
          "bias": False, "headdim": 16, "nheads": 8, "ngroups": 2, "chunk_size": 16,
          "dt_limit": [0.0, None], "gated_norm": True, "norm_before_gate": False}
    att = {"type": "attention", "num_heads": 8, "num_kv_heads": 2, "head_dim": 64,
           "rotary_dim": 0, "rope_theta": 10000.0, "window": 0, "qkv_bias": False,
           "out_bias": False, "scale": 0.125, "max_context": 400,
           "fused_qkv": False, "d_conv": 0}
    att2 = dict(att, rotary_dim=32, window=45, qkv_bias=True, num_kv_heads=4)
    mlp = {"type": "mlp", "intermediate_size": 160, "activation": "relu2", "bias": False}
    mlp2 = dict(mlp, activation="swiglu")
    # mamba_ssm's MHA (mamba2attn): fused in_proj, conv on qkv, partial RoPE, biases
    att3 = dict(att, fused_qkv=True, d_conv=4, rotary_dim=32, qkv_bias=True, out_bias=True,
                num_kv_heads=8)
    layers = [m2, mlp, att, m2, mlp2, att2, m2, att3]
    if request.param == "zamba2":
        zm = dict(m2, gated_norm_eps=1e-5, dt_limit_prefill_only=True)
        hyb = {"type": "zamba2_hybrid",
               "attention": dict(att, num_kv_heads=8, head_dim=16, rotary_dim=16, d_in=128),
               "mlp": dict(mlp, activation="geglu", bias=True, fused_gate_up=True),
               "mamba": zm}
        layers = [hyb, zm, zm, hyb, zm, hyb]
    c = {"mambart_format": 1, "architecture": request.param, "d_model": 64,
         "n_layer": len(layers), "vocab_size": 300, "vocab_size_padded": 304, "norm": "rmsnorm",
         "norm_eps": 1e-5, "residual_in_fp32": True, "tie_embeddings": False,
         "bos_token_id": None, "eos_token_id": 0, "pad_token_id": None, "dtype": "float32",
         "layers": layers}
    if request.param == "granite":  # (the layers above unused)
        c = _granite_config()
    spec = _C.config_spec(json.dumps(c), "hybrid")
    rng = np.random.default_rng(7)
    t = {s["name"]: random_tensor(s["name"], tuple(s["shape"]), rng) for s in spec["tensors"]}
    d = tmp_path_factory.mktemp("hybrid")
    write_config(d, c)
    save_tensors(d / "model.safetensors", t)
    return d


@pytest.mark.parametrize("dtype", DTYPES)
def test_hybrid_logits_cuda_vs_cpu(hybrid_dir, dtype):
    ids = _ids(170, seed=31)
    ref32 = _gen(hybrid_dir, "cpu", "float32").logits(ids)
    got = _gen(hybrid_dir, "cuda", dtype).logits(ids)
    if dtype == "float32":
        close(got, ref32, 2e-4, "hybrid fp32")
    else:
        cpu_lp = _gen(hybrid_dir, "cpu", dtype).logits(ids)
        lowp_rule(got, cpu_lp, ref32, 2e-3 * max(1.0, float(np.abs(ref32).max())),
                  f"hybrid {dtype}")


def test_hybrid_prefill_equals_prefill_plus_steps_cuda(hybrid_dir):
    g = _gen(hybrid_dir, "cuda")
    ids = _ids(90, seed=32)
    full = g.logits(ids)
    close(g._g.logits(ids, 1), full, 1e-4, "steps")
    close(g._g.logits(ids, 13), full, 1e-4, "chunks of 13")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hybrid_decode_graph_steps_equal_prefill_logits(hybrid_dir, dtype):
    """The decode fast path (graph replay with the KV caches' positions read on the device,
    split-K attention, device sampling) of 3 rows of different lengths: fp32 sees the logits a
    prefill of each row's tokens gives and the CPU's tokens, bf16 the logits of eager decode
    steps (steps_match)."""
    g = _gen(hybrid_dir, "cuda", dtype)
    prompts = [_ids(n, seed=33 + n) for n in (60, 5, 23)]
    toks, logits = stream_steps(g, prompts, 24)
    steps_match(g, hybrid_dir, dtype, prompts, toks, logits, "hybrid")
    if dtype == "float32":
        cpu = _gen(hybrid_dir, "cpu")
        for r, p in enumerate(prompts):
            assert toks[r] == cpu.generate(p, max_new_tokens=24, ignore_eos=True).token_ids


def test_hybrid_engine_and_state_files_cuda(hybrid_dir, tmp_path):
    """Continuation from a saved state (KV caches, positions) on the GPU == one run; the
    engine's continuous batching gives the single runs' tokens."""
    g = _gen(hybrid_dir, "cuda")
    prompt = _ids(31, seed=40)
    full = g.generate(prompt, max_new_tokens=20, ignore_eos=True)
    a = g.generate(prompt, max_new_tokens=8, ignore_eos=True, return_state=True)
    a.state.save(tmp_path / "s.safetensors")
    b = g.generate(None, state=g.load_state(tmp_path / "s.safetensors"), max_new_tokens=12,
                   ignore_eos=True)
    assert a.token_ids + b.token_ids == full.token_ids
    prompts = [_ids(n, seed=41 + n) for n in (7, 40, 19, 2)]
    singles = [g.generate(p, max_new_tokens=10, ignore_eos=True).token_ids for p in prompts]
    rows = g.generate(prompts, max_new_tokens=10, ignore_eos=True)  # the engine's batching
    assert [r.token_ids for r in rows] == singles


# ---- MoE layers, Granite-4.0-H-like hybrids (issue 19, item 4) ------------------------------

# (R, d, X, k, I, normalize, scale)
MOE_CASES = {
    "decode-1": (1, 64, 8, 2, 32, True, 1.0),
    "decode-batch": (5, 64, 8, 3, 48, True, 1.0),
    "prefill-full-softmax-scaled": (97, 96, 16, 4, 40, False, 2.5),
    "prefill-k-equals-X": (33, 32, 3, 3, 24, True, 1.0),
    "odd-sizes-k1": (19, 30, 5, 1, 13, False, 1.0),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(MOE_CASES))
def test_moe_op_cuda_vs_cpu(gpu, cpu, name, dtype):
    """Routing (ids identical, weights close) and the routed experts added into out: the CUDA
    gather GEMVs against the CPU's grouped GEMMs, on the same placed weights."""
    R, d, X, k, I, normalize, scale = MOE_CASES[name]
    rng = np.random.default_rng(len(name))
    x, logits = rnd(rng, R, d), rnd(rng, R, X)
    w_in, w_out = rnd(rng, X, 2 * I * d, scale=0.2), rnd(rng, X, d * I, scale=0.2)
    out0 = rnd(rng, R, d)
    args = (x, logits, w_in, w_out, dtype, k, I, normalize, scale, out0)
    o_g, r_g = gpu.moe(*args)
    o_c, r_c = cpu.moe(*args)
    np.testing.assert_array_equal(r_g[:, :k].view(np.int32), r_c[:, :k].view(np.int32))
    close(r_g[:, k:], r_c[:, k:], 1e-6, f"{name} weights")
    close(o_g, o_c, 2e-5, f"{name} {dtype} out")


def test_scale_cuda(gpu, cpu):
    y = rnd(np.random.default_rng(4), 1001)
    np.testing.assert_array_equal(gpu.scale(y, 0.22), cpu.scale(y, 0.22))


def _granite_config():
    """A Granite-4.0-H-like listed model: Mamba-2 and NoPE GQA attention mixers, each followed by
    an MoE FFN with a shared expert (or, once, the dense shared MLP with fused gate|up, and once
    an MoE without a shared expert and the full softmax), and the multipliers."""
    m2 = {"type": "mamba2", "d_inner": 128, "d_state": 32, "d_conv": 4, "conv_bias": True,
          "bias": False, "headdim": 16, "nheads": 8, "ngroups": 1, "chunk_size": 16,
          "dt_limit": [0.0, None], "gated_norm": True, "norm_before_gate": False}
    att = {"type": "attention", "num_heads": 8, "num_kv_heads": 2, "head_dim": 8,
           "rotary_dim": 0, "rope_theta": 10000.0, "window": 0, "qkv_bias": False,
           "out_bias": False, "scale": 0.2, "max_context": 400, "fused_qkv": False, "d_conv": 0}
    moe = {"type": "moe", "num_experts": 12, "top_k": 3, "intermediate_size": 40,
           "shared_intermediate_size": 96, "activation": "swiglu", "normalize": True,
           "routed_scale": 1.0}
    moe2 = dict(moe, shared_intermediate_size=0, normalize=False, routed_scale=1.5, top_k=2)
    mlp = {"type": "mlp", "intermediate_size": 96, "activation": "swiglu", "bias": False,
           "fused_gate_up": True}
    layers = [m2, moe, att, moe, m2, mlp, m2, moe2]
    return {"mambart_format": 1, "architecture": "granitemoehybrid", "d_model": 64,
            "n_layer": len(layers), "vocab_size": 300, "vocab_size_padded": 304,
            "norm": "rmsnorm", "norm_eps": 1e-5, "residual_in_fp32": True,
            "tie_embeddings": False, "bos_token_id": None, "eos_token_id": 0,
            "pad_token_id": None, "dtype": "float32", "embedding_multiplier": 4.0,
            "residual_multiplier": 0.5, "logits_scaling": 2.5, "layers": layers}
