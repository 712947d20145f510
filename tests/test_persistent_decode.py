"""Issue 16: the persistent batch-1 decode (option cuda_persistent_decode): a decode step's
Mamba-1 layers run as cooperative kernels (up to 16 layers a launch) whose stages meet at
grid-wide barriers instead of kernel boundaries. Each value is computed with the arithmetic of
the separate kernel it replaces, so tokens, logprobs and final states equal the separate ops'
bit for bit (fp32, fp16, bf16; RMSNorm and LayerNorm; the block-per-row and warp-per-row
GEMVs; every lane-group width of the scan; several launches a step). On the CPU the option is
accepted and changes nothing (the backend declines); models with other layer types decline too
and run the separate ops."""

from __future__ import annotations

import pytest

import mambart
from model_dirs import make_model_dir
from option_runs import generations, load

CASES = {
    "m1": ("mamba1", dict(d_model=64, d_inner=128, d_state=16, dt_rank=4)),
    "m1-ln": ("mamba1", dict(d_model=64, d_inner=128, d_state=16, dt_rank=4, norm="layernorm",
                             bias=True, d_conv=3, residual_in_fp32=False, tie_embeddings=False)),
    # d_state 5 (lane groups of 8), 48 (two states a lane), 100 (four)
    "m1-n5": ("mamba1", dict(d_model=64, d_inner=96, d_state=5, dt_rank=3)),
    "m1-n48": ("mamba1", dict(d_model=32, d_inner=64, d_state=48, dt_rank=6)),
    "m1-n100": ("mamba1", dict(d_model=32, d_inner=64, d_state=100, dt_rank=5)),
    # in_proj, out_proj and the head on the warp-per-row GEMV (>= 1024 rows), as real models
    "m1-wide": ("mamba1", dict(d_model=1280, d_inner=512, d_state=16, dt_rank=16,
                               vocab_size=1100, vocab_size_padded=1104, n_layer=2)),
    # 19 layers: two launches a step (16 + 3)
    "m1-deep": ("mamba1", dict(d_model=32, d_inner=64, d_state=16, dt_rank=2, n_layer=19)),
    # a layer type the persistent decode does not run: the separate ops
    "m2": ("mamba2", dict(d_model=64, d_inner=128, d_state=64, headdim=16, nheads=8, ngroups=2,
                          chunk_size=16)),
}
def model_dir(tmp_path, name):
    arch, kw = CASES[name]
    kw = dict(dict(n_layer=3, vocab_size=300, vocab_size_padded=304), **kw)
    return make_model_dir(tmp_path / name, arch, seed=3, **kw)


def runs(d, device, dtype, on, tmp_path):
    g = load(d, device, dtype, cuda_persistent_decode=on)
    out, state = generations(g, tmp_path / f"state-{device}-{dtype}-{int(on)}.bin")
    return out, state, g._g.persistent_decode_steps


def check(tmp_path, name, device, dtype):
    d = model_dir(tmp_path, name)
    plain, plain_state, n_off = runs(d, device, dtype, False, tmp_path)
    pers, pers_state, n_on = runs(d, device, dtype, True, tmp_path)
    assert n_off == 0
    ran = device == "cuda" and CASES[name][0] == "mamba1"
    assert (n_on > 0) == ran, n_on
    assert pers == plain
    assert pers_state == plain_state


@pytest.mark.parametrize("name", ["m1", "m1-ln", "m2"])
def test_persistent_decode_option_on_the_cpu_changes_nothing(tmp_path, name):
    check(tmp_path, name, "cpu", "float32")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_persistent_decode_equals_the_separate_ops_cuda(tmp_path, name, dtype):
    check(tmp_path, name, "cuda", dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_persistent_decode_weight_ring_cuda(tmp_path, name, dtype):
    """The weight ring (cp.async copies in flight through the barriers, each thread reading its
    own): the same rows and sums, so the same values; 19 layers check the stream across
    launches, d_state 48 / 100 and the narrow GEMVs check every job shape."""
    mambart.set_options(cuda_persistent_ring=16)
    try:
        check(tmp_path, name, "cuda", dtype)
    finally:
        mambart.set_options(cuda_persistent_ring=None)


@pytest.mark.cuda
def test_persistent_decode_without_graphs_cuda(tmp_path):
    """Eager decode steps (cuda_graphs off): a cooperative launch a step, the same values."""
    mambart.set_options(cuda_graphs=False)
    try:
        check(tmp_path, "m1-deep", "cuda", "float32")
    finally:
        mambart.set_options(cuda_graphs=None)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["m1-wide", "m1-n48"])
@pytest.mark.parametrize("knobs", [dict(cuda_persistent_warps=32), dict(cuda_persistent_rows=1),
                                   dict(cuda_persistent_prefetch=True), dict(cuda_persistent_ring=8),
                                   dict(cuda_persistent_ring=16), dict(cuda_persistent_ring=24)])
def test_persistent_decode_variants_cuda(tmp_path, name, knobs):
    """The 32-warp blocks (64 registers a thread), one row a warp at a time, the L2 prefetch,
    the weight ring at each depth: the same values."""
    mambart.set_options(**knobs)
    try:
        check(tmp_path, name, "cuda", "bfloat16")
    finally:
        mambart.set_options(**{k: None for k in knobs})
