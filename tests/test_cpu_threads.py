"""CPU threads (issue 22): the thread count as an option (Generator(threads=N), --threads, the
cpu_threads option; default: the cores of this process's CPU affinity), bad values refused
naming `threads`, and the CPU backend's own pool (cpp/cpu/pool.h) giving the same bits at every
thread count, leaving the caller's floating-point mode (MXCSR) as it found it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import mambart
from mambart import _C

from model_dirs import make_model_dir


@pytest.fixture(scope="module", params=["mamba1", "mamba2"])
def model_dir(request, tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp(request.param) / "m", request.param,
                          "float32", seed=3)


@pytest.mark.parametrize("bad", [0, -1, 4097, 1.5, True, "2", 2.0])
def test_bad_threads_refused(model_dir, bad):
    with pytest.raises(ValueError, match="threads"):
        mambart.Generator(model_dir, threads=bad)


def test_threads_property(model_dir):
    for n in (1, 3):
        g = mambart.Generator(model_dir, threads=n)
        assert g.threads == n
        assert g.device.startswith("cpu")


def test_same_bits_at_every_thread_count(model_dir):
    """Every op splits its work so that each output element is computed by one thread in a
    fixed order: logits and greedy tokens are identical for 1, 2 and 3 threads (a prompt longer
    than a Mamba-2 chunk: the chunked SSD path too)."""
    rng = np.random.default_rng(1)
    prompt = [int(t) for t in rng.integers(0, 100, size=300)]
    outs = []
    for n in (1, 2, 3):
        g = mambart.Generator(model_dir, threads=n)
        logits = np.asarray(g.logits(prompt))
        toks = g.generate(prompt[:40], max_new_tokens=24, ignore_eos=True).token_ids
        batch = [r.token_ids for r in g.generate([prompt[:9], prompt[:30]], max_new_tokens=12,
                                                 ignore_eos=True)]
        outs.append((logits, toks, batch))
    for logits, toks, batch in outs[1:]:
        assert np.array_equal(logits, outs[0][0])
        assert toks == outs[0][1]
        assert batch == outs[0][2]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("M,K,N", [(1, 768, 3000), (3, 200, 1000), (40, 96, 300)])
def test_linear_same_bits_on_the_pool(dtype, M, K, N):
    rng = np.random.default_rng(M + K + N)
    x = rng.standard_normal((M, K)).astype(np.float32)
    W = rng.standard_normal((N, K)).astype(np.float32)
    y1 = _C._ops.Backend("cpu", 1).linear(x, W, dtype)
    for n in (2, 5):
        be = _C._ops.Backend("cpu", n)
        assert be.threads == n
        assert np.array_equal(be.linear(x, W, dtype), y1), n


def test_cpu_threads_option(model_dir):
    try:
        mambart.set_options(cpu_threads=2)
        assert mambart.Generator(model_dir).threads == 2
        assert mambart.Generator(model_dir, threads=1).threads == 1  # the argument wins
    finally:
        mambart.set_options(cpu_threads=None)
    for bad in ("-1", "4097", "x"):
        with pytest.raises(ValueError, match="cpu_threads"):
            mambart.set_options(cpu_threads=bad)


_CHILD = r"""
import json, os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
import mambart
g = mambart.Generator(sys.argv[1])
print(json.dumps({"threads": g.threads}))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
def test_default_is_the_affinity():
    """With no threads=, option or OMP_NUM_THREADS, a process pinned to one core runs one
    thread (not os.cpu_count())."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MAMBART_CPU_THREADS")}
    d = make_model_dir(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"aff-{os.getpid()}"),
                       "mamba1", "float32")
    r = subprocess.run([sys.executable, "-c", _CHILD, str(d)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["threads"] == 1


def test_caller_floating_point_mode_restored(model_dir):
    """The pool runs with flush-to-zero / denormals-are-zero, and restores the calling thread's
    mode: a subnormal product computed here afterwards is still subnormal, not 0."""
    tiny, half = float(os.environ.get("_MAMBART_TINY", "1e-310")), 0.5
    assert tiny * half != 0.0
    g = mambart.Generator(model_dir, threads=2)
    g.generate(list(range(1, 40)), max_new_tokens=4, ignore_eos=True)
    g.logits([i % 100 for i in range(1, 300)])
    assert tiny * half != 0.0
    assert np.float32(1e-39) * np.float32(0.5) != 0.0


@pytest.mark.parametrize("chunk", [8, 64])
def test_ssd_forms_agree(tmp_path, chunk):
    """Mamba-2 prefill on the CPU: the chunked SSD and the recurrent scan (cpu_ssd; auto picks
    by shape) give the same logits within float32 rounding and the same greedy tokens, for
    prompts shorter and longer than a chunk."""
    d = make_model_dir(tmp_path / "m", "mamba2", "float32", seed=5, chunk_size=chunk)
    rng = np.random.default_rng(2)
    prompt = [int(t) for t in rng.integers(0, 100, size=150)]
    out = {}
    try:
        for form in ("chunked", "recurrent", "auto"):
            mambart.set_options(cpu_ssd=form)
            g = mambart.Generator(d, threads=2)
            out[form] = (np.asarray(g.logits(prompt)),
                         g.generate(prompt, max_new_tokens=16, ignore_eos=True).token_ids)
    finally:
        mambart.set_options(cpu_ssd=None)
    ref = out["recurrent"][0]
    for form in ("chunked", "auto"):
        np.testing.assert_allclose(out[form][0], ref, rtol=0, atol=2e-4 * np.abs(ref).max())
        assert out[form][1] == out["recurrent"][1]


def test_straggler_guard_runs_jobs_on_the_caller_while_a_worker_stalls():
    # Every chunk a worker runs sleeps 2 ms (a worker preempted mid-chunk by another process):
    # the caller's waits then dominate and the pool runs jobs on the caller alone (the straggler
    # guard, cpu/pool.h), so most of the 400 jobs see no worker; every item is still computed.
    serial, caller_only, correct = _C._ops.pool_straggler_probe(threads=2, jobs=400, sleep_us=2000)
    assert correct == 400 * 64
    assert serial >= 100, (serial, caller_only)
    assert caller_only >= serial

