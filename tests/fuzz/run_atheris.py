"""Coverage-guided fuzzing of one target in tests/fuzz/harnesses.py with atheris (libFuzzer for
Python). mambart's Python modules are instrumented for coverage; the C++ core is exercised
through the bindings (its own coverage-guided run is the libFuzzer build, build_libfuzzer.sh).

    python tests/fuzz/run_atheris.py TARGET [--seconds 30] [--crash-dir DIR] [-- libfuzzer args]
    python tests/fuzz/run_atheris.py all --seconds 20      # every target, one process each

Starts from the committed seeds (corpus/TARGET) plus earlier crashes (crashes/TARGET); new
corpus entries go to a temporary directory, so the repository is not modified. A crash writes
the input to --crash-dir (default: tests/fuzz/crashes/TARGET/new-*) and exits non-zero; turn it
into a regression test by keeping the file in crashes/TARGET/ and fixing the bug.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _fuzz_one(target: str, seconds: int, crash_dir: Path, extra) -> None:
    import atheris

    with atheris.instrument_imports(include=["mambart", "harnesses", "fuzz_data"]):
        sys.path.insert(0, str(HERE))
        import harnesses
    fn = harnesses.TARGETS[target]
    harnesses.workdir()  # build the base model dirs before fuzzing starts

    def test_one_input(data: bytes) -> None:
        fn(data)

    work = tempfile.mkdtemp(prefix=f"corpus-{target}-")
    crash_dir.mkdir(parents=True, exist_ok=True)
    seeds = [str(d) for d in (HERE / "corpus" / target, HERE / "crashes" / target) if d.is_dir()]
    args = [sys.argv[0], f"-max_total_time={seconds}", "-timeout=20", "-rss_limit_mb=3072",
            "-max_len=65536", f"-artifact_prefix={crash_dir}/new-", "-print_final_stats=1",
            *extra, work, *seeds]
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--crash-dir", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=None,
                    help="libFuzzer -seed: the same seed explores the same inputs (CI uses 1)")
    ap.add_argument("extra", nargs="*")
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    if a.target == "all":
        from harnesses import TARGETS

        failed = []
        for t in TARGETS:
            t0 = time.time()
            cmd = [sys.executable, __file__, t, "--seconds", str(a.seconds)]
            if a.crash_dir:
                cmd += ["--crash-dir", str(a.crash_dir / t)]
            if a.seed is not None:
                cmd += ["--seed", str(a.seed)]
            p = subprocess.run(cmd + (["--", *a.extra] if a.extra else []), capture_output=True,
                               text=True)
            stats = [ln for ln in (p.stdout + p.stderr).splitlines()
                     if ln.startswith(("stat::number_of_executed_units", "stat::new_units_added",
                                       "#", "==", "INFO: seed corpus"))]
            done = [ln for ln in stats if ln.startswith("stat::")]
            print(f"[fuzz] {t}: rc={p.returncode} {time.time() - t0:.0f} s "
                  + " ".join(done), flush=True)
            if p.returncode != 0:
                failed.append(t)
                print((p.stdout + p.stderr)[-6000:], flush=True)
        if failed:
            print(f"[fuzz] FAILED: {', '.join(failed)}")
            return 1
        print("[fuzz] all targets clean")
        return 0
    crash_dir = a.crash_dir or (HERE / "crashes" / a.target)
    extra = list(a.extra) + ([f"-seed={a.seed}"] if a.seed is not None else [])
    _fuzz_one(a.target, a.seconds, crash_dir, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
