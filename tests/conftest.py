"""Shared pytest set-up: the `cuda` marker skips without a GPU; tolerance table."""

import os

import pytest

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _cuda_available() -> bool:
    try:
        from mambart import _C
    except ImportError:
        return False
    return bool(_C.cuda_available())


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU and mambart built with CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_generate_tests(metafunc):
    """hf_models.FamilyChecks subclasses: `name` over the class's CASES, `state_name` over its
    STATE_CASES."""
    cls = metafunc.cls
    if cls is None or not getattr(cls, "FAMILY_CHECKS", False):
        return
    if "name" in metafunc.fixturenames:
        metafunc.parametrize("name", list(cls.CASES))
    if "state_name" in metafunc.fixturenames:
        metafunc.parametrize("state_name", list(cls.STATE_CASES))


# Tolerances (max abs error on logits of the tiny test models, |logits| ~ 1..10).
# fp32 against transformers' fp32: both are exact-math implementations in fp32 with different
# summation orders (chunked SSD vs sequential scan), so errors are a few ulps of the logits.
TOL = {"float32": 2e-4, "float16": 5e-2, "bfloat16": 2e-1}
