"""Generation loop semantics: stop conditions, streaming, timing fields, argument errors, and the
C++ library used without Python (mambart-run)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import mambart
from hf_models import build, mamba1_config


@pytest.fixture(scope="module")
def g(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    build(mamba1_config(), root / "hf", seed=3)
    return mambart.Generator(mambart.convert(root / "hf", root / "m"))


PROMPT = [5, 17, 33, 2, 60]


def test_max_new_tokens_and_result_fields(g):
    r = g.generate(PROMPT, max_new_tokens=7, ignore_eos=True)
    assert len(r.token_ids) == 7 and r.finish_reason == "length"
    assert r.prompt_tokens == 5 and r.prefill_ms > 0 and r.decode_ms > 0 and r.tokens_per_s > 0
    assert all(0 <= t < g.vocab_size for t in r.token_ids)
    r0 = g.generate(PROMPT, max_new_tokens=0)
    assert r0.token_ids == [] and r0.finish_reason == "length"


def test_stop_token_ids_and_eos(g, tmp_path):
    ref = g.generate(PROMPT, max_new_tokens=20, ignore_eos=True).token_ids
    stop = ref[6]
    r = g.generate(PROMPT, max_new_tokens=20, stop_token_ids=[stop], ignore_eos=True)
    assert r.token_ids == ref[: ref.index(stop) + 1] and r.finish_reason == "stop_token"
    # eos: a copy of the model whose config names ref[4] as eos stops there (eos kept), unless
    # ignore_eos; a stop id and eos together report whichever comes first.
    eos_dir = tmp_path / "eos"
    shutil.copytree(g.model_dir, eos_dir)
    cfg = json.loads((eos_dir / "config.json").read_text())
    cfg["eos_token_id"] = ref[4]
    (eos_dir / "config.json").write_text(json.dumps(cfg))
    ge = mambart.Generator(eos_dir)
    r = ge.generate(PROMPT, max_new_tokens=20)
    assert r.token_ids == ref[: ref.index(ref[4]) + 1] and r.finish_reason == "eos"
    assert ge.generate(PROMPT, max_new_tokens=20, ignore_eos=True).token_ids == ref


def test_stream_yields_the_generate_tokens(g):
    kw = dict(max_new_tokens=15, temperature=0.9, seed=5, ignore_eos=True)
    assert list(g.stream(PROMPT, **kw)) == g.generate(PROMPT, **kw).token_ids


def test_numpy_prompt_and_list_of_prompts(g):
    a = g.generate(np.array(PROMPT, dtype=np.int64), max_new_tokens=4, ignore_eos=True)
    b = g.generate([PROMPT, PROMPT[:2]], max_new_tokens=4, ignore_eos=True)
    assert a.token_ids == b[0].token_ids and len(b) == 2


@pytest.mark.parametrize("kw, name", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-3), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(seed=-5), "seed"),
    (dict(stop_token_ids=[10**6]), "stop_token_ids"),
])
def test_bad_generation_arguments_raise(g, kw, name):
    with pytest.raises(ValueError, match=name):
        g.generate(PROMPT, **kw)


def test_token_ids_outside_the_vocabulary_raise(g):
    V = g.vocab_size
    for bad in ([1, V], [-1], [1, 2**31 - 1]):
        with pytest.raises(ValueError, match="vocabulary"):
            g.logits(bad)
        with pytest.raises(ValueError, match="vocabulary"):
            g.generate(bad, max_new_tokens=1)
    with pytest.raises(ValueError, match="empty"):
        g.logits([])
    with pytest.raises(ValueError, match="integer"):
        g.generate([1.5, 2], max_new_tokens=1)
    with pytest.raises(ValueError, match="tokenizer"):
        g.generate("text without a tokenizer", max_new_tokens=1)


def test_bad_device_and_dtype(g):
    with pytest.raises(ValueError, match="device"):
        mambart.Generator(g.model_dir, device="tpu")
    with pytest.raises(ValueError, match="dtype"):
        mambart.Generator(g.model_dir, dtype="int8")


def test_cpp_program_without_python(g):
    exe = Path(mambart.__file__).parent / "bin" / "mambart-run"
    assert exe.is_file()
    ref = g.generate(PROMPT, max_new_tokens=10, ignore_eos=True).token_ids
    out = subprocess.run([str(exe), str(g.model_dir), "--tokens", ",".join(map(str, PROMPT)),
                          "--max-new-tokens", "10", "--ignore-eos"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert [int(t) for t in out.stdout.split()] == ref
    bad = subprocess.run([str(exe), str(g.model_dir) + "-missing", "--tokens", "1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "config.json" in bad.stderr
