"""The CPU projection kernels (issue 26): every path this CPU has (AVX2, NEON or NEON + BF16, and
the generic path forced with MAMBART_CPU_PORTABLE=1) against a float64 reference over fp32 /
fp16 / bf16 weights and shapes that hit every tile and tail; the kernel choice made at run time
and shown in the backend's name; the fp16 <-> fp32 conversions bit-exact. No torch: this file
also runs for aarch64 under qemu-user in CI (tools/ci_arm64.sh), once on qemu's `max` CPU (with
BF16: the BFMMLA kernel) and once on a Cortex-A53 (ARMv8.0-A: the plain NEON kernels), with
MAMBART_EXPECT_KERNELS naming the kernels each CPU model must get."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from mambart import _C

from model_dirs import make_model_dir

SHAPES = [  # (M, K, N): GEMV rows 1..16 (tiles of 4 / 2 / 1 weight rows; AVX-512: 8 / 4
    # rows; row blocks of 8 past 8), GEMM from 17, K tails
    (1, 64, 37), (1, 3, 5), (2, 24, 9), (3, 17, 11), (4, 40, 7), (5, 8, 3), (7, 33, 16),
    (8, 72, 21), (9, 16, 17), (13, 100, 33), (16, 19, 23), (17, 16, 17), (37, 130, 40),
    (64, 1, 2),
    # GEMV row blocks of 8 + a tail over these K tails; then the BF16 GEMM's tails: K % 4 = 3
    # and 1, an odd row count (a half row pair), an odd last weight panel, and a model's K
    (10, 7, 19), (11, 33, 16), (12, 770, 20),
    (18, 7, 19), (19, 33, 16), (20, 770, 20),
    # the AMX GEMM (bf16 weights): K a multiple of 32, a partial last panel of 32 weight rows,
    # an odd count of 16-row blocks, and more rows than one packed chunk (512)
    (45, 96, 70), (600, 64, 33),
]
DTYPES = ["float32", "float16", "bfloat16"]


def _round(w: np.ndarray, dtype: str) -> np.ndarray:
    """The weight as the backend stores it (round to nearest even), back in float64."""
    if dtype == "float16":
        return w.astype(np.float16).astype(np.float64)
    if dtype == "bfloat16":
        u = w.astype(np.float32).view(np.uint32).astype(np.uint64)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        return u.astype(np.uint32).view(np.float32).astype(np.float64)
    return w.astype(np.float64)


def expected_kernels() -> str:
    """The kernels this process should run: the CPU's, or generic where MAMBART_CPU_PORTABLE
    asks for them (CI runs this file so on x86 too)."""
    if os.environ.get("MAMBART_CPU_PORTABLE", "0") not in ("", "0", "false", "False", "off", "no"):
        return "generic"
    return machine_kernels()


def machine_kernels() -> str:
    """The kernels this CPU runs when nothing forces the generic path: MAMBART_EXPECT_KERNELS
    where CI names them for the CPU model it emulates, else read from the CPU here (aarch64:
    the auxiliary vector's AT_HWCAP2, x86-64: /proc/cpuinfo), independently of the backend."""
    want = os.environ.get("MAMBART_EXPECT_KERNELS")
    if want:
        return want
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "neon+bf16" if _hwcap2() & (1 << 14) else "neon"  # HWCAP2_BF16
    if machine in ("x86_64", "amd64"):
        flags = ""
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((l for l in f if l.startswith("flags")), "")
        except OSError:
            pass
        if all(f" {x}" in flags for x in ("avx2", "fma", "f16c")):
            off = os.environ.get("MAMBART_CPU_AVX512", "1") in ("0", "false", "False", "off", "no")
            if not off and all(f" {x}" in flags for x in ("avx512f", "avx512dq")):
                amx_off = os.environ.get("MAMBART_CPU_AMX", "1") in ("0", "false", "False", "off", "no")
                amx = all(f" {x}" in flags for x in ("amx_tile", "amx_bf16", "avx512bw", "avx512vl"))
                return "avx512+amx" if amx and not amx_off else "avx512"
            return "avx2"
    return "generic"


def _hwcap2() -> int:
    """AT_HWCAP2 (26) from /proc/self/auxv (pairs of native unsigned longs; qemu-user gives the
    emulated CPU's)."""
    try:
        with open("/proc/self/auxv", "rb") as f:
            raw = f.read()
    except OSError:
        return 0
    words = np.frombuffer(raw[: len(raw) // 16 * 16], dtype=np.uint64).reshape(-1, 2)
    hit = words[words[:, 0] == 26]
    return int(hit[0, 1]) if len(hit) else 0


def _kernels(name: str) -> str:
    return name.rsplit(",", 1)[1].strip(" )")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_linear_matches_float64(dtype, M, K, N):
    rng = np.random.default_rng(M * 1000 + K * 10 + N)
    x = rng.standard_normal((M, K)).astype(np.float32)
    W = rng.standard_normal((N, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    be = _C._ops.Backend("cpu")
    y = be.linear(x, W, dtype, bias)
    ref = x.astype(np.float64) @ _round(W, dtype).T + bias
    # fp32 sums of K products: a few ulps of sum |x w|
    bound = 4e-7 * (np.abs(x) @ np.abs(_round(W, dtype)).T + np.abs(bias)) * max(4, np.sqrt(K))
    assert np.all(np.abs(y - ref) <= bound + 1e-30), (dtype, M, K, N)
    y0 = be.linear(x, W, dtype, None)
    np.testing.assert_allclose(y0, ref - bias, rtol=0, atol=float(bound.max()) + 1e-6)


def test_kernels_chosen_at_run_time():
    name = _C._ops.Backend("cpu").name
    assert _kernels(name) == expected_kernels(), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 12, 40])
def test_linear_non_finite_activations(dtype, M):
    """An infinite activation gives an infinite output of the right sign and a NaN gives NaN, on
    every path (the BF16 kernel splits each activation into bf16 parts: inf and NaN must survive
    the split whole)."""
    K, N = (64 if M > 16 else 24), 9  # 64: the AMX GEMM's tiles (K % 32 == 0)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((M, K)).astype(np.float32)
    W = rng.uniform(0.5, 1.0, (N, K)).astype(np.float32)  # positive: no inf - inf
    x[0, 3] = np.inf
    if M > 1:
        x[5, 0] = -np.inf
        x[7, 9] = np.nan
        x[11, 1] = np.float32(3e38)  # finite; its products overflow to inf as in fp32
    y = _C._ops.Backend("cpu").linear(x, W, dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = x @ _round(W, dtype).astype(np.float32).T
    assert np.array_equal(np.isnan(y), np.isnan(ref)), (y, ref)
    assert np.array_equal(np.isposinf(y), np.isposinf(ref))
    assert np.array_equal(np.isneginf(y), np.isneginf(ref))


_CHILD = r"""
import json, sys
import numpy as np
import mambart
from mambart import _C
out = {"name": _C._ops.Backend("cpu").name, "linear": {}}
rng = np.random.default_rng(7)
for dt in ("float32", "float16", "bfloat16"):
    for M in (1, 3, 20):
        x = rng.standard_normal((M, 70)).astype(np.float32)
        W = rng.standard_normal((19, 70)).astype(np.float32)
        out["linear"][f"{dt}/{M}"] = _C._ops.Backend("cpu").linear(x, W, dt).tolist()
g = mambart.Generator(sys.argv[1])
out["logits"] = np.asarray(g.logits(list(range(2, 30)))).tolist()
r = g.generate([5, 6, 7], max_new_tokens=12, temperature=0.0)
out["tokens"] = (r[0] if isinstance(r, list) else r).token_ids
print(json.dumps(out))
"""


def _child(model_dir, portable: bool) -> dict:
    env = dict(os.environ)
    env.pop("MAMBART_CPU_PORTABLE", None)
    if portable:
        env["MAMBART_CPU_PORTABLE"] = "1"
    r = subprocess.run([sys.executable, "-c", _CHILD, str(model_dir)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_generic_path_forced_matches_simd(tmp_path):
    """MAMBART_CPU_PORTABLE=1 (read once per process) runs the generic kernels: named so, and
    equal to the SIMD kernels up to summation order; the same greedy tokens."""
    make_model_dir(tmp_path / "m", "mamba1", d_model=40, d_inner=72, dt_rank=5, d_state=16)
    simd, generic = _child(tmp_path / "m", False), _child(tmp_path / "m", True)
    assert _kernels(simd["name"]) == machine_kernels(), simd["name"]
    assert _kernels(generic["name"]) == "generic", generic["name"]
    for key, a in simd["linear"].items():
        np.testing.assert_allclose(generic["linear"][key], a, rtol=1e-5, atol=1e-5, err_msg=key)
    np.testing.assert_allclose(generic["logits"], simd["logits"], rtol=0, atol=1e-4)
    assert generic["tokens"] == simd["tokens"]


def test_f16_to_f32_every_value():
    """Every fp16 bit pattern widens exactly (through the fp16 embedding table: fp32 -> fp16
    when placed, fp16 -> fp32 when read), NaNs stay NaNs."""
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    with np.errstate(invalid="ignore"):  # the NaN patterns (numpy on aarch64 warns)
        table = h.astype(np.float32).reshape(-1, 64)
    be = _C._ops.Backend("cpu")
    out = be.embedding(np.arange(table.shape[0], dtype=np.int32), table, "float16")
    nan = np.isnan(table)
    assert np.array_equal(np.isnan(out), nan)
    assert np.array_equal(out[~nan].view(np.uint32), table[~nan].view(np.uint32))


def test_f32_to_f16_rounds_to_nearest_even():
    rng = np.random.default_rng(3)
    v = np.concatenate([
        rng.standard_normal(4096).astype(np.float32) * 10.0 ** rng.integers(-9, 6, 4096),
        np.array([65504, 65519.99, 65520, 1e9, -1e9, 6.1e-5, 5.96e-8, 2.98e-8, 2.99e-8, 0.0,
                  -0.0, np.inf, -np.inf], dtype=np.float32),
        # exact ties between neighbouring halves
        (np.arange(1, 2049, dtype=np.float32) + 0.5) * np.float32(2.0 ** -10),
    ]).astype(np.float32)
    v = np.concatenate([v, np.zeros((-len(v)) % 64, np.float32)]).reshape(-1, 64)
    be = _C._ops.Backend("cpu")
    out = be.embedding(np.arange(v.shape[0], dtype=np.int32), v, "float16")
    with np.errstate(over="ignore"):  # values past 65519.99 round to inf, as intended
        want = v.astype(np.float16).astype(np.float32)
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))


def _run_child(code, env_extra):
    """Runs `code` in a fresh interpreter (the kernel choice is read once per process) with the
    SIMD kernels (MAMBART_CPU_PORTABLE unset) and env_extra; -> its last line of JSON."""
    env = dict(os.environ)
    env.pop("MAMBART_CPU_PORTABLE", None)
    env.update(env_extra)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


_GEMM_CHILD = r"""
import json
import numpy as np
from mambart import _C
be = _C._ops.Backend("cpu", 2)
rng = np.random.default_rng(11)
out = {"name": be.name, "y": {}}
for dt in ("float32", "float16", "bfloat16"):
    for M, K, N in ((17, 12, 5), (24, 64, 16), (25, 65, 33), (37, 130, 21), (100, 768, 40),
                    (29, 1539, 17)):
        x = rng.standard_normal((M, K)).astype(np.float32)
        W = rng.standard_normal((N, K)).astype(np.float32)
        b = rng.standard_normal(N).astype(np.float32)
        out["y"][f"{dt}/{M}/{K}/{N}"] = [be.linear(x, W, dt, b).view(np.uint32).tolist(),
                                          be.linear(x, W, dt).view(np.uint32).tolist()]
from mambart._quant import quantize
for scheme, group in (("int8", 0), ("int4", 32), ("int4", 128)):
    for M, K, N in ((9, 128, 5), (13, 256, 33), (37, 384, 21)):
        x = rng.standard_normal((M, K)).astype(np.float32)
        W = rng.standard_normal((N, K)).astype(np.float32)
        b = rng.standard_normal(N).astype(np.float32)
        q, sc = quantize(W, scheme, group, "float16")
        y = be.linear_quant(x, q, sc.astype(np.float32), scheme, group, b)
        out["y"][f"{scheme}/{group}/{M}/{K}/{N}"] = [y.view(np.uint32).tolist()]
print(json.dumps(out))
"""


def test_gemm_avx512_as_avx2():
    """The GEMM (more than 16 rows: prefill; int8 / int4 weights from 9 rows, dequantized per
    panel) on AVX-512 runs a 512-bit micro-kernel of 12 rows;
    its bits equal the AVX2 GEMM's (MAMBART_CPU_AVX512=0): each output is summed in the same
    order, only the vector width and the tile height differ. Row tails (M % 12), K tails (K % 4,
    the 64-step blocks) and partial panels (N % 16), with and without bias."""
    main = _run_child(_GEMM_CHILD, {"MAMBART_CPU_AMX": "0"})  # AMX: its own test above
    if _kernels(main["name"]) != "avx512":
        pytest.skip("the AVX-512 GEMM runs on x86-64 CPUs with AVX-512 F and DQ only")
    avx2 = _run_child(_GEMM_CHILD, {"MAMBART_CPU_AVX512": "0"})
    assert _kernels(avx2["name"]) == "avx2", avx2["name"]
    assert avx2["y"].keys() == main["y"].keys()
    for key in main["y"]:
        assert avx2["y"][key] == main["y"][key], key


_ROWS_CHILD = r"""
import json, sys
import numpy as np
from mambart import _C
be = _C._ops.Backend("cpu", 1)
rng = np.random.default_rng(5)
out = {"name": be.name, "y": {}}
for dt in ("float32", "float16", "bfloat16"):
    for K, N in ((12, 37), (48, 21), (768, 45), (1539, 7)):
        x = rng.standard_normal((16, K)).astype(np.float32)
        W = rng.standard_normal((N, K)).astype(np.float32)
        b = rng.standard_normal(N).astype(np.float32)
        out["y"][f"{dt}/{K}/{N}"] = {
            "calls": [be.linear(x[:M], W, dt, b).view(np.uint32).tolist() for M in range(1, 17)],
            "alone": [be.linear(x[i:i + 1], W, dt, b).view(np.uint32)[0].tolist()
                      for i in range(16)]}
print(json.dumps(out))
"""


def test_gemv_rows_sum_as_one_row_and_avx512_as_avx2():
    """The GEMV (1 to 16 rows) sums every output as at M = 1, bit for bit: a speculative
    verification pass of up to 16 tokens gets a decode step's logits. Where the CPU runs the
    AVX-512 GEMV, its bits equal the AVX2 kernels' (MAMBART_CPU_AVX512=0) at every M."""
    main = _run_child(_ROWS_CHILD, {"MAMBART_CPU_AMX": "0"})  # the GEMV is the same with AMX
    for key, ys in main["y"].items():
        for m in range(1, 17):  # row i of an M-row call equals the same row alone
            for i in range(m):
                assert ys["calls"][m - 1][i] == ys["alone"][i], (key, m, i)
    if _kernels(main["name"]) == "avx512":
        avx2 = _run_child(_ROWS_CHILD, {"MAMBART_CPU_AVX512": "0"})
        assert _kernels(avx2["name"]) == "avx2", avx2["name"]
        assert avx2["y"] == main["y"]
