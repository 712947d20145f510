"""Mamba-3 on the GPU (issue 15): mambart against mamba_ssm's own Mamba3 module, with the same
random weights, in one run on one device. JSON lines out (printed and appended to --out).

Run (on the GPU machine; mamba_ssm's source tree on PYTHONPATH or at --mamba-src; only its
Triton SISO prefill is needed, its compiled extensions are not):

    python tools/bench_mamba3.py --models mamba3-siso-1.5b mamba3-mimo-1.5b --out m3.jsonl
    python tools/bench_mamba3.py --models mamba3-siso-1.5b --accuracy --out m3.jsonl

CPU smoke run (what tests/test_bench_tool.py runs):

    python tools/bench_mamba3.py --device cpu --models tiny3 --prefill 16 --batches 1 2 \
        --gen 4 --repeats 1 --accuracy --acc-prompt 8 --acc-gen 4 --engines mambart

Shapes (SHAPES below). The published checkpoints' config.json could not be read here, so the
sizes are ASSUMED from the model names and mamba_ssm's Mamba3 defaults: d_state 128, headdim 64,
expand 2, ngroups 1, rope_fraction 0.5, no output norm, heavy-tail A, Llama-3 vocabulary 128256
(tied), no MLP; 1.5b: d_model 2048, 48 layers (~1.5e9 parameters); 187m: d_model 768, 24 layers;
MIMO: mimo_rank 4, chunk 16. Each record carries the shape it ran.

Weights: drawn once per model (tests/mamba3_ref.random_weights per layer: N(0, 1/fan_in)
projections, biases near 1, dt_bias in softplus^-1([1e-3, 1e-1])), rounded to bf16 (the
parameters mamba_ssm keeps in fp32 -- dt_bias, B_bias, C_bias, D, mimo_* -- stay fp32) and
written in mambart's format; mamba_ssm's module loads the same values through its state dict.

Speed (--engines; median of --repeats after a warm-up):
- mambart: prefill_ms at each --prefill length (generate(prompt, 1 token).prefill_ms);
  decode at each --batches size (result.decode_ms / (new tokens - 1), --gen tokens): batch 1 as
  decode_ms_per_token with gb_s / pct_copy_bw (weight bytes / step time against a 1 GiB
  device-to-device copy, as tools/bench.py), larger batches as decode_tokens_per_s.
- mamba_ssm: prefill_ms = wall time of model(x, num_last_tokens=1) (MambaLMHeadModel, Mamba3
  layers: the Triton SISO prefill mamba3_siso_combined; MIMO needs TileLang). Decode: its step
  needs the CuTe DSL kernel (mamba3_step_fn) and generate() fails in decode (issues 1014, 1022):
  a "missing" record says which.
Accuracy (--accuracy): a --acc-prompt token prompt; logits against a float64 numpy reference of
the whole model (tests/mamba3_ref.recurrent per layer): max |err| / max |ref| and mean |err| for
mambart bf16, mambart fp32 (the same file loaded as float32) and mamba_ssm bf16; greedy
agreement over --acc-gen tokens against the float64 greedy continuation (mamba_ssm: a full
forward per token, as it has no working decode step here): tokens equal before the first
difference, and equal positions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
import mamba3_ref as ref  # noqa: E402
from model_dirs import bf16_bits, encode, write_safetensors  # noqa: E402

SHAPES = {
    "tiny3": dict(d_model=64, n_layer=2, vocab=256, d_state=16, headdim=16),
    "mamba3-siso-187m": dict(d_model=768, n_layer=24),
    "mamba3-siso-1.5b": dict(d_model=2048, n_layer=48),
    "mamba3-mimo-187m": dict(d_model=768, n_layer=24, mimo_rank=4),
    "mamba3-mimo-1.5b": dict(d_model=2048, n_layer=48, mimo_rank=4),
}


def layer_entry(s: dict) -> dict:
    mimo = s.get("mimo_rank", 1) > 1
    E = 2 * s["d_model"]
    P = s.get("headdim", 64)
    return dict(type="mamba3", d_inner=E, d_state=s.get("d_state", 128), headdim=P, nheads=E // P,
                ngroups=1, is_mimo=mimo, mimo_rank=s.get("mimo_rank", 1), rope_fraction=0.5,
                chunk_size=16 if mimo else 64, is_outproj_norm=False, a_activation="heavy_tail",
                a_floor=1e-4)


def model_config(name: str) -> dict:
    s = SHAPES[name]
    V = s.get("vocab", 128256)
    return dict(mambart_format=1, architecture="mamba3", d_model=s["d_model"], vocab_size=V,
                vocab_size_padded=V, norm="rmsnorm", norm_eps=1e-5, residual_in_fp32=True,
                tie_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                dtype="bfloat16", n_layer=s["n_layer"], layers=[layer_entry(s)] * s["n_layer"])


def round_bf16(a: np.ndarray) -> np.ndarray:
    return (bf16_bits(a).astype(np.uint32) << 16).view(np.float32).reshape(a.shape)


def make_weights(c: dict, seed: int = 0) -> dict:
    """Host float32 tensors by mambart name, already rounded to what the file stores."""
    from mambart import _C

    spec = {t["name"]: t for t in _C.config_spec(json.dumps(c), "bench")["tensors"]}
    rng = np.random.default_rng(seed)
    d = c["d_model"]
    w = {"embedding.weight": rng.standard_normal((c["vocab_size_padded"], d), np.float32)
         * np.float32(2.0 / np.sqrt(d)),
         "norm_f.weight": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)}
    for i, e in enumerate(c["layers"]):
        w[f"layers.{i}.norm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        for k, v in ref.random_weights(e, d, rng).items():
            w[f"layers.{i}.mixer.{k}"] = v
    assert set(w) == set(spec), sorted(set(w) ^ set(spec))
    for k, t in spec.items():
        if not t["store_fp32"]:
            w[k] = round_bf16(w[k])
    return w


def write_model(path: Path, c: dict, w: dict) -> int:
    from mambart import _C

    spec = {t["name"]: t for t in _C.config_spec(json.dumps(c), "bench")["tensors"]}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(c, indent=1))
    write_safetensors(path / "model.safetensors",
                      {k: encode(v, "float32" if spec[k]["store_fp32"] else "bfloat16")
                       for k, v in w.items()})
    return sum(v.size for v in w.values())


# ----------------------------------------------------------------------------- float64 reference


def _rms(x, w, eps=1e-5):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def ref_forward(w: dict, c: dict, ids, states=None):
    """float64 logits (L, V) of `ids` after `states` (per layer; None: zeros) and the states."""
    f = lambda k: np.asarray(w[k], np.float64)  # noqa: E731
    emb = f("embedding.weight")
    residual = emb[ids]
    hidden = None
    out_states = []
    for i, e in enumerate(c["layers"]):
        if hidden is not None:
            residual = residual + hidden
        normed = _rms(residual, f(f"layers.{i}.norm.weight"))
        lw = {k.split(".mixer.", 1)[1]: v for k, v in w.items()
              if k.startswith(f"layers.{i}.mixer.")}
        hidden, st = ref.recurrent(normed, lw, e, None if states is None else states[i])
        out_states.append(st)
    residual = residual + hidden
    return (_rms(residual, f("norm_f.weight")) @ emb.T)[:, :c["vocab_size"]], out_states


def ref_greedy(w, c, ids, n):
    logits, st = ref_forward(w, c, ids)
    out = []
    for _ in range(n):
        t = int(np.argmax(logits[-1]))
        out.append(t)
        logits, st = ref_forward(w, c, [t], st)
    return out


# ----------------------------------------------------------------------------- engines


def emit(args, **rec):
    rec = dict(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **rec)
    line = json.dumps(rec)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


def torch_cuda(device):
    if not device.startswith("cuda"):
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def errs(got, want):
    d = np.abs(np.asarray(got, np.float64) - want)
    return dict(max_rel_err=float(d.max() / np.abs(want).max()), mean_abs_err=float(d.mean()),
                ref_max_abs=float(np.abs(want).max()))


def agreement(a, b):
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return dict(greedy_prefix_agree=first, greedy_equal_positions=sum(x == y for x, y in zip(a, b)),
                greedy_tokens=len(b))


def bench_mambart(args, name, c, path, nparams, bw, acc):
    import mambart

    base = dict(engine="mambart", engine_version=mambart.__version__, model=name,
                shape=c["layers"][0], d_model=c["d_model"], n_layer=c["n_layer"], params=nparams,
                git=args.git, gpu=args.gpu)
    g = mambart.Generator(str(path), device=args.device, dtype="bfloat16")
    rng = np.random.default_rng(1)
    V = c["vocab_size"]
    for L in args.prefill:
        ids = [int(t) for t in rng.integers(0, V, L)]
        g.generate(ids, max_new_tokens=1, ignore_eos=True)
        ms = statistics.median(g.generate(ids, max_new_tokens=1, ignore_eos=True).prefill_ms
                               for _ in range(args.repeats))
        emit(args, **base, dtype="bfloat16", metric="prefill_ms", prompt_len=L, value=round(ms, 3),
             tokens_per_s=round(L / ms * 1e3, 1))
    for B in args.batches:
        prompts = [[int(t) for t in rng.integers(0, V, 16)] for _ in range(B)]
        p = prompts if B > 1 else prompts[0]
        g.generate(p, max_new_tokens=min(args.gen, 8), ignore_eos=True)
        per = []
        for _ in range(args.repeats):
            r = g.generate(p, max_new_tokens=args.gen, ignore_eos=True)
            r0 = r[0] if B > 1 else r
            per.append(r0.decode_ms / (len(r0.token_ids) - 1))
        ms = statistics.median(per)
        rec = dict(base, dtype="bfloat16", batch=B, ms_per_step=round(ms, 4), gen=args.gen,
                   tokens_per_s=round(B / ms * 1e3, 1))
        if B == 1:
            wb = nparams * 2
            rec.update(metric="decode_ms_per_token", value=round(ms, 4),
                       gb_s=round(wb / (ms * 1e-3) / 1e9, 2))
            if bw:
                rec.update(pct_copy_bw=round(100 * rec["gb_s"] / bw, 1),
                           bw_limit_ms=round(wb / (bw * 1e9) * 1e3, 4))
        else:
            rec.update(metric="decode_tokens_per_s", value=rec["tokens_per_s"])
        emit(args, **rec)
    if acc is not None:
        ids, want, greedy = acc
        for dtype in ("bfloat16", "float32"):
            gd = g if dtype == "bfloat16" else mambart.Generator(str(path), device=args.device,
                                                                 dtype="float32")
            got = gd.logits(ids)
            toks = gd.generate(ids, max_new_tokens=len(greedy), ignore_eos=True).token_ids
            emit(args, **base, dtype=dtype, metric="accuracy", prompt_len=len(ids),
                 reference="float64 numpy (tests/mamba3_ref.py)", **errs(got, want),
                 **agreement(toks, greedy))
            del gd


def import_mamba_ssm(args):
    """(MambaLMHeadModel, MambaConfig, mamba3 module, how) or raises with the reason. Imports the
    package normally; if its __init__ fails (e.g. a compiled extension), imports the submodules
    from the source tree without running mamba_ssm/__init__.py."""
    if args.mamba_src and str(args.mamba_src) not in sys.path:
        sys.path.insert(0, str(args.mamba_src))
    try:
        import mamba_ssm  # noqa: F401
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
        from mamba_ssm.modules import mamba3 as m3mod
        return MambaLMHeadModel, MambaConfig, m3mod, "import mamba_ssm"
    except Exception as e:  # noqa: BLE001
        first = f"{type(e).__name__}: {e}"
    for k in [k for k in sys.modules if k == "mamba_ssm" or k.startswith("mamba_ssm.")]:
        del sys.modules[k]
    src = None
    for p in sys.path:
        if p and (Path(p) / "mamba_ssm" / "modules" / "mamba3.py").is_file():
            src = Path(p) / "mamba_ssm"
            break
    if src is None:
        raise ImportError(f"import mamba_ssm failed ({first}) and no source tree on sys.path")
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = [str(src)]
    pkg.__version__ = "source"
    sys.modules["mamba_ssm"] = pkg
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mamba_ssm.modules import mamba3 as m3mod
    return MambaLMHeadModel, MambaConfig, m3mod, f"submodules from {src} ({first})"


def bench_mamba_ssm(args, name, c, w, nparams, acc):
    base = dict(engine="mamba_ssm", model=name, dtype="bfloat16", shape=c["layers"][0],
                d_model=c["d_model"], n_layer=c["n_layer"], params=nparams, git=args.git,
                gpu=args.gpu)
    torch = torch_cuda(args.device)
    if torch is None:
        emit(args, **base, metric="missing", value=f"needs torch with CUDA (device {args.device})")
        return
    try:
        LM, Cfg, m3mod, how = import_mamba_ssm(args)
    except Exception as e:  # noqa: BLE001
        emit(args, **base, metric="missing", value=f"import: {type(e).__name__}: {e}"[:2000])
        return
    base.update(import_how=how[:500], engine_version=getattr(sys.modules["mamba_ssm"],
                                                             "__version__", "?"))
    e = c["layers"][0]
    ssm_cfg = dict(layer="Mamba3", d_state=e["d_state"], headdim=e["headdim"], expand=2,
                   ngroups=e["ngroups"], rope_fraction=e["rope_fraction"], is_mimo=e["is_mimo"],
                   mimo_rank=e["mimo_rank"], chunk_size=e["chunk_size"],
                   is_outproj_norm=e["is_outproj_norm"], A_floor=e["a_floor"])
    try:
        cfg = Cfg(d_model=c["d_model"], d_intermediate=0, n_layer=c["n_layer"],
                  vocab_size=c["vocab_size"], ssm_cfg=ssm_cfg, rms_norm=True,
                  residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8,
                  tie_embeddings=True)
        model = LM(cfg, device="cuda", dtype=torch.bfloat16).eval()
    except Exception as ex:  # noqa: BLE001  (MIMO without TileLang asserts here)
        emit(args, **base, metric="missing", value=f"build: {type(ex).__name__}: {ex}"[:2000])
        return
    sd = {("backbone." + k): torch.from_numpy(v) for k, v in w.items()}
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    try:
        model.load_state_dict(sd, strict=True)
    except Exception as ex:  # noqa: BLE001
        emit(args, **base, metric="error", what="load_state_dict", value=str(ex)[:2000])
        return
    del sd
    V = c["vocab_size"]

    def timed(fn):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1e3

    rng = np.random.default_rng(1)
    for L in args.prefill:
        try:
            x = torch.from_numpy(rng.integers(0, V, (1, L))).to("cuda")
            with torch.inference_mode():
                fwd = lambda: model(x, num_last_tokens=1)  # noqa: E731
                timed(fwd)
                ms = statistics.median(timed(fwd) for _ in range(args.repeats))
            emit(args, **base, metric="prefill_ms", prompt_len=L, value=round(ms, 3),
                 tokens_per_s=round(L / ms * 1e3, 1), how="model(x, num_last_tokens=1)")
        except Exception as ex:  # noqa: BLE001
            emit(args, **base, metric="error", what=f"prefill {L}", value=str(ex)[:2000])
    step_fn = getattr(m3mod, "mamba3_step_fn", None)
    for B in args.batches:
        emit(args, **base, metric="missing", batch=B, what="decode",
             value=("Mamba3.step needs the CuTe DSL kernel mamba3_step_fn, which did not import"
                    if step_fn is None else
                    "not run: MambaLMHeadModel.generate fails in Mamba-3 decode (issues 1014, "
                    "1022)"))
    if acc is not None:
        ids, want, greedy = acc
        try:
            with torch.inference_mode():
                x = torch.tensor([ids], device="cuda")
                got = model(x).logits[0, :, :V].float().cpu().numpy()
                seq, toks = list(ids), []
                for _ in range(len(greedy)):  # no decode step: a full forward per token
                    lg = model(torch.tensor([seq], device="cuda"), num_last_tokens=1).logits
                    t = int(lg[0, -1, :V].float().argmax())
                    toks.append(t)
                    seq.append(t)
            emit(args, **base, metric="accuracy", prompt_len=len(ids),
                 reference="float64 numpy (tests/mamba3_ref.py)",
                 greedy_how="full forward per token", **errs(got, want), **agreement(toks, greedy))
        except Exception as ex:  # noqa: BLE001
            emit(args, **base, metric="error", what="accuracy", value=str(ex)[:2000])
    del model
    torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["mamba3-siso-1.5b", "mamba3-mimo-1.5b"],
                    choices=sorted(SHAPES))
    ap.add_argument("--engines", nargs="+", default=["mambart", "mamba_ssm"],
                    choices=["mambart", "mamba_ssm"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prefill", nargs="*", type=int, default=[512, 8192])
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 32])
    ap.add_argument("--gen", type=int, default=64, help="new tokens per decode measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--accuracy", action="store_true", help="logits error and greedy agreement")
    ap.add_argument("--acc-prompt", type=int, default=128)
    ap.add_argument("--acc-gen", type=int, default=64)
    ap.add_argument("--mamba-src", type=Path, default=None,
                    help="mamba_ssm's source tree (the directory holding mamba_ssm/)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the weights go (default: a "
                    "temporary directory under /dev/shm when it exists)")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    args = ap.parse_args(argv)
    import subprocess
    import tempfile

    try:
        args.git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                                  capture_output=True, text=True).stdout.strip() or None
    except OSError:
        args.git = None
    torch = torch_cuda(args.device)
    args.gpu = torch.cuda.get_device_name(0) if torch else None
    bw = None
    if torch:
        sys.path.insert(0, str(HERE))
        from bench import copy_bandwidth

        bw = copy_bandwidth(torch)
        emit(args, metric="copy_bandwidth_gb_s", value=round(bw, 1), gpu=args.gpu, git=args.git)
    root = args.workdir or (Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    for name in args.models:
        c = model_config(name)
        t = time.perf_counter()
        w = make_weights(c)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            path = Path(tmp) / name
            nparams = write_model(path, c, w)
            emit(args, model=name, metric="weights_s", value=round(time.perf_counter() - t, 1),
                 params=nparams)
            acc = None
            if args.accuracy:
                t = time.perf_counter()
                ids = [int(x) for x in np.random.default_rng(2).integers(0, c["vocab_size"],
                                                                          args.acc_prompt)]
                w64 = {k: v.astype(np.float64) for k, v in w.items()}  # converted once
                want, _ = ref_forward(w64, c, ids)
                greedy = ref_greedy(w64, c, ids, args.acc_gen)
                del w64
                acc = (ids, want, greedy)
                emit(args, model=name, metric="reference_s", value=round(time.perf_counter() - t, 1))
            for eng in args.engines:
                try:
                    if eng == "mambart":
                        bench_mambart(args, name, c, path, nparams, bw, acc)
                    else:
                        bench_mamba_ssm(args, name, c, w, nparams, acc)
                except Exception as ex:  # noqa: BLE001
                    emit(args, engine=eng, model=name, metric="error",
                         value=f"{type(ex).__name__}: {ex}"[:2000])
        del w


if __name__ == "__main__":
    main()
