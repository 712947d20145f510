#!/usr/bin/env bash
# CI step for issue 26 (64-bit ARM): cross-compiles the core, mambart-run and the Python module
# for aarch64 and runs the torch-free CPU tests under qemu-user; requires greedy tokens equal to
# the x86-64 build's (tools/greedy_tokens.py); runs the generic (no-SIMD) kernels on x86 once.
# Run from .ci/run after the README install (the x86 mambart and its test extras installed).
# Budget: about 8 minutes on the 2-core machine (8 min 18 s measured with build/arm64-ci warm
# and other jobs sharing the cores, load average 2 to 4: the two test groups 397 s and 330 s
# side by side; 7 min 10 s was measured earlier from an empty build/arm64-ci with the tests run
# one file after another on an idle machine; timings printed as it goes).
#
# Debian packages (apt-get when root or password-less sudo, else the step is reported SKIPPED):
#   g++-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
# and, unpacked into build/arm64-ci/sysroot with `apt-get download` + `dpkg -x` (the arm64
# architecture is added to dpkg; nothing of arm64 is installed on the machine):
#   python3.X-minimal libpython3.X-minimal libpython3.X-stdlib libpython3.X-dev libexpat1 zlib1g
#   libffi8 libssl3 libbz2-1.0 liblzma5 libsqlite3-0 libuuid1 libcrypt1   (all :arm64)
# The aarch64 wheels of numpy, tokenizers, pytest, safetensors, huggingface_hub and tqdm come
# from PyPI (pip --platform manylinux..._aarch64 --target).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0
stamp() { echo "[ci-arm64] $1 ($SECONDS s)"; }
B="$PWD/build/arm64-ci"
mkdir -p "$B"

# ---- tools ----------------------------------------------------------------------------------------
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo -n"
can_apt() { command -v apt-get >/dev/null 2>&1 && $SUDO true 2>/dev/null; }
skip() {
  echo "[ci-arm64] ========================================================================"
  echo "[ci-arm64] SKIPPED the aarch64 cross build and qemu tests: $1"
  echo "[ci-arm64] ========================================================================"
  exit 0
}
if ! command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || ! command -v qemu-aarch64 >/dev/null 2>&1; then
  can_apt || skip "no aarch64 g++ / qemu-aarch64 and no way to install them (not root, no sudo)"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends g++-aarch64-linux-gnu \
      libc6-dev-arm64-cross qemu-user >/dev/null
fi
SYS="$B/sysroot"
PYBIN=""
[ -d "$SYS/usr/bin" ] && PYBIN="$(ls "$SYS"/usr/bin/python3.[0-9]* 2>/dev/null | grep -v config | head -1 || true)"
if [ -z "$PYBIN" ]; then
  can_apt || skip "no aarch64 Python sysroot and no way to fetch Debian's arm64 packages"
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    $SUDO dpkg --add-architecture arm64
  fi
  $SUDO apt-get update -qq
  PYV="$(apt-cache depends python3-minimal:arm64 2>/dev/null | grep -o 'python3\.[0-9]*-minimal' | head -1 | sed 's/python//; s/-minimal//')"
  [ -n "$PYV" ] || skip "Debian's python3-minimal:arm64 was not found"
  rm -rf "$B/debs" "$SYS"; mkdir -p "$B/debs" "$SYS"
  (cd "$B/debs" && for p in python$PYV-minimal libpython$PYV-minimal libpython$PYV-stdlib \
      libpython$PYV-dev libexpat1 zlib1g libffi8 libssl3 libbz2-1.0 liblzma5 libsqlite3-0 \
      libuuid1 libcrypt1; do
    # (apt warns that it downloads as root into a folder its _apt user cannot write: harmless)
    apt-get download -q "$p:arm64" >/dev/null 2>&1 || { echo "[ci-arm64] apt-get download $p:arm64 failed"; exit 1; }
  done)
  for d in "$B"/debs/*.deb; do dpkg -x "$d" "$SYS"; done
  PYBIN="$SYS/usr/bin/python$PYV"
fi
PYV="${PYBIN##*/python}"
SOABI="cpython-${PYV/./}-aarch64-linux-gnu"
stamp "toolchain and aarch64 Python $PYV ready"

# aarch64 wheels of what the torch-free tests import (the host's versions where it has them)
pin() { python -c "import importlib.metadata as m; print('$1==' + m.version('$1'))" 2>/dev/null || echo "$1"; }
SITE="$B/site"
if [ ! -d "$SITE/numpy" ]; then
  python -m pip install -q --target "$SITE" --python-version "$PYV" --implementation cp \
      --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
      --platform manylinux2014_aarch64 --only-binary=:all: \
      "$(pin numpy)" "$(pin tokenizers)" "$(pin pytest)" "$(pin safetensors)" \
      "$(pin huggingface_hub)" "$(pin tqdm)"
fi
stamp "aarch64 wheels ready"
# The host-side build tools the cross builds read (a fresh venv has them only inside pip's
# isolated build environment of the README install).
python -m pip install -q pybind11 nlohmann-json

# ---- the C++-only configure needs no Python (no interpreter, no headers) ----------------------------
JSON_INC="$(python -c 'import nlohmann_json; print(nlohmann_json.get_include())')"
cmake -S . -B "$B/cxx-only" -DMAMBART_BUILD_PYTHON=OFF -DMAMBART_CUDA=OFF \
    -DCMAKE_DISABLE_FIND_PACKAGE_Python=ON -DMAMBART_JSON_INCLUDE="$JSON_INC" >/dev/null

# ---- cross build: core, mambart-run, the module ----------------------------------------------------
PYINC="$B/pyinclude"   # the target's headers, its pyconfig.h in place of the multiarch wrapper
rm -rf "$PYINC"; cp -r "$SYS/usr/include/python$PYV" "$PYINC"
cp "$SYS/usr/include/aarch64-linux-gnu/python$PYV/pyconfig.h" "$PYINC/pyconfig.h"
cmake -S . -B "$B/build" -DCMAKE_TOOLCHAIN_FILE="$PWD/tools/aarch64-linux-gnu.cmake" \
    -DMAMBART_CUDA=OFF -DMAMBART_WERROR=ON -DMAMBART_JSON_INCLUDE="$JSON_INC" \
    -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" \
    -DPython_INCLUDE_DIR="$PYINC" -DPython_SOABI="$SOABI" >/dev/null
cmake --build "$B/build" -j2 >/dev/null
stamp "cross build done"

# the package as a wheel would lay it out
PKG="$SITE/mambart"
rm -rf "$PKG"; mkdir -p "$PKG/bin" "$PKG/lib" "$PKG/include"
cp -r python/mambart/. "$PKG/"
cp "$B/build/_C.$SOABI.so" "$PKG/"
# bin/mambart-run: a host script running the aarch64 program under qemu (no binfmt_misc here),
# so that the package's `mambart-run` and the tests' subprocesses reach it as on a real machine
cp "$B/build/mambart-run" "$PKG/bin/mambart-run.aarch64"
cat > "$PKG/bin/mambart-run" <<'WRAP'
#!/bin/sh
exec qemu-aarch64 -L /usr/aarch64-linux-gnu "$(dirname "$0")/mambart-run.aarch64" "$@"
WRAP
chmod +x "$PKG/bin/mambart-run"
cp "$B/build/libmambart.so" "$PKG/lib/"
cp capi/mambart.h "$PKG/include/"

# aarch64 python under qemu; sys.executable is this wrapper, so tests' subprocesses run too (it
# lies beside the real interpreter: Python finds its standard library from sys.executable)
APY="$SYS/usr/bin/python3-aarch64"
cat > "$APY" <<WRAP
#!/bin/sh
exec qemu-aarch64 -L /usr/aarch64-linux-gnu -0 "$APY" \
  -E LD_LIBRARY_PATH="$SYS/lib/aarch64-linux-gnu:$SYS/usr/lib/aarch64-linux-gnu" \
  -E PYTHONPATH="$SITE:$PWD/tests" "$PYBIN" "\$@"
WRAP
chmod +x "$APY"
# qemu's `max` CPU has every extension, BF16 among them: the neon+bf16 kernels
export QEMU_CPU=max
"$APY" -c "import platform, mambart; assert platform.machine() == 'aarch64'; \
g = mambart.Generator('mambart-demo'); assert 'neon+bf16' in g.device, g.device; print(g.device)"
python -c "import sys; sys.path.insert(0, 'tests'); from model_dirs import make_model_dir; \
make_model_dir(sys.argv[1], 'mamba1')" "$B/tiny"
"$PKG/bin/mambart-run" "$B/tiny" --tokens 1,2,3 --max-new-tokens 4 --ignore-eos

# ---- torch-free CPU tests under qemu ---------------------------------------------------------------
# Every test file whose tests need no torch (the others take transformers as their oracle, and
# test_cli_tools builds its models with it; no aarch64 torch is installed on this path).
# test_soak runs 20,000 tokens here. None is deselected. (test_hostile caps its children's
# address space with the host's prlimit here: qemu-user ignores a guest's setrlimit(RLIMIT_AS).)
# Two pytest processes side by side, one per core (qemu-user emulates on one host thread per
# guest thread and the tests are mostly single-threaded), each with its own temporary folder;
# their outputs follow one another when both are done. On qemu's neoverse-n1 (ARMv8.2-A without
# BF16: the neon kernels): qemu emulates BFMMLA in software (round-to-odd), so the bf16 demo
# models' long prefills (mambart bench -p 256 in docs/cli.md, held-out perplexity) would take
# many minutes on `max`; the BF16 kernels are tested below, on `max`, by the kernel tests (every
# tile and tail, non-finite activations) and the greedy tokens of every model and dtype.
ARM_TESTS_1="test_hostile test_bad_input test_config test_cpu_kernels test_safetensors
  test_tiktoken"
ARM_TESTS_2="test_docs test_demo_models test_fuzz_regressions test_options test_sampling
  test_soak test_threads"
arm_pytest() {  # group number, test files...
  local g="$1"; shift
  QEMU_CPU=neoverse-n1 MAMBART_EXPECT_KERNELS=neon MAMBART_SOAK_TOKENS=20000 "$APY" -m pytest -q \
      -p no:cacheprovider --durations=5 --basetemp="$B/pytest-$g" \
      $(for t in "$@"; do echo "tests/$t.py"; done) ${MAMBART_ARM64_PYTEST_ARGS:-} \
      >"$B/pytest-$g.log" 2>&1
}
rc1=0; rc2=0
arm_pytest 1 $ARM_TESTS_1 & p1=$!
arm_pytest 2 $ARM_TESTS_2 & p2=$!
wait $p1 || rc1=$?
wait $p2 || rc2=$?
for g in 1 2; do echo "[ci-arm64] pytest group $g:"; cat "$B/pytest-$g.log"; done
[ "$rc1" = 0 ] && [ "$rc2" = 0 ] || { echo "[ci-arm64] aarch64 tests failed ($rc1, $rc2)"; exit 1; }
stamp "aarch64 tests under qemu done (qemu neoverse-n1: neon kernels)"
# The kernel tests on qemu's max CPU, which must get the BF16 kernels, and on the plainest
# ARMv8.0-A core (no FP16 arithmetic, dot product or BF16), a Cortex-A53: the plain NEON ones.
QEMU_CPU=max MAMBART_EXPECT_KERNELS=neon+bf16 "$APY" -m pytest -q -p no:cacheprovider \
    tests/test_cpu_kernels.py
stamp "kernel tests on qemu max (neon+bf16 kernels) done"
QEMU_CPU=cortex-a53 MAMBART_EXPECT_KERNELS=neon "$APY" -m pytest -q -p no:cacheprovider \
    tests/test_cpu_kernels.py
stamp "kernel tests on an emulated Cortex-A53 (neon kernels) done"

# ---- greedy tokens: aarch64 on qemu max (NEON + BF16) == x86-64 (AVX2 or generic) ------------------
python tools/greedy_tokens.py "$B/tokens-x86.json"
"$APY" tools/greedy_tokens.py "$B/tokens-arm64.json"
python - "$B/tokens-x86.json" "$B/tokens-arm64.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
bad = [k for k in a["tokens"] if a["tokens"][k] != b["tokens"].get(k)]
print(f"[ci-arm64] greedy tokens, {a['device']} vs {b['device']}: "
      f"{len(a['tokens']) - len(bad)} of {len(a['tokens'])} sequences equal")
sys.exit(1 if bad else 0)
PY
stamp "greedy tokens compared"

# ---- the generic kernels on x86 (MAMBART_CPU_PORTABLE=1): the CPU-kernel tests and the models
#      against transformers, so every kernel path (AVX2, NEON, generic) runs in CI ----------------
MAMBART_CPU_PORTABLE=1 python -m pytest -q -p no:cacheprovider tests/test_cpu_kernels.py \
    tests/test_model.py tests/test_layers.py
stamp "generic kernels on x86 done"
