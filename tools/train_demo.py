"""Trains the demo models shipped in the package (issue 24): a small Mamba-1 (`mambart-demo`)
and a small Mamba-2 (`mambart2-demo`) language model on the Python standard library's own
source (the `.py` files of this interpreter's stdlib, tests excluded), which every Python
install ships, so the data needs no network.

Steps: collect the files (sorted; a file goes to the held-out set when the sha1 of its relative
path is 0 mod 20) -> train a byte-level BPE tokenizer (`tokenizers`, vocabulary 4096,
`<|endoftext|>` = id 0 between files) -> train transformers' MambaForCausalLM /
Mamba2ForCausalLM with torch on the CPU (AdamW, warm-up then cosine decay, fixed step count and
seed) -> save_pretrained -> `mambart.convert(..., dtype="bfloat16")` (the project's converter)
-> held-out perplexity measured by mambart itself on the converted bf16 model -> README.md model
card. Run from the repository root (a few minutes per model on 2 cores):

    nice -n 10 python tools/train_demo.py --out python/mambart/models

Needs torch and transformers (the test extra); the runtime never does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

VOCAB = 4096
EOS = "<|endoftext|>"
HELD_OUT_MOD = 20

# name -> (transformers model type, config fields, training steps). The sizes and steps fit a
# few minutes per model on 2 CPU cores (Mamba-1's scan costs more per token than Mamba-2's SSD).
MODELS = {
    "mambart-demo": ("mamba", dict(hidden_size=192, num_hidden_layers=6, state_size=8, expand=2,
                                   conv_kernel=4, time_step_rank=12, use_bias=False,
                                   use_conv_bias=True, residual_in_fp32=True,
                                   tie_word_embeddings=True), 700),
    "mambart2-demo": ("mamba2", dict(hidden_size=256, num_hidden_layers=4, state_size=32,
                                     expand=2, head_dim=32, num_heads=16, n_groups=1,
                                     conv_kernel=4, chunk_size=64, use_bias=False,
                                     use_conv_bias=True, residual_in_fp32=True, rms_norm=True,
                                     tie_word_embeddings=True), 360),
}


def stdlib_files():
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        parts = rel.split("/")
        if parts[0] in ("site-packages", "dist-packages") or any(
                x in ("test", "tests", "idle_test", "__pycache__") for x in parts):
            continue
        out.append((rel, p))
    return root, out


def held_out(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % HELD_OUT_MOD == 0


def read_texts(files):
    train, heldout = [], []
    for rel, p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (heldout if held_out(rel) else train).append(text)
    return train, heldout


def train_tokenizer(texts, path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return tok


def encode_all(tok, texts) -> np.ndarray:
    eos = tok.token_to_id(EOS)
    ids = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


def _scan_function():
    import torch

    class SelectiveScan(torch.autograd.Function):
        """h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t ;  y_t = C_t . h_t   (fp32; dt (b,l,d),
        A (d,n), B/C (b,l,n), u (b,l,d) -> y (b,l,d)). The loops over time touch one step's
        (b,d,n) at a time; everything else is a few whole-sequence ops, and the backward is
        written out rather than recorded step by step (transformers' reference loop spends
        most of its backward on the per-step indexing)."""

        @staticmethod
        def forward(ctx, dt, A, B, C, u):
            dA = torch.exp(dt[..., None] * A)                          # (b, l, d, n)
            X = (dt * u)[..., None] * B[:, :, None, :]                 # (b, l, d, n)
            H = torch.empty_like(X)
            h = torch.zeros_like(X[:, 0])
            for t in range(X.shape[1]):
                h = dA[:, t] * h + X[:, t]
                H[:, t] = h
            ctx.save_for_backward(dt, A, B, C, u, dA, H)
            return torch.einsum("bldn,bln->bld", H, C)

        @staticmethod
        def backward(ctx, gy):
            dt, A, B, C, u, dA, H = ctx.saved_tensors
            GY = gy[..., None] * C[:, :, None, :]                      # dL/dh_t, direct part
            GH = torch.empty_like(H)
            g = torch.zeros_like(H[:, 0])
            for t in range(H.shape[1] - 1, -1, -1):
                g = GY[:, t] + g * (dA[:, t + 1] if t + 1 < H.shape[1] else 0.0)
                GH[:, t] = g
            gC = torch.einsum("bld,bldn->bln", gy, H)
            Hprev = torch.cat([torch.zeros_like(H[:, :1]), H[:, :-1]], dim=1)
            gdA = GH * Hprev * dA                                      # d/d(dt A)
            gdt = torch.einsum("bldn,dn->bld", gdA, A)
            gA = torch.einsum("bldn,bld->dn", gdA, dt)
            gX_B = torch.einsum("bldn,bln->bld", GH, B)                # d/d(dt u)
            gB = torch.einsum("bldn,bld->bln", GH, dt * u)
            return gdt + gX_B * u, gA, gB, gC, gX_B * dt

    return SelectiveScan


def fast_selective_scan(u, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False, **_):
    """transformers' mamba_selective_scan (u, dt, z: (b, d, l); A: (d, n); B, C: (b, n, l))
    computed by _scan_function's SelectiveScan."""
    import torch.nn.functional as F

    global _SCAN
    if _SCAN is None:
        _SCAN = _scan_function()
    dt = dt.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    y = _SCAN.apply(dt.transpose(1, 2).contiguous(), A.float(),
                    B.float().transpose(1, 2).contiguous(), C.float().transpose(1, 2).contiguous(),
                    u.float().transpose(1, 2).contiguous()).transpose(1, 2)
    if D is not None:
        y = y + u.float() * D.float()[None, :, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(u.dtype)
    if return_last_state:
        raise NotImplementedError("training only")
    return y


_SCAN = None


def use_fast_scan():
    """Puts fast_selective_scan in place of transformers' Mamba-1 reference scan after
    checking that the two agree, values and gradients, on random inputs."""
    import torch
    from transformers.models.mamba import modeling_mamba as mm

    ref = mm.mamba_selective_scan
    g = torch.Generator().manual_seed(0)
    b, d, n, l = 2, 6, 4, 37
    args = (torch.randn(b, d, l, generator=g), torch.randn(b, d, l, generator=g),
            -torch.rand(d, n, generator=g) * 4, torch.randn(b, n, l, generator=g),
            torch.randn(b, n, l, generator=g))
    kw = dict(D=torch.randn(d, generator=g), z=torch.randn(b, d, l, generator=g),
              delta_bias=torch.randn(d, generator=g), delta_softplus=True)
    grads = []
    for fn in (ref, fast_selective_scan):
        xs = [t.clone().requires_grad_(True) for t in args]
        y = fn(*xs, **kw)
        y.pow(2).sum().backward()
        grads.append([y.detach()] + [t.grad for t in xs])
    err = max(float((p - q).abs().max() / (1 + q.abs().max())) for p, q in zip(*grads))
    if not err < 1e-4:
        raise SystemExit(f"the fast scan differs from transformers' by {err}")
    mm.mamba_selective_scan = fast_selective_scan


def build_model(kind: str, fields: dict, vocab: int):
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    common = dict(vocab_size=vocab, eos_token_id=0, bos_token_id=0, pad_token_id=0,
                  layer_norm_epsilon=1e-5)
    if kind == "mamba":
        return MambaForCausalLM(MambaConfig(**common, **fields))
    return Mamba2ForCausalLM(Mamba2Config(**common, **fields,
                                          time_step_limit=(0.0, float("inf"))))


def train(model, data: np.ndarray, steps: int, batch: int, seqlen: int, lr: float, seed: int,
          log) -> float:
    import torch

    g = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 20)
    model.train()
    t0 = time.time()
    loss_ema = None
    for step in range(steps):
        f = lr * (step + 1) / warm if step < warm else \
            lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / (steps - warm))))
        for group in opt.param_groups:
            group["lr"] = f
        starts = g.integers(0, len(data) - seqlen - 1, size=batch)
        x = torch.from_numpy(np.stack([data[s:s + seqlen] for s in starts]))
        out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        v = float(out.loss)
        loss_ema = v if loss_ema is None else 0.95 * loss_ema + 0.05 * v
        if step % 25 == 0 or step == steps - 1:
            log(f"  step {step:4d}/{steps}  loss {v:.3f} (avg {loss_ema:.3f})  lr {f:.2e}  "
                f"{time.time() - t0:.0f} s")
    model.eval()
    return time.time() - t0


def mambart_perplexity(model_dir: Path, data: np.ndarray, windows: int, seqlen: int) -> float:
    """Held-out perplexity measured by mambart on the converted model: `windows` evenly spaced
    windows of `seqlen` tokens, each scored from its own start (tokens 1..seqlen-1)."""
    import mambart

    g = mambart.Generator(str(model_dir))
    total, n = 0.0, 0
    for k in range(windows):
        s = (len(data) - seqlen - 1) * k // max(1, windows - 1)
        r = g.score([int(t) for t in data[s:s + seqlen]])
        total -= r.sum
        n += len(r.token_ids)
    return math.exp(total / n)


CARD = """\
# {name}

A small {arch} language model trained by `tools/train_demo.py` so that mambart has a model that
runs with no download (`mambart generate {name} "def parse("`). It writes Python that looks
like Python; it knows nothing else and is not useful beyond demos and tests.

| | |
|---|---|
| architecture | {arch} (`{cls}`), {n_layer} layers, d_model {d_model}, {extra} |
| parameters | {params:,} (tied input/output embedding) |
| weights | bfloat16 ({size_kb:,} KiB), converted by mambart's own converter |
| tokenizer | byte-level BPE (`tokenizers`), vocabulary {vocab}, `<|endoftext|>` = 0 (end of a file) |
| training data | the `.py` files of the CPython {pyver} standard library (tests excluded): {n_train_files} files, {train_tokens:,} tokens |
| held-out data | {n_held_files} other stdlib files (sha1 of the path = 0 mod {mod}): {held_tokens:,} tokens |
| training | {steps} steps of {batch} x {seqlen} tokens ({seen:,} tokens, about {epochs:.2f} epochs), AdamW lr {lr} (warm-up, cosine to 10%), weight decay 0.1, seed {seed}, torch {torch} on the CPU ({minutes:.1f} min) |
| held-out perplexity | **{ppl:.2f}** per token (mambart, bf16 weights, {windows} windows of {seqlen} tokens) |

Sample (greedy, 48 new tokens after `def parse(`):

```
{sample}
```

Retrain: `nice -n 10 python tools/train_demo.py --out python/mambart/models` (the numbers above
change with the Python version whose standard library is read).
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="python/mambart/models", help="where the models go")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=None, help="default: the model's (MODELS)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=64)
    a = ap.parse_args(argv)

    import torch
    import transformers

    torch.set_num_threads(a.threads)
    use_fast_scan()
    log = lambda s: print(s, flush=True)  # noqa: E731
    root, files = stdlib_files()
    train_texts, held_texts = read_texts(files)
    log(f"stdlib {root}: {len(train_texts)} training files, {len(held_texts)} held out")
    work = Path(tempfile.mkdtemp(prefix="mambart-demo-"))
    try:
        tok = train_tokenizer(train_texts, work / "tokenizer.json")
        train_ids = encode_all(tok, train_texts)
        held_ids = encode_all(tok, held_texts)
        log(f"tokenizer: {tok.get_vocab_size()} tokens; {len(train_ids):,} training tokens, "
            f"{len(held_ids):,} held out")
        out_root = Path(a.out)
        for name in a.models:
            kind, fields, steps = MODELS[name]
            steps = a.steps or steps
            torch.manual_seed(a.seed)
            model = build_model(kind, fields, tok.get_vocab_size())
            params = sum(p.numel() for p in model.parameters())
            log(f"{name}: {type(model).__name__}, {params:,} parameters")
            secs = train(model, train_ids, steps, a.batch, a.seqlen, a.lr, a.seed, log)
            hf = work / f"{name}-hf"
            model.save_pretrained(hf, safe_serialization=True)
            shutil.copy(work / "tokenizer.json", hf / "tokenizer.json")
            import mambart

            dst = out_root / name
            mambart.convert(hf, dst, dtype="bfloat16", overwrite=True, source_info={
                "path": f"tools/train_demo.py ({type(model).__name__}, trained from scratch)"})
            ppl = mambart_perplexity(dst, held_ids, a.eval_windows, a.seqlen)
            g = mambart.Generator(str(dst))
            sample = "def parse(" + g.generate("def parse(", max_new_tokens=48).text
            extra = (f"d_state {fields['state_size']}, expand {fields['expand']}"
                     if kind == "mamba" else
                     f"d_state {fields['state_size']}, {fields['num_heads']} heads of "
                     f"{fields['head_dim']}, chunk {fields['chunk_size']}")
            card = CARD.format(
                name=name, arch="Mamba-1" if kind == "mamba" else "Mamba-2",
                cls=type(model).__name__, n_layer=fields["num_hidden_layers"],
                d_model=fields["hidden_size"], extra=extra, params=params,
                size_kb=(dst / "model.safetensors").stat().st_size // 1024, vocab=VOCAB,
                pyver=sys.version.split()[0], n_train_files=len(train_texts),
                train_tokens=len(train_ids), n_held_files=len(held_texts),
                held_tokens=len(held_ids), mod=HELD_OUT_MOD, steps=steps, batch=a.batch,
                seqlen=a.seqlen, seen=steps * a.batch * a.seqlen,
                epochs=steps * a.batch * a.seqlen / len(train_ids), lr=a.lr, seed=a.seed,
                torch=torch.__version__.split("+")[0], minutes=secs / 60, ppl=ppl,
                windows=a.eval_windows, sample=sample.replace("```", "'''"))
            (dst / "README.md").write_text(card, encoding="utf-8")
            meta = {"name": name, "steps": steps, "batch": a.batch, "seqlen": a.seqlen,
                    "heldout_perplexity": round(ppl, 3), "heldout_windows": a.eval_windows,
                    "python": sys.version.split()[0], "transformers": transformers.__version__,
                    "train_seconds": round(secs)}
            (dst / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
            log(f"{name}: held-out perplexity {ppl:.2f} -> {dst}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
