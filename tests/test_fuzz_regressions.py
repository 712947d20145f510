"""Replays the fuzz seed corpus and every input the fuzzers ever crashed on (tests/fuzz/crashes)
through the same harnesses atheris runs (tests/fuzz/harnesses.py). Each target runs in a child
process with its address space capped at 4 GiB (not under ASan, whose shadow memory needs more),
so an input that makes mambart allocate gigabytes fails here instead of passing on a big
machine, and a crash of the child is a failure, not a crash of pytest."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent / "fuzz"
TARGETS = ["safetensors_cpp", "safetensors_py", "config", "model_dir", "convert", "torchzip",
           "tokenizer"]

_CHILD = r"""
import os, resource, sys, traceback, tracemalloc
if "asan" not in os.environ.get("LD_PRELOAD", ""):
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
sys.path.insert(0, sys.argv[1])
import harnesses
fn = harnesses.TARGETS[sys.argv[2]]
harnesses.workdir()
failed = 0
for path in sys.argv[3:]:
    data = open(path, "rb").read()
    tracemalloc.start()
    try:
        fn(data)
        peak = tracemalloc.get_traced_memory()[1]
        if peak > 256 << 20:
            raise AssertionError(f"Python allocations peaked at {peak >> 20} MiB")
    except BaseException:
        failed += 1
        print(f"FAIL {path}:\n{traceback.format_exc()}", flush=True)
    finally:
        tracemalloc.stop()
print(f"replayed {len(sys.argv) - 3} inputs, {failed} failed")
sys.exit(1 if failed else 0)
"""


# Inputs found by the libFuzzer (C++) targets replay through the matching Python-facing target.
ALSO = {"safetensors_cpp": ["crashes/libfuzzer_safetensors"],
        "config": [], "model_dir": []}


def _inputs(target):
    files = []
    for sub in ["corpus/" + target, "crashes/" + target] + ALSO.get(target, []):
        d = FUZZ / sub
        if d.is_dir():
            files += sorted(str(p) for p in d.iterdir() if p.is_file())
    return files


@pytest.mark.parametrize("target", TARGETS)
def test_replay(target):
    files = _inputs(target)
    assert files, f"no seeds for {target}"
    p = subprocess.run([sys.executable, "-c", _CHILD, str(FUZZ), target, *files],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"rc={p.returncode}\n{p.stdout[-8000:]}\n{p.stderr[-4000:]}"
    assert f"replayed {len(files)} inputs, 0 failed" in p.stdout


def test_crash_inputs_are_kept():
    """Every fuzzer finding so far stays in the regression set (see RELIABILITY.md)."""
    crashes = {p.name for p in (FUZZ / "crashes").rglob("*") if p.is_file()}
    for name in ("oom-chunk-size-51249", "legacy-binbytes8-18GB-claim",
                 "legacy-counted-opcode-19GB-claim", "legacy-memo-index-2e32",
                 "wordlevel-unk-not-in-vocab.json", "misaligned-f16-data",
                 "zero-size-tensor-null-memcpy", "nonfinite-A_log"):
        assert name in crashes
