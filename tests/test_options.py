"""The runtime options (issue 13): one table (cpp/options.cpp) set from the environment, Python or
the CLI in one place, documented in docs/options.md, and bad values refused naming the option."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mambart
from mambart import _C

from model_dirs import make_model_dir

DOC = Path(__file__).resolve().parents[1] / "docs" / "options.md"


@pytest.fixture(autouse=True)
def _clear_settings():
    yield
    mambart.set_options(**{o["name"]: None for o in mambart.option_table()})


@pytest.fixture(scope="module")
def m1_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("m1") / "m", "mamba1")


def test_docs_table_is_the_code_table():
    """docs/options.md lists exactly the options of the code, with their variables and
    defaults."""
    rows = re.findall(r"^\| `(\w+)` \| `(MAMBART_\w+)` \| [^|]+ \| ([^|]+) \|", DOC.read_text(),
                      re.M)
    doc = {name: (env, d.strip()) for name, env, d in rows}
    code = {o["name"]: (o["env"], f"`{o['default']}`" if o["default"] else "(unset)")
            for o in mambart.option_table()}
    assert doc == code


def test_defaults_set_and_clear(monkeypatch):
    for o in mambart.option_table():
        monkeypatch.delenv(o["env"], raising=False)
    now = mambart.options()
    assert now["cuda_graphs"] == "1" and now["cuda_ssd"] == "chunked" and now["cache_dir"] == ""
    mambart.set_options(cuda_graphs=False, cuda_ssd="recurrent", cublas_min_rows=16)
    now = mambart.options()
    assert (now["cuda_graphs"], now["cuda_ssd"], now["cublas_min_rows"]) == ("0", "recurrent", "16")
    monkeypatch.setenv("MAMBART_CUDA_GRAPHS", "1")  # an explicit setting wins over the environment
    assert mambart.options()["cuda_graphs"] == "0"
    mambart.set_options(cuda_graphs=None)  # cleared: the environment applies again
    assert mambart.options()["cuda_graphs"] == "1"


@pytest.mark.parametrize("kw,fragments", [
    (dict(cuda_ssd="fast"), ("cuda_ssd", "MAMBART_CUDA_SSD", "'fast'", "chunked|auto|recurrent|tf32")),
    (dict(cuda_graphs="maybe"), ("cuda_graphs", "must be 0 or 1")),
    (dict(cublas_min_rows=0), ("cublas_min_rows", "must be >= 1")),
    (dict(cuda_persistent_ring=5), ("cuda_persistent_ring", "must be 0, 8, 16 or 24")),
    (dict(cublas_min_rows=-3), ("cublas_min_rows", "non-negative integer")),
    (dict(host_memory_limit="1e9"), ("host_memory_limit", "non-negative integer")),
    (dict(cuda_fused_max_batch=10**12), ("cuda_fused_max_batch", "at most")),
    (dict(cuda_grpahs=True), ("unknown option 'cuda_grpahs'", "cuda_graphs")),
])
def test_bad_values_are_refused_naming_the_option(kw, fragments):
    before = mambart.options()
    with pytest.raises(ValueError) as ei:
        mambart.set_options(cuda_pdl=False, **kw)  # nothing is set when one value is bad
    for f in fragments:
        assert f in str(ei.value), str(ei.value)
    assert mambart.options() == before


def test_wrong_python_types_are_refused():
    with pytest.raises(TypeError, match="cuda_graphs"):
        mambart.set_options(cuda_graphs=[1])
    with pytest.raises(ValueError, match="None"):
        mambart.set_options(cache_dir="")


def test_a_bad_environment_value_is_refused_at_generator(m1_dir, monkeypatch):
    monkeypatch.setenv("MAMBART_CUDA_SCAN", "diagonal")
    with pytest.raises(ValueError, match=r"cuda_scan \(MAMBART_CUDA_SCAN\) = 'diagonal'"):
        mambart.Generator(m1_dir)


def test_settings_take_effect(m1_dir, monkeypatch):
    """host_memory_limit bounds a CPU load: from the environment, and an explicit setting over
    it."""
    monkeypatch.setenv("MAMBART_HOST_MEMORY_LIMIT", "1")
    with pytest.raises(mambart.ModelLoadError, match="but 1 bytes are available"):
        mambart.Generator(m1_dir)
    mambart.set_options(host_memory_limit=1 << 40)
    assert mambart.Generator(m1_dir).logits([1, 2]).shape == (2, 100)


def test_cache_dir_option(tmp_path, monkeypatch):
    from mambart._cache import cache_root

    monkeypatch.setenv("MAMBART_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    mambart.set_options(cache_dir=tmp_path / "set")
    assert cache_root() == tmp_path / "set"


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mambart", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env=env)


def test_cli_option_flag_and_listing(m1_dir):
    r = _cli("options")
    assert r.returncode == 0
    for o in mambart.option_table():
        assert o["name"] in r.stdout and o["env"] in r.stdout
    r = _cli("-o", "cuda_graphs=0", "options")
    assert r.returncode == 0 and "cuda_graphs = 0" in r.stdout
    env = dict(os.environ, MAMBART_HOST_MEMORY_LIMIT="1")
    r = _cli("-o", f"host_memory_limit={1 << 40}", "generate", m1_dir, "1,2", "--token-ids",
             "--max-new-tokens", 2, env=env)
    assert r.returncode == 0, r.stderr
    for bad, frag in (("cuda_ssd=fast", "must be one of"), ("nonsense", "expected NAME=VALUE"),
                      ("cuda_grpahs=1", "unknown option")):
        r = _cli("-o", bad, "options")
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and frag in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_native_table_matches_native_getters():
    names = [o["name"] for o in _C.option_table()]
    assert names == [o["name"] for o in mambart.option_table()]
    assert set(_C.options()) == set(names)
