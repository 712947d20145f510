#!/usr/bin/env python3
"""Speed proxy for aarch64 without ARM hardware (issue 26): guest instructions retired per decode
token and per prefill, NEON kernels vs the generic path, counted under qemu-user with
tools/qemu_insn_count.c. Method (BENCHMARKS.md):

  - a random-weight model at a published shape (tools/bench.py's write_random_model);
  - the cross-built mambart-run (single thread: OMP_NUM_THREADS=1) run three times per kernel
    path and dtype: prompt P0 + 1 new token, prompt P0 + 1 + G new tokens, prompt P1 + 1 new
    token (--ignore-eos);
  - decode per token = (I(P0, 1 + G) - I(P0, 1)) / G; prefill of (P1 - P0) tokens =
    I(P1, 1) - I(P0, 1): loading, start-up and the one head projection cancel out.

    python tools/arm64_insn_count.py --run build/arm64/mambart-run \\
        --plugin build/qemu_insn_count.so --model mamba-130m --dtypes float32 bfloat16 float16

Prints one JSON line per (dtype, path) and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import model_config, write_random_model  # noqa: E402


def count(args, model: Path, prompt: int, new: int, generic: bool) -> int:
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        cmd = [args.qemu, "-L", args.sysroot, "-plugin", args.plugin, "-d", "plugin",
               "-D", log.name, "-E", "OMP_NUM_THREADS=1"]
        if generic:
            cmd += ["-E", "MAMBART_CPU_PORTABLE=1"]
        ids = ",".join(str(2 + (i * 7919) % 50000) for i in range(prompt))
        cmd += [args.run, str(model), "--tokens", ids, "--max-new-tokens", str(new),
                "--ignore-eos"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        m = re.search(r"insns: (\d+)", Path(log.name).read_text())
        if not m:
            raise SystemExit(f"no instruction count in the plugin's log: {cmd}")
        return int(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="the aarch64 mambart-run")
    ap.add_argument("--plugin", required=True, help="qemu_insn_count.so")
    ap.add_argument("--qemu", default="qemu-aarch64")
    ap.add_argument("--sysroot", default="/usr/aarch64-linux-gnu",
                    help="qemu -L: the aarch64 libc, libstdc++ and libgomp")
    ap.add_argument("--model", default="mamba-130m")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    ap.add_argument("--prompt", type=int, nargs=2, default=[8, 72], metavar=("P0", "P1"))
    ap.add_argument("--gen", type=int, default=8, help="G decode tokens")
    ap.add_argument("--paths", nargs="+", default=["neon", "generic"], choices=["neon", "generic"])
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    P0, P1 = args.prompt
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for dt in args.dtypes:
            model = Path(tmp) / f"{args.model}-{dt}"
            write_random_model(model, model_config(args.model, dt))
            res = {}
            for path in args.paths:
                t = time.time()
                base = count(args, model, P0, 1, path == "generic")
                dec = count(args, model, P0, 1 + args.gen, path == "generic")
                pre = count(args, model, P1, 1, path == "generic")
                res[path] = dict(decode=(dec - base) / args.gen, prefill=pre - base)
                rec = dict(model=args.model, dtype=dt, path=path, decode_insns_per_token=round(
                    res[path]["decode"]), prefill_tokens=P1 - P0,
                    prefill_insns=res[path]["prefill"], seconds=round(time.time() - t, 1))
                print(json.dumps(rec), flush=True)
            rows.append((dt, res))
    print(f"\n| {args.model} | decode insns/token NEON | generic | ratio | "
          f"prefill {P1 - P0} tokens NEON | generic | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for dt, r in rows:
        if len(r) < 2:
            continue
        n, g = r["neon"], r["generic"]
        print(f"| {dt} | {n['decode'] / 1e6:.1f} M | {g['decode'] / 1e6:.1f} M | "
              f"{g['decode'] / n['decode']:.2f}x | {n['prefill'] / 1e9:.2f} G | "
              f"{g['prefill'] / 1e9:.2f} G | {g['prefill'] / n['prefill']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
