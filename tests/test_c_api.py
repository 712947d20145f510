"""The C API (issue 14), driven from C: tests/c/test_c_api.c is compiled against the installed
package's header and libmambart (as a C service would build) and run; bad handles, options,
paths, token ids, foreign states, a full queue and bad state files give statuses with messages,
and its greedy tokens equal the Python API's. State files cross between the two: C continues a
state Python saved, Python continues one C saved, exactly. The examples build with CMake's
find_package(mambart)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mambart
from state_models import PROMPT, make

HERE = Path(__file__).parent
PKG = Path(os.path.abspath(mambart.__file__)).parent


def _c_dirs():
    inc, lib = PKG / "include", PKG / "lib"
    if not (inc / "mambart.h").is_file() or not (lib / "libmambart.so").is_file():
        pytest.fail(f"the installed package has no C API files under {PKG}")
    return inc, lib


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("capi")
    a = make(root, "mamba1")
    b = make(root, "mamba2")
    bad = root / "not_a_model"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    return a, b, bad


def _run_dirs_flag(flag):
    return subprocess.run([sys.executable, "-m", "mambart", flag], capture_output=True,
                          text=True, timeout=60)


def test_python_m_mambart_prints_the_c_api_dirs():
    inc, lib = _c_dirs()
    for flag, want in (("--include-dir", inc), ("--lib-dir", lib),
                       ("--cmake-dir", lib / "cmake" / "mambart"),
                       ("--pkgconfig-dir", lib / "pkgconfig")):
        r = _run_dirs_flag(flag)
        assert r.returncode == 0 and Path(r.stdout.strip()) == want, (flag, r.stderr)
        assert want.is_dir()


def test_c_program_drives_every_bad_input_and_generates(models, tmp_path):
    inc, lib = _c_dirs()
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler (cc) on PATH")
    a, b, bad = models
    g = mambart.Generator(a)
    want = g.generate(PROMPT, max_new_tokens=12, ignore_eos=True, return_state=True)
    work = tmp_path / "work"
    work.mkdir()
    want.state.save(work / "py.state")
    os.mkfifo(work / "fifo.state")
    exe = tmp_path / "test_c_api"
    subprocess.run([cc, "-std=c99", "-Wall", "-Werror", "-o", str(exe), str(HERE / "c/test_c_api.c"),
                    f"-I{inc}", f"-L{lib}", f"-Wl,-rpath,{lib}", "-lmambart"], check=True,
                   timeout=120)
    r = subprocess.run([str(exe), str(a), str(b), str(bad), str(work)], capture_output=True,
                       text=True, timeout=300)
    out = r.stdout
    assert r.returncode == 0 and "failures 0" in out, out + r.stderr
    assert "FAIL" not in out
    lines = {l.split()[0]: l.split()[1:] for l in out.splitlines() if l.strip()}
    assert [int(t) for t in lines["greedy"]] == want.token_ids
    assert [int(t) for t in lines["streamed"]] == want.token_ids
    more = g.generate(None, state=want.state, max_new_tokens=5, ignore_eos=True)
    assert [int(t) for t in lines["continued"]] == more.token_ids
    assert int(lines["state"][1]) == len(PROMPT) + 12
    # State files: C's own round trip, Python's file continued in C, C's file in Python.
    assert [int(t) for t in lines["loaded_continued"]] == more.token_ids
    assert [int(t) for t in lines["py_continued"]] == more.token_ids
    c_state = mambart.load_state(work / "c.state")
    assert c_state.tokens == want.state.tokens and c_state.rng == (0, 0, 12)
    for got, ref in zip(c_state._host_dict().values(), want.state._host_dict().values()):
        if isinstance(ref, np.ndarray):
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    for st in (c_state, g.load_state(work / "c.state")):
        assert g.generate(None, state=st, max_new_tokens=5,
                          ignore_eos=True).token_ids == more.token_ids
    # The prompt cache: the cached run gives the uncached run's tokens.
    assert lines["uncached"] == lines["cached"]
    assert [int(t) for t in lines["cached"]] == want.token_ids[:4]


def test_examples_build_with_find_package_and_run(models, tmp_path):
    _c_dirs()
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.fail("cmake is not on PATH")
    cmake_dir = _run_dirs_flag("--cmake-dir").stdout.strip()
    build = tmp_path / "build"
    src = HERE.parent / "examples"
    subprocess.run([cmake, "-S", str(src), "-B", str(build), f"-Dmambart_DIR={cmake_dir}"],
                   check=True, capture_output=True, timeout=300)
    subprocess.run([cmake, "--build", str(build)], check=True, capture_output=True, timeout=300)
    a = models[0]
    g = mambart.Generator(a)
    want = g.generate([5, 17, 33], max_new_tokens=6, ignore_eos=True).token_ids
    r = subprocess.run([str(build / "generate"), str(a), "5,17,33", "6"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split()[1:] == [str(t) for t in want]
    r = subprocess.run([str(build / "generate_cpp"), str(a), "4", "5"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for i in range(4):
        want = g.generate([1 + i, 2, 3 + i], max_new_tokens=5, ignore_eos=True).token_ids
        assert f"request {i}: " + " ".join(map(str, want)) in r.stdout
