#!/usr/bin/env python3
"""Greedy tokens of the bundled demo models (Mamba-1 and Mamba-2) in fp32, bf16 and fp16, and of
random tiny models, as one JSON object: CI runs it on x86-64 and for aarch64 under qemu-user and
requires the two outputs to be equal (tools/ci_arm64.sh). No torch.

    python tools/greedy_tokens.py OUT.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import mambart  # noqa: E402
from model_dirs import make_model_dir  # noqa: E402

PROMPTS = ["def fibonacci(n):\n    ", "import numpy as np\n\nclass "]


def main() -> int:
    out = {"device": None, "tokens": {}}
    for name in ("mambart-demo", "mambart2-demo"):
        for dtype in ("float32", "bfloat16", "float16"):
            g = mambart.Generator(name, dtype=dtype)
            out["device"] = g.device
            for i, p in enumerate(PROMPTS):
                r = g.generate(p, max_new_tokens=24, temperature=0.0)
                out["tokens"][f"{name}/{dtype}/{i}"] = r.token_ids
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("mamba1", "mamba2"):
            for dtype in ("float32", "bfloat16", "float16"):
                d = Path(tmp) / f"{arch}-{dtype}"
                extra = dict(nheads=12) if arch == "mamba2" else dict(dt_rank=3)
                make_model_dir(d, arch, dtype=dtype, d_model=48, d_inner=96, vocab_size=500,
                               vocab_size_padded=504, **extra)
                g = mambart.Generator(d)
                r = g.generate(list(range(3, 40)), max_new_tokens=24, temperature=0.0)
                out["tokens"][f"tiny-{arch}/{dtype}"] = r.token_ids
    Path(sys.argv[1]).write_text(json.dumps(out, sort_keys=True))
    print(f"{len(out['tokens'])} greedy sequences on {out['device']} -> {sys.argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
