"""The `mambart` command line, run as a separate process (python -m mambart, and the installed
console script): convert, generate (streamed text equals the API's), info, and errors as one
line on stderr with exit status 1 (bad input) or 2 (bad usage), never a traceback."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import mambart
from ckpt_utils import (add_to_hf_cache, dir_files, hf_model, pad_to, train_tokenizer,
                        write_state_spaces)

V = 300


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    tok = train_tokenizer(tmp / "tok" / "tokenizer.json")
    model = hf_model("mamba1", pad_to(V, 8), None, tie_word_embeddings=True, seed=5)
    ss = write_state_spaces(model, tmp / "ss", V, 8)
    shutil.copy(tok, ss / "tokenizer.json")
    hf = tmp / "hf"
    hf_model("mamba2", 112, hf, seed=6)
    hf_cache = tmp / "hfcache"
    add_to_hf_cache(hf_cache, "state-spaces/mamba-370m",
                    {k: v for k, v in dir_files(ss).items() if k != "tokenizer.json"})
    add_to_hf_cache(hf_cache, "EleutherAI/gpt-neox-20b", {"tokenizer.json": tok})
    env = dict(os.environ, MAMBART_CACHE=str(tmp / "mcache"), HF_HUB_CACHE=str(hf_cache),
               HF_HUB_OFFLINE="1")
    return dict(tmp=tmp, tok=tok, ss=ss, hf=hf, env=env, model=model)


def cli(setup, *args, check=None):
    r = subprocess.run([sys.executable, "-m", "mambart", *map(str, args)], capture_output=True,
                       text=True, env=setup["env"], timeout=300)
    if check is not None:
        assert r.returncode == check, (r.returncode, r.stdout, r.stderr)
    return r


def assert_one_line_error(r, code, pattern):
    import re

    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("mambart: error:"), lines[0]
    assert re.search(pattern, lines[0]), lines[0]


def test_help_reads_well(setup):
    r = cli(setup, "--help", check=0)
    for word in ("convert", "generate", "info", "MAMBART_CACHE", "HF_HUB_OFFLINE"):
        assert word in r.stdout
    r = cli(setup, "generate", "--help", check=0)
    for opt in ("--max-new-tokens", "--temperature", "--top-k", "--top-p", "--min-p",
                "--repetition-penalty", "--seed", "--device", "--dtype", "--stop"):
        assert opt in r.stdout
    r = cli(setup, check=2)
    assert "usage" in r.stderr


def test_console_script_is_installed(setup):
    import sysconfig

    dirs = [Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))]
    try:
        dirs.append(Path(sysconfig.get_path("scripts", f"{os.name}_user")))
    except KeyError:
        pass
    found = [d / "mambart" for d in dirs if (d / "mambart").is_file()]
    if shutil.which("mambart"):
        found.append(Path(shutil.which("mambart")))
    assert found, f"pip install should create the `mambart` console script (looked in {dirs})"
    exe = found[0]
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, env=setup["env"])
    assert r.returncode == 0 and r.stdout.strip() == f"mambart {mambart.__version__}"


def test_convert_and_info(setup, tmp_path):
    dst = tmp_path / "out"
    r = cli(setup, "convert", setup["hf"], dst, "--dtype", "bfloat16", check=0)
    assert r.stdout.strip() == str(dst)
    assert "converted" in r.stderr and "mamba2" in r.stderr
    assert "converting hf" in r.stderr and "100%" in r.stderr  # the tqdm progress bar
    g = mambart.Generator(str(dst))
    assert g.dtype == "bfloat16"
    r = cli(setup, "info", dst, check=0)
    from mambart._tensorio import read_safetensors_header

    n = sum(t.numel for t in read_safetensors_header(str(dst / "model.safetensors")).values())
    assert "architecture: mamba2" in r.stdout
    assert f"{n:,}" in r.stdout and "bfloat16" in r.stdout and str(dst) in r.stdout
    r = cli(setup, "info", dst, "--json", check=0)
    d = json.loads(r.stdout)
    assert d["parameters"] == n and d["d_model"] == 16 and d["n_layer"] == 2
    # converting onto an existing directory needs --force
    r = cli(setup, "convert", setup["hf"], dst)
    assert_one_line_error(r, 1, "already exists.*--force")
    cli(setup, "convert", setup["hf"], dst, "--force", "--no-progress", check=0)


def test_generate_streams_the_same_text_as_the_api(setup):
    prompt = "The future of AI is"
    r = cli(setup, "generate", setup["ss"], prompt, "--max-new-tokens", 24, "--ignore-eos",
            check=0)
    os.environ["MAMBART_CACHE"], old = setup["env"]["MAMBART_CACHE"], \
        os.environ.get("MAMBART_CACHE")
    try:
        g = mambart.Generator(str(setup["ss"]))
    finally:
        if old is None:
            del os.environ["MAMBART_CACHE"]
        else:
            os.environ["MAMBART_CACHE"] = old
    want = g.generate(prompt, max_new_tokens=24, ignore_eos=True).text
    assert r.stdout == want + "\n"
    # sampling options are passed through: a seed reproduces, and matches the API
    args = ["--temperature", 0.9, "--top-k", 20, "--top-p", 0.9, "--min-p", 0.01,
            "--repetition-penalty", 1.1, "--seed", 7, "--max-new-tokens", 16, "--ignore-eos"]
    r1 = cli(setup, "generate", setup["ss"], prompt, *args, check=0)
    r2 = cli(setup, "generate", setup["ss"], prompt, *args, check=0)
    assert r1.stdout == r2.stdout
    api = g.generate(prompt, temperature=0.9, top_k=20, top_p=0.9, min_p=0.01,
                     repetition_penalty=1.1, seed=7, max_new_tokens=16, ignore_eos=True).text
    assert r1.stdout == api + "\n"
    # stop strings
    stop = want[4:7]
    r = cli(setup, "generate", setup["ss"], prompt, "--max-new-tokens", 24, "--ignore-eos",
            "--stop", stop, check=0)
    assert r.stdout == want[:want.index(stop)] + "\n"


def test_generate_by_hub_name_and_token_ids(setup):
    r = cli(setup, "generate", "mamba-370m", "The future", "--max-new-tokens", 5,
            "--ignore-eos", check=0)
    assert r.stdout.endswith("\n")
    r = cli(setup, "generate", "mamba-370m", "1,2,3", "--token-ids", "--max-new-tokens", 5,
            "--ignore-eos", check=0)
    ids = [int(t) for t in r.stdout.split()]
    assert len(ids) == 5 and all(0 <= t < V for t in ids)
    r = cli(setup, "info", "mamba-370m", check=0)
    assert "state-spaces/mamba-370m" in r.stdout and "mamba1" in r.stdout


def test_errors_are_one_line(setup, tmp_path):
    assert_one_line_error(cli(setup, "generate", tmp_path / "missing", "hi"), 1,
                          "unknown model|not")
    assert_one_line_error(cli(setup, "generate", "mamba-9000b", "hi"), 1, "unknown model")
    assert_one_line_error(cli(setup, "info", "mamba-1.4b"), 1, "HF_HUB_OFFLINE")
    assert_one_line_error(cli(setup, "generate", setup["ss"], "hi", "--max-new-tokens", -1), 1,
                          "max_new_tokens")
    assert_one_line_error(cli(setup, "generate", setup["ss"], "hi", "--top-p", 2), 1, "top_p")
    assert_one_line_error(cli(setup, "generate", setup["ss"], "hi", "--temperature", -1), 1,
                          "temperature")
    assert_one_line_error(cli(setup, "generate", setup["ss"], "x,y", "--token-ids"), 1,
                          "token-ids")
    r = cli(setup, "convert", setup["hf"], tmp_path / "o", "--dtype", "float8")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "invalid choice" in r.stderr
    r = cli(setup, "generate", setup["ss"])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_bad_checkpoints_give_one_line(setup, tmp_path):
    # a malicious pickle
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil"
    shutil.copytree(setup["ss"], bad)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    real = bad / "pytorch_model.bin"
    tmpzip = tmp_path / "x.bin"
    with zipfile.ZipFile(real) as zin, zipfile.ZipFile(tmpzip, "w") as zout:
        for info in zin.infolist():
            data = pickle.dumps({"w": Evil()}, protocol=2) if info.filename.endswith(
                "data.pkl") else zin.read(info.filename)
            zout.writestr(info, data)
    shutil.move(tmpzip, real)
    assert_one_line_error(cli(setup, "convert", bad, tmp_path / "o1"), 1,
                          "pytorch_model.bin.*refus.*system")
    assert_one_line_error(cli(setup, "generate", bad, "hi"), 1, "refus")
    assert not marker.exists()
    # a truncated zip
    trunc = tmp_path / "trunc"
    shutil.copytree(setup["ss"], trunc)
    data = (trunc / "pytorch_model.bin").read_bytes()
    (trunc / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    assert_one_line_error(cli(setup, "convert", trunc, tmp_path / "o2"), 1,
                          "pytorch_model.bin.*(zip|truncated)")
    # a config with an unknown layer type
    unk = tmp_path / "unk"
    shutil.copytree(setup["ss"], unk)
    cfg = json.loads((unk / "config.json").read_text())
    cfg["ssm_cfg"]["layer"] = "Mamba7"
    (unk / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(cli(setup, "convert", unk, tmp_path / "o3"), 1,
                          "config.json.*unknown layer type.*Mamba7")
    for i in (1, 2, 3):
        assert not (tmp_path / f"o{i}").exists()


def test_cli_convert_with_torch_unimportable(setup, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None
        from mambart.cli import main
        sys.exit(main(["convert", {str(setup['ss'])!r}, {str(tmp_path / 'out')!r},
                       "--no-progress"]))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=setup["env"])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "config.json").is_file()
    assert (tmp_path / "out" / "tokenizer.json").is_file()
