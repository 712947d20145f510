#!/bin/bash
# A/B check on a GPU machine: builds a previous version of mambart (source tree at $OLD_SRC) and
# this tree with CUDA, runs this tree's CUDA tests, then benchmarks both builds alternately
# (tools/bench.py, mambart only) so that "no regression" is measured in one call on one card.
#
# Here, before the device call (the old source and the nlohmann-json wheel travel as ignored
# folders named in `carry`):
#     echo /.old/ >> .git/info/exclude; mkdir -p .old/src && git archive PREV | tar -x -C .old/src
#     echo /.whl/ >> .git/info/exclude; pip download --no-deps --only-binary=:all: -d .whl nlohmann-json
# On the device (carry .old and .whl):
#     OLD_SRC=.old/src bash tools/ab_cuda.sh
# MID_SRC (optional): a third source tree, built and benchmarked as "mid" between old and new.
# Environment: STEP=all|test|bench (test: build this tree only and test; bench: skip tests),
#   QUICK=1 (the model-level CUDA tests only), TEST_S / BENCH_S (time limits, s), ROUNDS (bench
#   rounds, default 2), MODELS (default "mamba-1.4b mamba2-1.3b"), CUDA_ARCH (default 90).
# Builds are kept in /tmp/new and /tmp/old and reused by a following call while the machine is
# warm. Logs, JSON lines and summary.txt go to $OUT.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ab_out}; mkdir -p "$OUT"
OLD_SRC=${OLD_SRC:-.old/src}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
B="-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-90} -Ccmake.define.MAMBART_CUDA=ON"
STEP=${STEP:-all}
if [ ! -f /tmp/new/mambart/__init__.py ] || { [ "$STEP" != test ] && [ ! -f /tmp/old/mambart/__init__.py ]; }; then
  ( python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/new -Cbuild-dir=/tmp/bnew $B . \
      > "$OUT/build_new.log" 2>&1; echo "new rc=$?" >> "$OUT/build_new.log" ) &
  if [ "$STEP" != test ]; then
    ( cd "$OLD_SRC" && python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/old \
        -Cbuild-dir=/tmp/bold $B . > "$OUT/build_old.log" 2>&1; echo "old rc=$?" >> "$OUT/build_old.log" ) &
    if [ -n "$MID_SRC" ]; then
      ( cd "$MID_SRC" && python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/mid \
          -Cbuild-dir=/tmp/bmid $B . > "$OUT/build_mid.log" 2>&1; echo "mid rc=$?" >> "$OUT/build_mid.log" ) &
    fi
  fi
  wait
  tail -1 "$OUT"/build_*.log
fi
if [ "$STEP" != bench ]; then
  if [ -n "$QUICK" ]; then
    PYTHONPATH=/tmp/new:/tmp/site timeout "${TEST_S:-240}" python3 -m pytest tests/test_mamba3.py tests/test_cuda.py \
      -m cuda -q -p no:cacheprovider -rf -k "model_logits_cuda_vs_cpu or prefill_equals or decode_graph or \
fused_decode or greedy_64 or graph_replay or prefill_chunked or mamba1_decode_large or long_prompt or \
cuda_matches or cuda_batches or sample_matches or bad_arguments" > "$OUT/test_cuda_full.log" 2>&1
  else
    PYTHONPATH=/tmp/new:/tmp/site timeout "${TEST_S:-240}" python3 -m pytest tests -m cuda -q -p no:cacheprovider -rf \
      > "$OUT/test_cuda_full.log" 2>&1
  fi
  echo "pytest rc=$?" >> "$OUT/test_cuda_full.log"
  tail -40 "$OUT/test_cuda_full.log" > "$OUT/test_cuda.log"
  tail -3 "$OUT/test_cuda.log"
fi
[ "$STEP" = test ] && exit 0
VERSIONS="old new"; [ -n "$MID_SRC" ] && VERSIONS="old mid new"
for r in $(seq 1 "${ROUNDS:-2}"); do for v in $VERSIONS; do
  PYTHONPATH=/tmp/$v:/tmp/site timeout "${BENCH_S:-100}" python3 tools/bench.py --models ${MODELS:-mamba-1.4b mamba2-1.3b} \
    --dtypes bfloat16 --engines mambart --batches 1 32 --prefill 512 8192 --workdir /dev/shm/w \
    --out "$OUT/bench_$v.jsonl" > "$OUT/bench_${v}_$r.log" 2>&1
  echo "$v run $r rc=$?"
done; done
python3 - <<'PY'
import collections, json, os
out = os.environ.get("OUT", "/tmp/ab_out")
rows = collections.defaultdict(list)
for v in ("old", "mid", "new"):
    try:
        lines = open(f"{out}/bench_{v}.jsonl").read().splitlines()
    except OSError:
        continue
    for line in lines:
        r = json.loads(line)
        if r.get("engine") != "mambart" or not isinstance(r.get("value"), (int, float)):
            continue
        key = (r.get("model"), r["metric"], r.get("batch") or r.get("prompt_len") or "")
        rows[key + (v,)].append(r["value"])
with open(f"{out}/summary.txt", "w") as f:
    for k in sorted({k[:3] for k in rows}, key=str):
        f.write(f"{str(k):60s} " + " ".join(f"{v} {rows.get(k + (v,), [])}" for v in ("old", "mid", "new")) + "\n")
print(open(f"{out}/summary.txt").read())
PY
