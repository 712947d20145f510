"""tools/bench.py (issue 5's side-by-side benchmark) on the CPU: the smoke run's JSON lines, the
markdown report made from them (and from partial data with peers), the PNG, the time budget."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "tools" / "bench.py"
sys.path.insert(0, str(ROOT / "tools"))
import bench  # noqa: E402

MODELS = ("tiny", "tiny2")
DTYPES = ("bfloat16", "float16")


def _run(*args, timeout=180):
    r = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    out = d / "smoke.jsonl"
    _run("--device", "cpu", "--models", *MODELS, "--engines", "mambart", "--batches", "1", "2",
         "--prefill", "16", "--gen", "4", "--repeats", "1", "--out", str(out))
    recs = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return d, out, recs


def _one(recs, **kv):
    hits = [r for r in recs if all(r.get(k) == v for k, v in kv.items())]
    assert len(hits) == 1, (kv, hits)
    return hits[0]


def _pos(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_smoke_records(smoke):
    _, _, recs = smoke
    assert not [r for r in recs if r["metric"] in ("error", "missing")]
    assert recs[-1]["metric"] == "done"
    assert all(r["device"] == "cpu" and r["date"] and "git" in r for r in recs)
    for m in MODELS:
        p = _one(recs, model=m, metric="params")
        c = bench.model_config(m, "bfloat16")
        assert (p["value"], p["non_embedding"]) == bench.param_counts(c)
        assert p["non_embedding"] < p["value"]
        for dt in DTYPES:
            k = dict(engine="mambart", model=m, dtype=dt)
            load = _one(recs, **k, metric="load_s")
            assert load["value"] >= 0 and load["stored_dtype"] == "bfloat16"
            dec = _one(recs, **k, metric="decode_ms_per_token", batch=1)
            assert _pos(dec["value"]) and _pos(dec["gb_s"]) and dec["gen"] == 4
            # gb_s = params x 2 bytes / step time
            assert dec["gb_s"] == pytest.approx(p["value"] * 2 / (dec["value"] * 1e-3) / 1e9, rel=0.05, abs=0.01)
            thr = _one(recs, **k, metric="decode_tokens_per_s", batch=2)
            assert _pos(thr["value"]) and thr["value"] == pytest.approx(2e3 / thr["ms_per_step"], rel=0.01)
            pre = _one(recs, **k, metric="prefill_ms", prompt_len=16)
            assert _pos(pre["value"]) and _pos(pre["tokens_per_s"])
            assert pre["tokens_per_s"] == pytest.approx(16e3 / pre["value"], rel=0.01)
            assert pre["tflops"] >= 0
            assert _pos(_one(recs, **k, metric="ttft_ms")["value"])
            # no torch-CUDA on the CPU: memory is skipped, and says so
            sk = _one(recs, **k, metric="skipped", what="peak_mem_gib")
            assert "torch.cuda" in sk["reason"]
    _one(recs, metric="skipped", what="copy_bandwidth_gb_s")


def test_smoke_report(smoke):
    d, out, recs = smoke
    md = d / "report.md"
    _run("--report", str(out), "--md", str(md))
    text = md.read_text()
    dec = [line for line in text.splitlines() if line.startswith("| tiny2 |") and "| mambart | bfloat16 |" in line]
    assert dec, text
    r = _one(recs, engine="mambart", model="tiny2", dtype="bfloat16", metric="decode_ms_per_token")
    assert f"{r['value']:.3f}" in dec[0]
    for section in ("## Decode, batch 1", "## Decode throughput", "batch 2", "## Prefill",
                    "16 tok", "## Time to first token", "copy bandwidth"):
        assert section in text
    assert "| tiny | mambart | float16 |" in text
    assert "skipped copy_bandwidth_gb_s" in text


def test_smoke_png(smoke):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed: PNG plot not checked")
    d, out, _ = smoke
    png = d / "plot.png"
    _run("--report", str(out), "--png", str(png), "--md", str(d / "r2.md"))
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_report_ratios_and_partial_data():
    """Ratios against mamba_ssm, bandwidth columns, and records of a missing peer."""
    meta = dict(date="2026-11-25T00:00:00Z", device="cuda", gpu="GPU X", driver="1.2", git="abc")
    k = dict(meta, model="mamba-1.4b", dtype="bfloat16", params=1000)
    recs = [
        dict(meta, metric="copy_bandwidth_gb_s", value=3000.0),
        dict(meta, model="mamba-1.4b", metric="params", value=1000, non_embedding=900),
        dict(k, engine="mambart", engine_version="0.1.0", metric="decode_ms_per_token", batch=1,
             value=1.25, gb_s=2200.0, pct_copy_bw=73.3, bw_limit_ms=0.917),
        dict(k, engine="mamba_ssm", engine_version="2.3.2", metric="decode_ms_per_token", batch=1,
             value=2.5, gb_s=1100.0, pct_copy_bw=36.7, bw_limit_ms=0.917),
        dict(k, engine="mambart", metric="decode_tokens_per_s", batch=32, value=12000.0),
        dict(k, engine="mamba_ssm", metric="decode_tokens_per_s", batch=32, value=8000.0),
        dict(k, engine="mambart", metric="prefill_ms", prompt_len=8192, value=40.0, tflops=12.3),
        dict(k, engine="mamba_ssm", metric="prefill_ms", prompt_len=8192, value=100.0),
        dict(k, engine="mambart", metric="ttft_ms", prompt_len=512, value=5.0),
        dict(k, engine="mambart", metric="load_s", value=0.7),
        dict(k, engine="mambart", metric="peak_mem_gib", value=2.6),
        dict(k, engine="transformers", metric="missing", value="import transformers: boom"),
        dict(meta, model="mamba2-2.7b", metric="skipped", what="model", reason="time budget"),
    ]
    text, plot = bench.report(recs)
    assert "GPU X" in text and "driver 1.2" in text and "3,000 GB/s" in text
    row = [line for line in text.splitlines() if line.startswith("| mamba-1.4b | 1000 | mambart |")]
    assert len(row) == 1 and "| 1.250 |" in row[0] and "73.3" in row[0] and "2.00x" in row[0]
    assert "12,000 (1.50x)" in text  # throughput: ours / theirs
    assert "40.00 (2.50x)" in text and "12.3" in text  # prefill: theirs / ours
    assert "transformers mamba-1.4b bfloat16: missing: import transformers: boom" in text
    assert "skipped mamba2-2.7b model: time budget" in text
    assert ("mambart", "bfloat16", 1000, 1.25, 0.917, "Mamba-1") in plot


def test_time_budget_skips(tmp_path):
    out = tmp_path / "b.jsonl"
    _run("--device", "cpu", "--models", "tiny", "--engines", "mambart", "--prefill", "16",
         "--gen", "4", "--repeats", "1", "--time-budget", "1e-6", "--out", str(out))
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert not [r for r in recs if r["metric"] in ("decode_ms_per_token", "prefill_ms")]
    sk = [r for r in recs if r["metric"] == "skipped" and "time budget" in r.get("reason", "")]
    assert sk and sk[0]["model"] == "tiny"


def test_bench_mamba3_cpu_smoke(tmp_path):
    """tools/bench_mamba3.py's CPU smoke run: mambart's prefill/decode records, the accuracy
    records against the float64 reference (CPU bf16 weights computed in fp32: tiny error, the
    greedy continuation equal), and mamba_ssm reported missing without CUDA."""
    out = tmp_path / "m3.jsonl"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_mamba3.py"), "--device", "cpu",
                        "--models", "tiny3", "--prefill", "16", "100", "--batches", "1", "2",
                        "--gen", "4", "--repeats", "1", "--accuracy", "--acc-prompt", "8",
                        "--acc-gen", "4", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    m = [x for x in recs if x.get("engine") == "mambart"]
    assert {x["prompt_len"] for x in m if x["metric"] == "prefill_ms"} == {16, 100}
    assert all(_pos(x["value"]) for x in m if x["metric"] in ("prefill_ms", "decode_ms_per_token",
                                                               "decode_tokens_per_s"))
    assert _one(m, metric="decode_ms_per_token", batch=1)["gen"] == 4
    assert _pos(_one(m, metric="decode_tokens_per_s", batch=2)["value"])
    for dt in ("bfloat16", "float32"):
        a = _one(m, metric="accuracy", dtype=dt)
        assert a["max_rel_err"] <= 1e-4 and a["greedy_prefix_agree"] == a["greedy_tokens"] == 4
    assert _one(recs, engine="mamba_ssm", metric="missing")["value"].startswith("needs torch")


def test_bench_hybrid_cpu_smoke(tmp_path):
    """tools/bench_hybrid.py's CPU smoke run (issue 19): a tiny Nemotron-H shape's decode (with the
    bytes a step reads), batched decode and prefill records."""
    out = tmp_path / "h.jsonl"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_hybrid.py"), "--device", "cpu",
                        "--models", "tiny-h", "--context", "40", "--prefill", "16", "24",
                        "--batches", "1", "2", "--gen", "4", "--repeats", "1", "--engines",
                        "mambart", "--work", str(tmp_path / "work"), "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    d = _one(recs, metric="decode_ms_per_token", batch=1)
    assert _pos(d["value"]) and d["context"] == 40 and d["step_bytes"] > 0 and _pos(d["gb_s"])
    assert _pos(_one(recs, metric="decode_tokens_per_s", batch=2)["value"])
    assert {x["prompt_len"] for x in recs if x["metric"] == "prefill_ms"} == {16, 24}
