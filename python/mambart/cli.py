"""The `mambart` command line: generate, chat, serve, serve-ray, bench, info, convert, cache,
options.

Every subcommand that takes a MODEL takes the same forms: a bundled name (mambart-demo,
mambart2-demo), a short or hub name, a checkpoint directory or a mambart directory.

Errors print one line to stderr (`mambart: error: ...`) and exit with status 1 (bad input,
missing model, failed conversion) or 2 (bad command-line usage); no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

DTYPES = ("float32", "float16", "bfloat16")

MODEL_HELP = ("a bundled model (mambart-demo, mambart2-demo: no download), a mambart model "
              "directory, a transformers or state-spaces checkpoint directory (converted into "
              "the cache on first use), a short name such as mamba-130m or mamba2-1.3b, or a "
              "hub repository such as state-spaces/mamba-1.4b")

EPILOG = """\
examples:
  mambart generate mambart-demo "def parse("          (bundled: runs offline)
  mambart generate mamba-130m "The future of AI is" --max-new-tokens 32
  echo "Once upon a time" | mambart generate mamba2-1.3b - --temperature 0.8 --seed 1
  mambart chat mamba-1.4b
  mambart serve mamba-1.4b --port 8000             (an OpenAI-compatible server)
  mambart bench mambart-demo
  mambart convert mamba-130m ./mamba-130m-mambart --dtype bfloat16
  mambart info mamba-1.4b
  mambart cache list

environment:
  MAMBART_CACHE     where converted models are kept (default ~/.cache/mambart)
  MAMBART_*         every runtime option has one (`mambart options`; docs/options.md)
  HF_HUB_OFFLINE=1  use only the Hugging Face cache, never the network
  HF_HUB_CACHE      the Hugging Face cache directory
"""


class UsageError(Exception):
    """Bad command-line usage found after parsing: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line plus a pointer to --help, exit 2
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def _model_args(p, tokenizer: bool = True, device: bool = True, threads: bool = True) -> None:
    """The MODEL argument and the options that pick how it is loaded: the same for every
    subcommand that loads a model."""
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    if device:
        p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="dtype of the weights (default: the model's)")
    if device and threads:
        p.add_argument("--threads", type=int, default=None, metavar="N",
                       help="CPU threads (default: the cpu_threads option, else the cores this "
                            "process may run on)")
    p.add_argument("--revision", default=None, metavar="REV",
                   help="hub revision (branch, tag or commit)")
    if tokenizer:
        p.add_argument("--tokenizer", default=None, metavar="PATH",
                       help="a tokenizer.json to use instead of the model's")


def _sampling_args(g) -> None:
    g.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="tokens to generate at most (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample from the K most likely tokens (default 0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling: the smallest set with probability >= P "
                        "(default 1 = off)")
    g.add_argument("--min-p", type=float, default=0.0, metavar="P",
                   help="drop tokens less likely than P x the top token (default 0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="penalize tokens already in the prompt or output (default 1 = off)")
    g.add_argument("--seed", type=int, default=None, metavar="S",
                   help="random seed: the same seed gives the same output (default: random)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="keep generating after the end-of-text token")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when this text appears (repeatable); the text is not printed")
    g.add_argument("-q", "--quiet", action="store_true",
                   help="no timing line on stderr")


def _serve_args(p) -> None:
    """The options of `serve` and `serve-ray`."""
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    g.add_argument("--port", type=int, default=8000,
                   help="port (default 8000; 0 picks a free one, printed on stderr)")
    g.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model name clients give (default: MODEL as given)")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help="require `Authorization: Bearer KEY` on /v1 routes (default: "
                        "$MAMBART_API_KEY if set, else none)")
    g.add_argument("--max-running", type=int, default=256, metavar="N",
                   help="requests decoding at once at most: the engine's slots (default 256)")
    g.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="requests waiting for a slot at most; more are refused with 429 "
                        "(default 256)")
    g.add_argument("--max-prompt-tokens", type=int, default=32768, metavar="N",
                   help="longer prompts are refused with 400 (default 32768)")
    g.add_argument("--max-tokens", type=int, default=4096, metavar="N",
                   help="the most tokens a request may generate; chat's default (default 4096)")
    g.add_argument("--chat-template", default=None, metavar="PATH",
                   help="a Jinja2 chat template file (default: the model's, if any)")
    g.add_argument("--prompt-cache", type=int, default=1024, metavar="MB",
                   help="the prompt cache of states (multi-turn chats prefill only their new "
                        "tokens), in MiB (default 1024; 0 = off)")
    g.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds in-flight requests may take to finish before they "
                        "are cancelled (default 30)")
    g.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info; debug adds an access log)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mambart",
                description="mambart: run Mamba and Mamba-2 language models without PyTorch.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    p.add_argument("--version", action="version", version=f"mambart {__version__}")
    p.add_argument("-o", "--option", action="append", default=[], metavar="NAME=VALUE",
                   help="set a runtime option (repeatable; `mambart options` lists them)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    c = sub.add_parser("convert", help="convert a checkpoint into a mambart model directory",
                       description="Convert a transformers (MambaForCausalLM, Mamba2ForCausalLM, "
                                   "FalconMambaForCausalLM), state-spaces (mamba_ssm) or "
                                   "Mistral native (Mamba-Codestral) checkpoint directory into a "
                                   "mambart model directory (docs/format.md). Streams tensor by "
                                   "tensor; DST appears only when complete.")
    c.add_argument("src", metavar="MODEL", help="what to convert: " + MODEL_HELP.replace(
        " (converted into the cache on first use)", " (config.json + model.safetensors / "
        "pytorch_model.bin, sharded or not)"))
    c.add_argument("dst", metavar="DST", help="output directory (must not exist unless --force)")
    c.add_argument("--a-activation", choices=["heavy_tail", "softplus"], default=None,
                   help="Mamba-3 only: the A activation (default heavy_tail, mamba_ssm since "
                        "2026-06-02; softplus for checkpoints trained before)")
    c.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="models with attention layers: the tokens a sequence may hold (the KV "
                        "cache's capacity; default the checkpoint's max_position_embeddings)")
    c.add_argument("--dtype", choices=DTYPES, default=None,
                   help="storage dtype of the large matrices (default: the checkpoint's)")
    c.add_argument("--revision", default=None, metavar="REV",
                   help="hub revision (branch, tag or commit)")
    c.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="a tokenizer.json to copy in instead of the model's")
    c.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="quantize the projections, embedding and head: int8 per "
                        "output channel, or int4 in groups along K (docs/format.md)")
    c.add_argument("--group-size", type=int, default=128, metavar="G",
                   help="int4: weights per scale along K (a multiple of 32; default 128)")
    c.add_argument("--keep-head", action="store_true",
                   help="with --quantize: keep the embedding and lm_head in --dtype")
    c.add_argument("--force", action="store_true", help="replace DST if it exists")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)",
                       description="Generate a continuation of PROMPT and stream it to stdout; "
                                   "a timing line follows on stderr (--quiet: none). Greedy "
                                   "unless --temperature > 0.")
    _model_args(g)
    g.add_argument("prompt", metavar="PROMPT", nargs="?", default=None,
                   help="the prompt text (or token ids with --token-ids); - reads it from "
                        "standard input")
    g.add_argument("--prompt-file", default=None, metavar="PATH",
                   help="read the prompt from this file (instead of PROMPT)")
    _sampling_args(g)
    g.add_argument("--token-ids", action="store_true",
                   help="PROMPT is token ids (e.g. '1,2,3'); print token ids")
    g.add_argument("--echo", action="store_true", help="print the prompt before the output")
    sp = g.add_argument_group("speculative decoding (docs/speculative.md)")
    sp.add_argument("--prompt-lookup", action="store_true",
                    help="guess the next tokens from n-gram matches in the prompt and the text "
                         "so far, checked by the model in one pass (same output)")
    sp.add_argument("--draft", default=None, metavar="MODEL",
                    help="guess the next tokens with this smaller model (same tokenizer)")
    sp.add_argument("--spec-k", type=int, default=None, metavar="N",
                    help="tokens guessed per pass (default 7 for --prompt-lookup, 4 for --draft)")
    sp.add_argument("--spec-adaptive", action="store_true",
                    help="adapt the guesses per pass to the acceptance (--spec-k the most)")

    ch = sub.add_parser("chat", help="an interactive session that keeps the model's state",
                        description="Chat with MODEL: each line you type is a turn, rendered "
                                    "with the tokenizer's chat template when the model has one "
                                    "(tokenizer_config.json; --chat-template), else appended "
                                    "as plain text for the model to continue. The sequence "
                                    "state is kept between turns, so a turn runs only its new "
                                    "tokens. Ctrl-C stops a reply; Ctrl-D or /exit ends the "
                                    "session; /reset starts over.")
    _model_args(ch)
    _sampling_args(ch)
    ch.set_defaults(max_new_tokens=256)
    ch.add_argument("--system", default=None, metavar="TEXT",
                    help="a system message (chat templates only)")
    ch.add_argument("--chat-template", default=None, metavar="PATH",
                    help="a Jinja2 chat template file (default: the model's, if any)")

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs mambart[serve])",
                        description="Serve MODEL over HTTP with the OpenAI API: "
                                    "/v1/completions, /v1/chat/completions (streaming as "
                                    "Server-Sent Events), /v1/models, /health, /metrics "
                                    "(docs/serving.md). Concurrent requests share the engine's "
                                    "decode steps. SIGTERM drains: in-flight requests finish "
                                    "(or are cancelled after --drain-timeout), then exit 0.")
    _model_args(sv)
    _serve_args(sv)

    sr = sub.add_parser("serve-ray", help="the same server as Ray Serve replicas (needs "
                                          "mambart[ray])",
                        description="Run MODEL as Ray Serve replicas behind Ray's HTTP proxy, "
                                    "with the same OpenAI routes as `mambart serve` and Ray's "
                                    "autoscaling (docs/serving.md). Connects to the Ray cluster "
                                    "of RAY_ADDRESS, or starts a local one.")
    _model_args(sr, threads=False)
    _serve_args(sr)
    rg = sr.add_argument_group("replicas")
    rg.add_argument("--replicas", type=int, default=1, metavar="N",
                    help="replicas (default 1); with --max-replicas, the autoscaler's initial "
                         "count")
    rg.add_argument("--min-replicas", type=int, default=None, metavar="N",
                    help="autoscaling: the fewest replicas (default: --replicas)")
    rg.add_argument("--max-replicas", type=int, default=None, metavar="N",
                    help="autoscaling: the most replicas (turns autoscaling on)")
    rg.add_argument("--target-ongoing-requests", type=float, default=32.0, metavar="R",
                    help="autoscaling: requests in flight per replica to aim for (default 32)")
    rg.add_argument("--num-cpus", type=float, default=1.0, metavar="C",
                    help="CPUs Ray reserves per replica (default 1)")
    rg.add_argument("--num-gpus", type=float, default=None, metavar="G",
                    help="GPUs Ray reserves per replica (default: 1 with --device cuda, else 0)")

    b = sub.add_parser("bench", help="measure prefill and decode speed on this machine",
                       description="Measure prompt processing (ppN: N-token prefill) and token "
                                   "generation (tgN: N decode steps after a 1-token prompt) "
                                   "in tokens per second, like llama-bench: the mean and "
                                   "standard deviation of --repetitions runs after one "
                                   "warm-up run; a Markdown table on stdout.")
    _model_args(b, tokenizer=False)
    b.add_argument("-p", "--prompt-lengths", default="128,512", metavar="N[,N...]",
                   help="prefill lengths (default 128,512; 0 = none)")
    b.add_argument("-n", "--gen-lengths", default="64", metavar="N[,N...]",
                   help="decode lengths (default 64; 0 = none)")
    b.add_argument("-r", "--repetitions", type=int, default=3, metavar="R",
                   help="timed runs per test (default 3)")
    b.add_argument("--json", action="store_true", help="print JSON lines instead of a table")

    i = sub.add_parser("info", help="describe a model: architecture, sizes, parameters, dtype",
                       description="Describe a model (converting it into the cache first if "
                                   "it is not a mambart directory).")
    _model_args(i, tokenizer=False, device=False)
    i.add_argument("--json", action="store_true", help="print JSON")

    k = sub.add_parser("cache", help="list or remove the converted copies in the cache",
                       description="Converted copies of checkpoints live in $MAMBART_CACHE/"
                                   "converted (default ~/.cache/mambart). `list` shows each "
                                   "with its size, dtype and source; `rm NAME...` deletes "
                                   "entries (never anything outside the cache, never one in "
                                   "use).")
    ksub = k.add_subparsers(dest="cache_command", metavar="ACTION", parser_class=_Parser)
    kl = ksub.add_parser("list", help="list the converted copies")
    kl.add_argument("--json", action="store_true", help="print JSON")
    kr = ksub.add_parser("rm", help="remove converted copies")
    kr.add_argument("names", metavar="NAME", nargs="*", help="entries (from `cache list`)")
    kr.add_argument("--all", action="store_true", help="remove every entry not in use")
    sub.add_parser("options", help="list the runtime options, their values and variables",
                   description="List every runtime option (docs/options.md): its value now, "
                               "its environment variable and default. Set one for a command "
                               "with `mambart -o NAME=VALUE COMMAND ...`.")
    return p


# ---------------------------------------------------------------- commands

def _cmd_convert(a) -> int:
    from . import hub
    from .convert import convert

    src, tok, info, temp_tok = a.src, a.tokenizer, None, None
    path = Path(os.fspath(a.src)).expanduser()
    if not path.exists():  # a bundled or hub name, as generate and info take
        bundled = hub.bundled_model_dir(a.src)
        if bundled is not None:
            src = bundled
        else:
            snap, temp_tok, repo_id = hub.source_dir(a.src, a.revision)
            src, info = snap, {"repo": repo_id, "revision": snap.name,
                               "requested_revision": a.revision}
            tok = tok or temp_tok
    try:
        out = convert(src, a.dst, dtype=a.dtype, overwrite=a.force, tokenizer=tok,
                      progress=not a.no_progress,
                      a_activation=a.a_activation, source_info=info,
                      quantize=a.quantize, int4_group_size=a.group_size,
                      quantize_head=not a.keep_head, max_context=a.max_context)
    finally:
        hub.release_tokenizer(temp_tok)
    d = _describe(out)
    sys.stderr.write(f"converted {a.src} -> {out}: {d['architecture']}, "
                     f"{d['parameters']:,} parameters, {d['dtype']}\n")
    print(out)
    return 0


def _parse_ids(text: str) -> List[int]:
    parts = [t for t in text.replace(",", " ").split() if t]
    try:
        ids = [int(t) for t in parts]
    except ValueError:
        raise ValueError(f"--token-ids: PROMPT must be integers separated by commas or spaces, "
                         f"got {text!r}") from None
    if not ids:
        raise ValueError("--token-ids: PROMPT holds no token ids")
    return ids


def _read_prompt(a) -> str:
    if a.prompt_file is not None:
        if a.prompt is not None:
            raise UsageError("give PROMPT or --prompt-file, not both")
        from ._files import read_bounded_text

        return read_bounded_text(a.prompt_file, 64 << 20, "prompt file")  # errors name it
    if a.prompt is None:
        raise UsageError("give a PROMPT, - to read it from standard input, or --prompt-file")
    if a.prompt == "-":
        return sys.stdin.read()
    return a.prompt


def _generator(a, **kw):
    from .generator import Generator

    return Generator(a.model, device=getattr(a, "device", "cpu"), dtype=a.dtype,
                     revision=a.revision, tokenizer=getattr(a, "tokenizer", None),
                     threads=getattr(a, "threads", None), **kw)


def _need_tokenizer(gen, a) -> None:
    if gen.tokenizer is None:
        raise ValueError(f"{a.model} has no tokenizer.json: pass --tokenizer PATH (a "
                         f"tokenizer.json)" + (" or token ids with --token-ids"
                                               if hasattr(a, "token_ids") else ""))


def _sampling(a) -> dict:
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                top_p=a.top_p, min_p=a.min_p, repetition_penalty=a.repetition_penalty,
                seed=a.seed, stop=a.stop, ignore_eos=a.ignore_eos)


def _speculative(a):
    """generate's speculative= from --prompt-lookup / --draft / --spec-k (None: off)."""
    if a.prompt_lookup and a.draft:
        raise ValueError("--prompt-lookup and --draft exclude each other")
    if a.spec_k is not None and not (a.prompt_lookup or a.draft):
        raise ValueError("--spec-k needs --prompt-lookup or --draft")
    if a.spec_adaptive and not (a.prompt_lookup or a.draft):
        raise ValueError("--spec-adaptive needs --prompt-lookup or --draft")
    if not (a.prompt_lookup or a.draft):
        return None
    spec = dict(method="prompt_lookup") if a.prompt_lookup else dict(draft=a.draft)
    if a.spec_k is not None:
        spec["k"] = a.spec_k
    if a.spec_adaptive:
        spec["adaptive"] = True
    return spec


def timing_line(r) -> str:
    """One line for a finished generation (a GenerationResult)."""
    n = len(r.token_ids)
    ran = f", {r.prefill_tokens} run" if r.prefill_tokens != r.prompt_tokens else ""
    return (f"mambart: {r.prompt_tokens} prompt tokens{ran}, prefill {r.prefill_ms:.1f} ms; "
            f"{n} new tokens, decode {r.tokens_per_s:.1f} tok/s; stop: {r.finish_reason}")


def _cmd_generate(a) -> int:
    text = _read_prompt(a)
    gen = _generator(a)
    if a.token_ids:
        prompt = _parse_ids(text)
    else:
        _need_tokenizer(gen, a)
        prompt = text
    out = sys.stdout
    if a.echo:
        out.write(text if not a.token_ids else " ".join(map(str, prompt)))
        out.flush()
    spec = _speculative(a)
    if spec is not None:  # one call (not streamed), then the text or the ids
        r = gen.generate(prompt, speculative=spec, **_sampling(a))
        if a.token_ids:
            out.write(("" if not a.echo else " ") + " ".join(map(str, r.token_ids)))
        else:
            out.write(r.text or "")
        out.write("\n")
        out.flush()
        if not a.quiet:
            s = r.speculative
            sys.stderr.write(timing_line(r) + f"; speculative: {s['accepted']}/{s['proposed']} "
                             f"guesses kept ({100 * s['acceptance_rate']:.0f}%), "
                             f"{s['verifications']} passes\n")
        return 0
    it = gen.stream(prompt, **_sampling(a))
    first = not a.echo
    for piece in it:
        if a.token_ids:
            piece = ("" if first else " ") + str(piece)
            first = False
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    if not a.quiet and it.result is not None:
        sys.stderr.write(timing_line(it.result) + "\n")
    return 0


def _describe(model_dir) -> dict:
    from . import _C
    from ._tensorio import read_safetensors_header
    from .convert import load_json

    model_dir = os.fspath(model_dir)
    cfg_path = os.path.join(model_dir, "config.json")
    cfg = load_json(cfg_path)
    spec = _C.config_spec(json.dumps(cfg), cfg_path)["config"]  # the runtime's reading
    st = os.path.join(model_dir, "model.safetensors")
    tensors = read_safetensors_header(st)
    n = sum(t.numel for t in tensors.values())
    d = {
        "path": os.path.abspath(model_dir),
        "architecture": cfg.get("architecture"),
        "parameters": n,
        "dtype": cfg.get("dtype"),
        "file_bytes": os.path.getsize(st),
        "tokenizer": os.path.isfile(os.path.join(model_dir, "tokenizer.json")),
    }
    for k in ("d_model", "n_layer", "vocab_size", "vocab_size_padded", "norm",
              "residual_in_fp32", "tie_embeddings", "eos_token_id"):
        d[k] = spec.get(k)
    # A uniform stack: its layer fields at the top level too (d_inner, d_state, ...).
    for k, v in spec.items():
        if k not in d and k not in ("layers", "layer_types", "num_params", "bos_token_id",
                                    "norm_eps", "dtype", "architecture"):
            d[k] = v
    d["layers"] = spec["layers"]
    d["source"] = cfg.get("source")
    return d


def _layer_groups(layers: list) -> List[str]:
    """Runs of identical layer entries as 'N x type (field value, ...)' lines."""
    out, i = [], 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[i]:
            j += 1
        e = layers[i]
        fields = ", ".join(f"{k} {v}" for k, v in e.items() if k != "type")
        span = f"{i}" if i == j else f"{i}-{j}"
        out.append(f"{span}: {j - i + 1} x {e['type']} ({fields})")
        i = j + 1
    return out


def _cmd_info(a) -> int:
    from .generator import _resolve

    model_dir = _resolve(a.model, a.revision, a.dtype)[0]
    from . import _C

    # The checks Generator makes (config, every tensor's name, dtype, shape, finiteness): a
    # directory that cannot be loaded is an error, not a description (issue 23). On the CPU the
    # weights are mapped, not copied.
    _C.Generator(str(model_dir), "cpu", None)
    d = _describe(model_dir)
    if a.json:
        print(json.dumps(d, indent=2))
        return 0
    lines = [
        f"model:        {a.model}",
        f"architecture: {d['architecture']}",
        f"parameters:   {d['parameters']:,} ({d['parameters'] / 1e6:.1f} M)",
        f"dtype:        {d['dtype']} ({d['file_bytes'] / 2**20:.1f} MiB on disk)",
        f"d_model:      {d['d_model']}",
        f"n_layer:      {d['n_layer']}",
    ]
    groups = _layer_groups(d["layers"])
    lines += [("layers:       " if k == 0 else "              ") + g for k, g in enumerate(groups)]
    lines += [
        f"vocab:        {d['vocab_size']} (padded {d['vocab_size_padded']})",
        f"norm:         {d['norm']}, residual_in_fp32={d['residual_in_fp32']}, "
        f"tied head={d['tie_embeddings']}",
        f"tokenizer:    {'yes' if d['tokenizer'] else 'no'}",
        f"location:     {d['path']}",
    ]
    src = d.get("source")
    if isinstance(src, dict):
        origin = src.get("repo") or src.get("path")
        rev = f" @ {src['revision']}" if src.get("revision") else ""
        lines.append(f"converted from: {src.get('format')} {origin}{rev}")
    print("\n".join(lines))
    return 0


# ---------------------------------------------------------------- chat

def _chat_template(gen, a) -> Optional[str]:
    """The Jinja2 chat template: --chat-template, else the model's (chat_template.py)."""
    from .chat_template import find_chat_template

    return find_chat_template(gen.model_dir, gen.config, a.chat_template)


class ChatSession:
    """A conversation with one generator: the token history and the rendering of turns.

    With a chat template, each turn appends the text the template adds for the new messages
    (the conversation rendered before and after, the common prefix cut), so the history stays
    the exact tokens already run; without one, a turn appends the user's text as is. The
    generator's prompt cache holds the state after every reply, so a turn runs only the tokens
    after the longest cached prefix of its history (its own new tokens)."""

    def __init__(self, gen, template: Optional[str], system: Optional[str] = None):
        self.gen, self.template = gen, template
        self._render = None
        if template is not None:
            from .chat_template import ChatTemplate

            self._render = ChatTemplate(template)
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.ids: List[int] = []
        self.rendered = ""

    def _render_text(self, generation_prompt: bool) -> str:
        return self._render.render(self.messages, generation_prompt, bos_token="", eos_token="")

    def add_user(self, text: str) -> List[int]:
        """Appends a user turn; returns the new tokens it adds to the history."""
        enc = self.gen.tokenizer.encode
        if self._render is None:
            ids = enc(text).ids
        else:
            self.messages.append({"role": "user", "content": text})
            full = self._render_text(True)
            if not full.startswith(self.rendered):  # the template rewrote earlier turns
                self.ids, self.rendered = [], ""
            ids = enc(full[len(self.rendered):]).ids
            self.rendered = full
        self.ids += ids
        return ids

    def add_reply(self, text: str, token_ids: List[int]) -> None:
        """Appends the model's reply: its tokens exactly as generated."""
        self.ids += list(token_ids)
        if self._render is not None:
            self.messages.append({"role": "assistant", "content": text})
            self.rendered += text

    def reply(self, out, **kw):
        """Streams a reply to `out`; returns (GenerationResult or None if interrupted, text)."""
        from .generator import GenerationResult
        from .text import TextStream

        stops = kw.pop("stop", None) or []
        ts = TextStream(self.gen.tokenizer, stops)
        it = self.gen.stream(list(self.ids), **kw)
        try:
            for tok in it:
                piece = ts.push(tok)
                if piece:
                    out.write(piece)
                    out.flush()
                if ts.stopped:
                    break
            out.write(ts.finish())
            out.flush()
        except KeyboardInterrupt:  # stop this reply, keep the session
            out.write(ts.finish() + "\n[interrupted]")
            out.flush()
            self.add_reply(ts.text, ts.token_ids)
            return None, ts.text
        finally:
            it.close()  # a reply left early (stop string, Ctrl-C) cancels its request
        self.add_reply(ts.text, ts.token_ids)
        r = it.result
        if r is None:  # stopped by a stop string: the tokens up to it
            r = GenerationResult(ts.token_ids, "stop_string", len(self.ids), 0.0, 0.0, ts.text)
        return r, ts.text


def _history_file() -> Path:
    from ._cache import cache_root

    return cache_root() / "chat_history"


def _cmd_chat(a) -> int:
    gen = _generator(a, prompt_cache_bytes=256 << 20)
    _need_tokenizer(gen, a)
    session = ChatSession(gen, _chat_template(gen, a), a.system)
    interactive = sys.stdin.isatty()
    hist = None
    if interactive:
        try:
            import readline

            hist = _history_file()
            if hist.is_file():
                readline.read_history_file(str(hist))
        except (ImportError, OSError):
            hist = None
    mode = "chat template" if session.template else "no chat template: text continues"
    sys.stderr.write(f"mambart chat: {a.model} ({mode}); Ctrl-C stops a reply, Ctrl-D or "
                     f"/exit ends, /reset starts over\n")
    kw = _sampling(a)
    try:
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                break
            except KeyboardInterrupt:
                sys.stderr.write("\n")
                continue
            cmd = line.strip()
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/reset":
                session.reset()
                sys.stderr.write("mambart: conversation reset\n")
                continue
            if not cmd:
                continue
            session.add_user(line if session.template else line + "\n")
            r, _ = session.reply(sys.stdout, **kw)
            sys.stdout.write("\n")
            sys.stdout.flush()
            if r is not None and not a.quiet:
                sys.stderr.write(timing_line(r) + "\n")
    finally:
        if hist is not None:
            try:
                import readline

                hist.parent.mkdir(parents=True, exist_ok=True)
                readline.set_history_length(1000)
                readline.write_history_file(str(hist))
            except OSError:
                pass
    return 0


# ---------------------------------------------------------------- serve

def _serve_config(a):
    """-> (ServeConfig, chat template text or None) from the serve options, checked."""
    from .serve import ServeConfig

    for flag, v, lo in (("--port", a.port, 0), ("--max-running", a.max_running, 1),
                        ("--max-queue", a.max_queue, 1), ("--max-prompt-tokens",
                                                         a.max_prompt_tokens, 1),
                        ("--max-tokens", a.max_tokens, 1), ("--prompt-cache", a.prompt_cache, 0)):
        if v < lo:
            raise UsageError(f"{flag} must be >= {lo}, got {v}")
    if a.port > 65535:
        raise UsageError(f"--port must be <= 65535, got {a.port}")
    if not a.drain_timeout >= 0:
        raise UsageError(f"--drain-timeout must be >= 0, got {a.drain_timeout}")
    template = None
    if a.chat_template is not None:
        from .chat_template import find_chat_template

        template = find_chat_template(None, {}, a.chat_template)
    key = a.api_key if a.api_key is not None else os.environ.get("MAMBART_API_KEY") or None
    return ServeConfig(model_name=a.served_model_name or a.model,
                       max_prompt_tokens=a.max_prompt_tokens, max_tokens=a.max_tokens,
                       max_running=a.max_running, max_queue=a.max_queue, api_key=key,
                       chat_template=template, drain_timeout=a.drain_timeout)


def _need_serve_deps(extra: str, modules) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"this command needs {', '.join(missing)}: pip install "
                          f"\"mambart[{extra}]\"")


def _cmd_serve(a) -> int:
    _need_serve_deps("serve", ["fastapi", "uvicorn", "jinja2", "prometheus_client"])
    from .serve import serve

    cfg = _serve_config(a)
    gen = _generator(a, prompt_cache_bytes=a.prompt_cache << 20)
    _need_tokenizer(gen, a)
    return serve(gen, cfg, host=a.host, port=a.port, log_level=a.log_level)


def _cmd_serve_ray(a) -> int:
    _need_serve_deps("ray", ["ray", "fastapi", "uvicorn", "jinja2", "prometheus_client"])
    from .serve_ray import run_ray

    cfg = _serve_config(a)
    for flag, v in (("--replicas", a.replicas), ("--min-replicas", a.min_replicas),
                    ("--max-replicas", a.max_replicas)):
        if v is not None and v < (0 if flag == "--min-replicas" else 1):
            raise UsageError(f"{flag} must be >= {0 if flag == '--min-replicas' else 1}, got {v}")
    return run_ray(a.model, cfg, device=a.device, dtype=a.dtype, revision=a.revision,
                   tokenizer=a.tokenizer, prompt_cache_mb=a.prompt_cache, host=a.host,
                   port=a.port, replicas=a.replicas, min_replicas=a.min_replicas,
                   max_replicas=a.max_replicas, target_ongoing=a.target_ongoing_requests,
                   num_cpus=a.num_cpus, num_gpus=a.num_gpus)


# ---------------------------------------------------------------- bench

def _lengths(flag: str, text: str) -> List[int]:
    try:
        out = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"{flag}: expected integers separated by commas, got {text!r}") from None
    if any(n < 0 for n in out):
        raise UsageError(f"{flag}: lengths must be >= 0, got {text!r}")
    return [n for n in out if n > 0]


def _cmd_bench(a) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    pp = _lengths("--prompt-lengths", a.prompt_lengths)
    tg = _lengths("--gen-lengths", a.gen_lengths)
    if a.repetitions < 1:
        raise UsageError(f"--repetitions must be >= 1, got {a.repetitions}")
    if not pp and not tg:
        raise UsageError("nothing to measure: --prompt-lengths and --gen-lengths are both 0")
    gen = _generator(a)
    rng = np.random.default_rng(0)
    vocab = gen.vocab_size
    tests = [("pp", n) for n in pp] + [("tg", n) for n in tg]
    bar = tqdm(total=len(tests) * (a.repetitions + 1), desc="bench", unit="run",
               file=sys.stderr, leave=False)
    rows = []
    try:
        for kind, n in tests:
            speeds = []
            for rep in range(a.repetitions + 1):  # the first run warms up, untimed
                bar.set_postfix_str(f"{kind}{n}")
                if kind == "pp":
                    ids = [int(t) for t in rng.integers(1, vocab, size=n)]
                    r = gen.generate(ids, max_new_tokens=1, ignore_eos=True)
                    speed = n / (r.prefill_ms / 1e3) if r.prefill_ms > 0 else float("inf")
                else:
                    r = gen.generate([int(rng.integers(1, vocab))], max_new_tokens=n + 1,
                                     ignore_eos=True, temperature=0.0)
                    speed = r.tokens_per_s  # tokens after the first over the decode time
                if rep:
                    speeds.append(speed)
                bar.update(1)
            rows.append((f"{kind}{n}", float(np.mean(speeds)), float(np.std(speeds))))
    finally:
        bar.close()
    params = _describe(gen.model_dir)["parameters"]
    if a.json:
        for test, mean, std in rows:
            print(json.dumps({"model": a.model, "parameters": params, "dtype": gen.dtype,
                              "device": gen.device, "test": test, "tokens_per_s": round(mean, 2),
                              "std": round(std, 2), "repetitions": a.repetitions}))
        return 0
    head = ["model", "params", "dtype", "device", "test", "t/s"]
    body = [[a.model, f"{params / 1e6:.2f} M", gen.dtype, gen.device, t, f"{m:.2f} ± {sd:.2f}"]
            for t, m, sd in rows]
    w = [max(len(str(r[i])) for r in [head] + body) for i in range(len(head))]

    def line(cells):  # a Markdown row; the last column (the numbers) right-aligned
        return "| " + " | ".join(str(c).rjust(w[i]) if i == len(w) - 1 else str(c).ljust(w[i])
                                 for i, c in enumerate(cells)) + " |"

    print(line(head))
    print("|" + "|".join("-" * (x + 1) + (":" if i == len(w) - 1 else "-")
                         for i, x in enumerate(w)) + "|")
    for r in body:
        print(line(r))
    return 0


# ---------------------------------------------------------------- cache

def _cmd_cache(a) -> int:
    from . import _cache

    if a.cache_command is None:
        raise UsageError("cache needs an action: list or rm")
    if a.cache_command == "list":
        es = _cache.entries()
        if a.json:
            print(json.dumps(es, indent=2))
            return 0
        root = _cache.converted_root()
        if not es:
            print(f"the cache is empty ({root})")
            return 0
        for e in es:
            flags = (" [in use]" if e["in_use"] else "") + ("" if e["valid"] else " [incomplete]")
            print(f"{e['name']}  {e['bytes'] / 2**20:.1f} MiB  {e['dtype'] or '?'}  "
                  f"from {e['source'] or '?'}{flags}")
        total = sum(e["bytes"] for e in es)
        print(f"{len(es)} entries, {total / 2**20:.1f} MiB in {root}")
        return 0
    names = list(a.names)
    if a.all:
        if names:
            raise UsageError("give NAMEs or --all, not both")
        names = [e["name"] for e in _cache.entries() if not e["in_use"]]
    elif not names:
        raise UsageError("cache rm needs NAMEs (see `mambart cache list`) or --all")
    for n in names:
        d = _cache.remove_entry(n)
        print(f"removed {d}")
    return 0


def run_native(argv: Optional[List[str]] = None) -> int:
    """`mambart-run` on PATH: runs the C++ example program installed in the package."""
    exe = Path(os.path.abspath(__file__)).parent / "bin" / "mambart-run"
    if not os.access(exe, os.X_OK):
        sys.stderr.write(f"mambart-run: {exe} is missing (the package was built without it)\n")
        return 1
    args = sys.argv[1:] if argv is None else list(argv)
    os.execv(str(exe), [str(exe)] + args)
    return 1  # not reached


def _apply_options(items: List[str]) -> None:
    from .options import set_options

    values = {}
    for it in items:
        name, eq, value = it.partition("=")
        if not eq or not name or not value:
            raise ValueError(f"-o {it!r}: expected NAME=VALUE (see `mambart options`)")
        values[name.strip()] = value
    if values:
        set_options(**values)


def _cmd_options(args) -> int:
    from .options import option_table, options

    now = options()
    for o in option_table():
        allowed = f" ({o['choices']})" if o["choices"] else ""
        print(f"{o['name']} = {now[o['name']] or '(unset)'}{allowed}")
        print(f"    {o['env']}, default {o['default'] or '(unset)'}: {o['help']}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    cmd = {"convert": _cmd_convert, "generate": _cmd_generate, "info": _cmd_info,
           "options": _cmd_options, "chat": _cmd_chat, "bench": _cmd_bench,
           "cache": _cmd_cache, "serve": _cmd_serve, "serve-ray": _cmd_serve_ray}[args.command]
    try:
        _apply_options(args.option)
        return cmd(args)
    except UsageError as e:
        sys.stderr.write(f"mambart: error: {e} (see mambart {args.command} --help)\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("mambart: interrupted\n")
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except (ValueError, OSError, RuntimeError, ImportError, MemoryError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.stderr.write(f"mambart: error: {msg}\n")
        return 1
    except Exception as e:  # a bug: still one line, no traceback (MAMBART_DEBUG=1 shows it)
        if os.environ.get("MAMBART_DEBUG"):
            raise
        sys.stderr.write(f"mambart: internal error: {type(e).__name__}: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
