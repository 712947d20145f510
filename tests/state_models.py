"""Tiny converted models for the issue-7 tests (states, prompt cache, batches, scoring)."""

from __future__ import annotations

from pathlib import Path

import mambart
from hf_models import build, mamba1_config, mamba2_config


def make(root: Path, arch: str = "mamba1", seed: int = 3, **cfg) -> Path:
    """Builds a random transformers checkpoint and converts it; returns the mambart dir."""
    config = mamba1_config(**cfg) if arch == "mamba1" else mamba2_config(**cfg)
    hf = root / f"{arch}_hf_{seed}"
    build(config, hf, seed=seed)
    return Path(mambart.convert(hf, root / f"{arch}_{seed}"))


PROMPT = [5, 17, 33, 2, 60, 9, 41]
