"""A short end-to-end CUDA run on tiny random models (Mamba-1 and Mamba-2): prefill (chunked),
graph-captured decode with greedy and sampled tokens, batch of prompts. Meant to run under
compute-sanitizer (memcheck, racecheck) on the GPU machine:

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 tools/cuda_smoke.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from model_dirs import make_model_dir  # noqa: E402

import mambart  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {
            "m1": make_model_dir(Path(tmp) / "m1", "mamba1", d_model=32, d_inner=64, d_state=16,
                                 dt_rank=2, vocab_size=200, vocab_size_padded=200),
            "m2": make_model_dir(Path(tmp) / "m2", "mamba2", d_model=32, d_inner=64, d_state=32,
                                 headdim=16, nheads=4, ngroups=2, chunk_size=8, vocab_size=200,
                                 vocab_size_padded=200),
        }
        rng = np.random.default_rng(0)
        for name, d in dirs.items():
            for dtype in ("float32", "bfloat16"):
                g = mambart.Generator(str(d), device="cuda", dtype=dtype)
                prompts = [[int(t) for t in rng.integers(0, 200, size=n)] for n in (1, 19, 70)]
                a = g.generate(prompts, max_new_tokens=6, ignore_eos=True)
                b = g.generate(prompts, max_new_tokens=6, ignore_eos=True, temperature=0.9,
                               top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.1, seed=1)
                lg = g.logits(prompts[2])
                print(name, dtype, [r.token_ids for r in a], [r.token_ids for r in b],
                      float(np.abs(lg).max()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
