"""Issue 24's command line: one MODEL form for every subcommand (convert takes hub and bundled
names), --tokenizer, the prompt from `-` or --prompt-file, the timing line and --quiet, bench,
chat (state kept between turns, chat templates, Ctrl-C), cache list / rm (never outside the
cache, never an entry in use), conversion messages without a terminal, the umask's modes, and
the mambart-run wrapper. Each bad input: one line on stderr naming the thing, exit 1 or 2."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mambart
from ckpt_utils import add_to_hf_cache, dir_files, hf_model, pad_to, write_state_spaces
from mambart import cli as mcli
from mambart.hub import BUNDLED_DIR

DEMO = "mambart-demo"
TIMING = re.compile(r"^mambart: (\d+) prompt tokens(?:, (\d+) run)?, prefill [\d.]+ ms; (\d+) "
                    r"new tokens, decode [\d.]+ tok/s; stop: (\w+)$", re.M)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clitools")
    hf_cache = tmp / "hfcache"
    model = hf_model("mamba1", pad_to(300, 8), None, tie_word_embeddings=True, seed=5)
    ss = write_state_spaces(model, tmp / "ss", 300, 8)
    add_to_hf_cache(hf_cache, "state-spaces/mamba-370m", dir_files(ss))
    demo_tok = BUNDLED_DIR / DEMO / "tokenizer.json"
    add_to_hf_cache(hf_cache, "EleutherAI/gpt-neox-20b", {"tokenizer.json": demo_tok})
    hf = tmp / "hf"
    hf_model("mamba2", 112, hf, seed=6)
    e = dict(os.environ, MAMBART_CACHE=str(tmp / "mcache"), HF_HUB_CACHE=str(hf_cache),
             HF_HUB_OFFLINE="1")
    return dict(tmp=tmp, env=e, hf=hf, cache=tmp / "mcache" / "converted")


def cli(env, *args, check=None, stdin=None, umask=None):
    r = subprocess.run([sys.executable, "-m", "mambart", *map(str, args)], capture_output=True,
                       text=True, env=env["env"], timeout=300, input=stdin,
                       preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)
    if check is not None:
        assert r.returncode == check, (r.returncode, r.stdout, r.stderr)
    return r


def one_line_error(r, code, pattern):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("mambart: error:"), lines[0]
    assert re.search(pattern, lines[0]), lines[0]


# ---------------------------------------------------------------- prompts and timing

def test_prompt_from_stdin_or_file_equals_the_argument(env, tmp_path):
    prompt = "import os\ndef main("
    args = ["--max-new-tokens", 12, "--ignore-eos"]
    a = cli(env, "generate", DEMO, prompt, *args, check=0)
    b = cli(env, "generate", DEMO, "-", *args, stdin=prompt, check=0)
    f = tmp_path / "p.txt"
    f.write_text(prompt)
    c = cli(env, "generate", DEMO, "--prompt-file", f, *args, check=0)
    want = mambart.Generator(DEMO).generate(prompt, max_new_tokens=12, ignore_eos=True)
    assert a.stdout == b.stdout == c.stdout == want.text + "\n"
    # the timing line: on stderr, after the text, with the prompt's token count
    m = TIMING.search(a.stderr)
    assert m, a.stderr
    assert int(m.group(1)) == want.prompt_tokens and int(m.group(3)) == 12
    assert m.group(4) == "length"
    q = cli(env, "generate", DEMO, prompt, *args, "--quiet", check=0)
    assert q.stdout == a.stdout and q.stderr == ""


def test_prompt_errors_are_one_line(env, tmp_path):
    one_line_error(cli(env, "generate", DEMO, "--prompt-file", tmp_path / "nope.txt"), 1,
                   re.escape(str(tmp_path / "nope.txt")))
    f = tmp_path / "p.txt"
    f.write_text("x")
    one_line_error(cli(env, "generate", DEMO, "x", "--prompt-file", f), 2, "not both")
    one_line_error(cli(env, "generate", DEMO), 2, "PROMPT")
    one_line_error(cli(env, "generate", DEMO, "x", "--no-such-option"), 2, "--no-such-option")
    one_line_error(cli(env, "bench", DEMO, "--bogus"), 2, "--bogus")


def test_tokenizer_option(env, tmp_path):
    bare = tmp_path / "bare"
    src = BUNDLED_DIR / DEMO
    bare.mkdir()
    for n in ("config.json", "model.safetensors"):
        shutil.copy(src / n, bare / n)
    one_line_error(cli(env, "generate", bare, "def f("), 1, "no tokenizer.*--tokenizer")
    r = cli(env, "generate", bare, "def f(", "--tokenizer", src / "tokenizer.json",
            "--max-new-tokens", 8, "--ignore-eos", "-q", check=0)
    d = cli(env, "generate", DEMO, "def f(", "--max-new-tokens", 8, "--ignore-eos", "-q",
            check=0)
    assert r.stdout == d.stdout and len(r.stdout) > 1
    one_line_error(cli(env, "generate", DEMO, "x", "--tokenizer", tmp_path / "none.json"), 1,
                   "none.json")


# ---------------------------------------------------------------- convert and the cache

def test_convert_takes_the_names_generate_takes(env, tmp_path):
    out = tmp_path / "c370"
    r = cli(env, "convert", "mamba-370m", out, "--dtype", "float32", "--no-progress", check=0)
    assert r.stdout.strip() == str(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["source"]["repo"] == "state-spaces/mamba-370m" and cfg["dtype"] == "float32"
    assert (out / "tokenizer.json").is_file()  # GPT-NeoX's (here: the test's) for state-spaces
    r = cli(env, "info", out, check=0)
    assert "state-spaces/mamba-370m" in r.stdout
    d = tmp_path / "demo32"
    cli(env, "convert", DEMO, d, "--dtype", "float32", "--no-progress", check=0)
    a = cli(env, "generate", d, "class A(", "--max-new-tokens", 6, "-q", check=0)
    assert len(a.stdout) > 1
    one_line_error(cli(env, "convert", "mamba-9000b", tmp_path / "x"), 1, "mamba-9000b")


def test_conversion_message_and_modes_without_a_terminal(env, tmp_path):
    r = cli(env, "info", env["hf"], "--dtype", "float16", umask=0o022, check=0)
    msg = [ln for ln in r.stderr.splitlines() if ln.startswith("mambart: converting")]
    assert len(msg) == 1 and "(float16)" in msg[0] and str(env["cache"]) in msg[0], r.stderr
    entry = Path(msg[0].rsplit(" at ", 1)[1])
    assert entry.is_dir()
    assert stat.S_IMODE(entry.stat().st_mode) == 0o755
    assert stat.S_IMODE((entry / "model.safetensors").stat().st_mode) == 0o644
    r = cli(env, "info", env["hf"], "--dtype", "float16", check=0)
    assert "converting" not in r.stderr  # the second time it is in the cache
    out = tmp_path / "u002"
    cli(env, "convert", env["hf"], out, "--no-progress", umask=0o002, check=0)
    assert stat.S_IMODE(out.stat().st_mode) == 0o775
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == 0o664


def _hold(env, model_dir):
    """A process that has `model_dir` loaded until it is killed."""
    code = (f"import mambart, sys, time; g = mambart.Generator({str(model_dir)!r}); "
            f"print('ready', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env=env["env"])
    assert p.stdout.readline().strip() == "ready"
    return p


def test_cache_list_and_rm(env, tmp_path):
    cli(env, "info", env["hf"], check=0)  # makes an entry (native dtype)
    r = cli(env, "cache", "list", "--json", check=0)
    entries = json.loads(r.stdout)
    mine = [e for e in entries if e["source"] == str(env["hf"])]
    assert mine and all(e["bytes"] > 0 and e["valid"] for e in mine)
    name = mine[0]["name"]
    r = cli(env, "cache", "list", check=0)
    assert name in r.stdout and "MiB" in r.stdout and str(env["hf"]) in r.stdout

    # refused: an entry that does not exist, anything outside the cache, one in use
    one_line_error(cli(env, "cache", "rm", "no-such-entry"), 1, "no-such-entry.*no such entry")
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "f").write_text("keep")
    for bad in (outside, "..", "../..", f"../converted/{name}/..", str(tmp_path)):
        one_line_error(cli(env, "cache", "rm", bad), 1, "not an entry|no such entry")
    assert (outside / "f").read_text() == "keep" and (env["cache"] / name).is_dir()
    link = env["cache"] / "link-to-outside"
    link.symlink_to(outside)
    one_line_error(cli(env, "cache", "rm", "link-to-outside"), 1, "no such entry")
    assert (outside / "f").is_file()
    link.unlink()
    p = _hold(env, env["cache"] / name)
    try:
        one_line_error(cli(env, "cache", "rm", name), 1, f"{name}: in use by process {p.pid}")
        assert "[in use]" in cli(env, "cache", "list", check=0).stdout
    finally:
        p.kill()
        p.wait()
    r = cli(env, "cache", "rm", name, check=0)
    assert f"removed {env['cache'] / name}" in r.stdout
    assert not (env["cache"] / name).exists()
    one_line_error(cli(env, "cache", "rm"), 2, "NAME")


# ---------------------------------------------------------------- bench

def test_bench_table_and_json(env):
    r = cli(env, "bench", DEMO, "-p", "16,32", "-n", "4", "-r", "2", check=0)
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| " + DEMO)]
    assert [ln.split("|")[5].strip() for ln in rows] == ["pp16", "pp32", "tg4"]
    for ln in rows:
        mean, std = re.search(r"([\d.]+) ± ([\d.]+) \|$", ln).groups()
        assert float(mean) > 0 and float(std) >= 0
    r = cli(env, "bench", DEMO, "-p", "8", "-n", "0", "-r", "1", "--json", check=0)
    (d,) = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert d["test"] == "pp8" and d["tokens_per_s"] > 0 and d["dtype"] == "bfloat16"
    one_line_error(cli(env, "bench", DEMO, "-p", "x"), 2, "--prompt-lengths")
    one_line_error(cli(env, "bench", DEMO, "-p", "0", "-n", "0"), 2, "nothing to measure")


# ---------------------------------------------------------------- chat

def test_chat_keeps_the_state_between_turns(env):
    r = cli(env, "chat", DEMO, "--max-new-tokens", 8, "--ignore-eos",
            stdin="import os\nimport sys\n/exit\nnever read\n", check=0)
    t = TIMING.findall(r.stderr)
    assert len(t) == 2, r.stderr
    g = mambart.Generator(DEMO)
    ids1 = g.tokenizer.encode("import os\n").ids
    assert int(t[0][0]) == len(ids1) and t[0][1] == ""  # the whole first turn ran
    r1 = g.generate(ids1, max_new_tokens=8, ignore_eos=True)
    ids2 = ids1 + r1.token_ids + g.tokenizer.encode("import sys\n").ids
    # turn 2 runs only its new tokens (and the last reply token, not yet run)
    assert int(t[1][0]) == len(ids2)
    assert int(t[1][1]) == len(g.tokenizer.encode("import sys\n").ids) + 1
    r2 = g.generate(ids2, max_new_tokens=8, ignore_eos=True)
    assert r.stdout == r1.text + "\n" + r2.text + "\n"


def test_chat_template_and_interrupt(env, tmp_path):
    m = tmp_path / "templated"
    shutil.copytree(BUNDLED_DIR / DEMO, m)
    tpl = ("{% for m in messages %}# {{ m.role }}:{{ m.content }}\n{% endfor %}"
           "{% if add_generation_prompt %}# assistant:{% endif %}")
    (m / "tokenizer_config.json").write_text(json.dumps({"chat_template": tpl}))
    g = mambart.Generator(str(m), prompt_cache_bytes=64 << 20)

    class Args:
        chat_template = None

    s = mcli.ChatSession(g, mcli._chat_template(g, Args()), system="be brief")
    new = s.add_user("hi")
    assert g.tokenizer.decode(new) == "# system:be brief\n# user:hi\n# assistant:"
    r, text = s.reply(io.StringIO(), max_new_tokens=5, ignore_eos=True)
    assert r.finish_reason == "length" and len(r.token_ids) == 5
    new = s.add_user("bye")
    # only what the template adds after the reply: the exact history stays a prefix
    assert g.tokenizer.decode(new) == "\n# user:bye\n# assistant:"
    r2, _ = s.reply(io.StringIO(), max_new_tokens=5, ignore_eos=True)
    assert r2.prefill_tokens == len(new) + 1

    class Interrupting(io.StringIO):  # Ctrl-C during the third write of a reply
        n = 0

        def write(self, x):
            self.n += 1
            if self.n == 3:
                raise KeyboardInterrupt
            return super().write(x)

    before = len(s.ids)
    out = Interrupting()
    s.add_user("again")
    r3, _ = s.reply(out, max_new_tokens=50, ignore_eos=True)
    assert r3 is None and "[interrupted]" in out.getvalue()
    assert before < len(s.ids) < before + 50 + 20  # the partial reply stays in the history
    s.add_user("and on")  # the session goes on
    r4, _ = s.reply(io.StringIO(), max_new_tokens=3, ignore_eos=True)
    assert len(r4.token_ids) == 3
    (m / "bad.jinja").write_text("{{ raise_exception('no system role') }}")

    class Bad:
        chat_template = str(m / "bad.jinja")

    with pytest.raises(ValueError, match="chat template: no system role"):
        mcli.ChatSession(g, mcli._chat_template(g, Bad())).add_user("x")


def test_chat_ctrl_c_in_a_real_process(env):
    p = subprocess.Popen([sys.executable, "-m", "mambart", "chat", DEMO, "--ignore-eos",
                          "--max-new-tokens", "1000000"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env["env"])
    try:
        p.stdin.write("def f(\n")
        p.stdin.flush()
        p.stdout.read(20)  # the reply is streaming
        p.send_signal(signal.SIGINT)
        time.sleep(0.5)
        out, err = p.communicate("/reset\n/exit\n", timeout=120)  # the session goes on
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert "[interrupted]" in out and "Traceback" not in err
    assert "conversation reset" in err


def test_mambart_run_wrapper(env):
    r = subprocess.run([sys.executable, "-c", "import sys; from mambart.cli import run_native; "
                        "sys.exit(run_native(['--max-new-tokens', 'x']))"],
                       capture_output=True, text=True, env=env["env"])
    assert r.returncode == 2 and "--max-new-tokens" in r.stderr  # the C++ program answered


def test_mambart_run_is_on_path_after_pip_install(env):
    import sysconfig

    scripts = Path(sysconfig.get_path("scripts"))
    site = {Path(sysconfig.get_path(k)).resolve() for k in ("purelib", "platlib")}
    if Path(mambart.__file__).resolve().parents[1] not in site:
        pytest.skip(f"the mambart under test ({mambart.__file__}) is not pip-installed here")
    exe = scripts / "mambart-run" if (scripts / "mambart-run").is_file() else \
        shutil.which("mambart-run")
    assert exe, f"pip install should put mambart-run next to mambart ({scripts})"
    model = BUNDLED_DIR / DEMO
    r = subprocess.run([str(exe), str(model), "--tokens", "1,2,3", "--max-new-tokens", "4"],
                       capture_output=True, text=True, env=env["env"], timeout=120)
    assert r.returncode == 0, r.stderr
    ids = [int(t) for t in r.stdout.split()[:4]]
    assert len(ids) == 4 and all(0 <= t < 4096 for t in ids)
