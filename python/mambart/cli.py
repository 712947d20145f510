"""The `mambart` command line: convert, generate, info.

Errors print one line to stderr (`mambart: error: ...`) and exit with status 1 (bad input,
missing model, failed conversion) or 2 (bad command-line usage); no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

DTYPES = ("float32", "float16", "bfloat16")

MODEL_HELP = ("a mambart model directory, a transformers or state-spaces checkpoint directory "
              "(converted into the cache on first use), a short name such as mamba-130m or "
              "mamba2-1.3b, or a hub repository such as state-spaces/mamba-1.4b")

EPILOG = """\
examples:
  mambart generate mamba-130m "The future of AI is" --max-new-tokens 32
  mambart generate state-spaces/mamba2-1.3b "Once upon a time" --temperature 0.8 --top-p 0.9 --seed 1
  mambart convert ./mamba-130m-hf ./mamba-130m-mambart --dtype bfloat16
  mambart info mamba-1.4b

environment:
  MAMBART_CACHE     where converted models are kept (default ~/.cache/mambart)
  MAMBART_*         every runtime option has one (`mambart options`; docs/options.md)
  HF_HUB_OFFLINE=1  use only the Hugging Face cache, never the network
  HF_HUB_CACHE      the Hugging Face cache directory
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line plus a pointer to --help, exit 2
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


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
                       description="Convert a transformers (MambaForCausalLM, Mamba2ForCausalLM) "
                                   "or state-spaces (mamba_ssm) checkpoint directory into a "
                                   "mambart model directory (docs/format.md). Streams tensor by "
                                   "tensor; DST appears only when complete.")
    c.add_argument("src", metavar="SRC", help="checkpoint directory (config.json + "
                   "model.safetensors / pytorch_model.bin, sharded or not)")
    c.add_argument("dst", metavar="DST", help="output directory (must not exist unless --force)")
    c.add_argument("--a-activation", choices=["heavy_tail", "softplus"], default=None,
                   help="Mamba-3 only: the A activation (default heavy_tail, mamba_ssm since "
                        "2026-06-02; softplus for checkpoints trained before)")
    c.add_argument("--dtype", choices=DTYPES, default=None,
                   help="storage dtype of the large matrices (default: the checkpoint's)")
    c.add_argument("--force", action="store_true", help="replace DST if it exists")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)",
                       description="Generate a continuation of PROMPT and stream it to stdout. "
                                   "Greedy unless --temperature > 0.")
    g.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    g.add_argument("prompt", metavar="PROMPT", help="the prompt text (or token ids with --token-ids)")
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
    g.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    g.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute/storage dtype of the weights (default: the model's)")
    g.add_argument("--revision", default=None, metavar="REV",
                   help="hub revision (branch, tag or commit)")
    g.add_argument("--token-ids", action="store_true",
                   help="PROMPT is token ids (e.g. '1,2,3'); print token ids")
    g.add_argument("--echo", action="store_true", help="print the prompt before the output")

    i = sub.add_parser("info", help="describe a model: architecture, sizes, parameters, dtype",
                       description="Describe a model (converting it into the cache first if "
                                   "it is not a mambart directory).")
    i.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    i.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    i.add_argument("--dtype", choices=DTYPES, default=None, help="dtype of the converted copy")
    i.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("options", help="list the runtime options, their values and variables",
                   description="List every runtime option (docs/options.md): its value now, "
                               "its environment variable and default. Set one for a command "
                               "with `mambart -o NAME=VALUE COMMAND ...`.")
    return p


# ---------------------------------------------------------------- commands

def _cmd_convert(a) -> int:
    from .convert import convert

    out = convert(a.src, a.dst, dtype=a.dtype, overwrite=a.force,
                  progress=not a.no_progress, a_activation=a.a_activation)
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


def _cmd_generate(a) -> int:
    from .generator import Generator

    gen = Generator(a.model, device=a.device, dtype=a.dtype, revision=a.revision)
    prompt = _parse_ids(a.prompt) if a.token_ids else a.prompt
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
              top_p=a.top_p, min_p=a.min_p, repetition_penalty=a.repetition_penalty,
              seed=a.seed, stop=a.stop, ignore_eos=a.ignore_eos)
    out = sys.stdout
    if a.echo:
        out.write(a.prompt if not a.token_ids else " ".join(map(str, prompt)))
        out.flush()
    if a.token_ids:
        first = not a.echo
        for tok in gen.stream(prompt, **kw):
            out.write(("" if first else " ") + str(tok))
            out.flush()
            first = False
    else:
        for piece in gen.stream(prompt, **kw):
            out.write(piece)
            out.flush()
    out.write("\n")
    out.flush()
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
           "options": _cmd_options}[args.command]
    try:
        _apply_options(args.option)
        return cmd(args)
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
