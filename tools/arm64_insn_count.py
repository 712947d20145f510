#!/usr/bin/env python3
"""Speed proxy for aarch64 without ARM hardware (issue 26): guest instructions retired per decode
token and per prefill, the NEON kernels, the NEON + BF16 kernels (bf16 weights' GEMM through
BFMMLA) and the generic path, counted under qemu-user with tools/qemu_insn_count.c. Method
(BENCHMARKS.md):

  - a random-weight model at a published shape (tools/bench.py's write_random_model);
  - the kernel path chosen by the emulated CPU, as the binary chooses at run time: `neon` on
    qemu's neoverse-n1 (ARMv8.2-A without BF16), `bf16` on qemu's max (BF16 in HWCAP2),
    `generic` on max with MAMBART_CPU_PORTABLE=1;
  - the cross-built mambart-run (single thread: OMP_NUM_THREADS=1) run three times per kernel
    path and dtype: prompt P0 + 1 new token, prompt P0 + 1 + G new tokens, prompt P1 + 1 new
    token (--ignore-eos);
  - decode per token = (I(P0, 1 + G) - I(P0, 1)) / G; prefill of (P1 - P0) tokens =
    I(P1, 1) - I(P0, 1): loading, start-up and the one head projection cancel out.

    python tools/arm64_insn_count.py --run build/arm64/mambart-run \\
        --plugin build/qemu_insn_count.so --model mamba-130m --dtypes float32 bfloat16 float16
    python tools/arm64_insn_count.py ... --dtypes bfloat16 --paths bf16 neon generic

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


# The emulated CPU per kernel path (the binary picks its kernels from the CPU's HWCAP).
CPU_MODEL = {"neon": "neoverse-n1", "bf16": "max", "generic": "max"}


def count(args, model: Path, prompt: int, new: int, path: str) -> int:
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        cmd = [args.qemu, "-cpu", CPU_MODEL[path], "-L", args.sysroot, "-plugin", args.plugin,
               "-d", "plugin", "-D", log.name, "-E", "OMP_NUM_THREADS=1"]
        if path == "generic":
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
    ap.add_argument("--paths", nargs="+", default=["neon", "generic"],
                    choices=["neon", "bf16", "generic"])
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
                base = count(args, model, P0, 1, path)
                dec = count(args, model, P0, 1 + args.gen, path)
                pre = count(args, model, P1, 1, path)
                res[path] = dict(decode=(dec - base) / args.gen, prefill=pre - base)
                rec = dict(model=args.model, dtype=dt, path=path, decode_insns_per_token=round(
                    res[path]["decode"]), prefill_tokens=P1 - P0,
                    prefill_insns=res[path]["prefill"], seconds=round(time.time() - t, 1))
                print(json.dumps(rec), flush=True)
            rows.append((dt, res))
    # one row per (dtype, path), with the ratio against the generic path where it was counted
    print(f"\n| {args.model} | path | decode insns/token | generic / this | "
          f"prefill {P1 - P0} tokens | generic / this |")
    print("|---|---|---:|---:|---:|---:|")
    for dt, r in rows:
        g = r.get("generic")
        for path, n in r.items():
            ratio_d = f"{g['decode'] / n['decode']:.2f}x" if g else ""
            ratio_p = f"{g['prefill'] / n['prefill']:.2f}x" if g else ""
            print(f"| {dt} | {path} | {n['decode'] / 1e6:.1f} M | {ratio_d} | "
                  f"{n['prefill'] / 1e9:.2f} G | {ratio_p} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
