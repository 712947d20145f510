#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz/cpp/*.cpp) with clang, ASan and UBSan, into OUT
# (default build/fuzz), and with --run SECONDS runs each from the committed seeds for that long.
#   tests/fuzz/build_libfuzzer.sh [--out DIR] [--run SECONDS]
# Needs clang++ (14+) with the libFuzzer runtime (Debian: clang-14 libclang-rt-14-dev).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=build/fuzz
RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --run) RUN="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
CXX=""
for c in clang++ clang++-19 clang++-18 clang++-17 clang++-16 clang++-15 clang++-14; do
  if command -v "$c" >/dev/null 2>&1; then CXX="$c"; break; fi
done
if [ -z "$CXX" ]; then echo "build_libfuzzer.sh: no clang++ found" >&2; exit 3; fi
# nlohmann-json (header-only, from PyPI) is a build requirement of the package, so pip installs
# it only in its isolated build environment: install it here if this Python lacks it. (Never
# pass /usr/include as -isystem: it breaks libstdc++'s #include_next <stdlib.h>.)
json_inc() { python -c "import nlohmann_json; print(nlohmann_json.get_include())" 2>/dev/null || true; }
JSON_INC=$(json_inc)
if [ -z "$JSON_INC" ]; then
  python -m pip install -q nlohmann-json >&2 || true
  JSON_INC=$(json_inc)
fi
if [ -z "$JSON_INC" ]; then echo "build_libfuzzer.sh: nlohmann-json is not available" >&2; exit 3; fi
mkdir -p "$OUT"
FLAGS=(-std=c++17 -O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined
       -fno-sanitize-recover=all -fno-sanitize=vptr -Icpp -Itools -isystem "$JSON_INC")
# (-fno-sanitize=vptr: the config target links the layer units, whose Layer classes would need
#  the Backend typeinfo of the whole runtime for UBSan's vptr checks; the parsers have no
#  polymorphic casts to check)
# (every layer unit: the registry names each one, so a new unit joins by its directory)
CORE=(cpp/options.cpp cpp/safetensors.cpp cpp/config.cpp cpp/dtype.cpp cpp/error.cpp cpp/layers/registry.cpp
      cpp/layers/*/*.cpp cpp/state_file.cpp cpp/sha256.cpp)
TARGETS=(safetensors config run_args state_file)
for t in "${TARGETS[@]}"; do
  "$CXX" "${FLAGS[@]}" "${CORE[@]}" "tests/fuzz/cpp/fuzz_$t.cpp" -o "$OUT/fuzz_$t"
done
echo "built ${TARGETS[*]/#/$OUT/fuzz_} with $CXX"
if [ "$RUN" != "0" ]; then
  status=0
  for t in "${TARGETS[@]}"; do
    seeds=tests/fuzz/corpus/safetensors_cpp
    [ "$t" = config ] && seeds=tests/fuzz/corpus/libfuzzer_config
    [ "$t" = run_args ] && seeds=tests/fuzz/corpus/libfuzzer_run_args
    [ "$t" = state_file ] && seeds=tests/fuzz/corpus/state_file  # shared with the atheris target
    work=$(mktemp -d)
    extra=""
    [ "$t" = safetensors ] && extra=tests/fuzz/crashes/libfuzzer_safetensors
    mkdir -p "$OUT/crashes-$t"
    if ! UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 "$OUT/fuzz_$t" -max_total_time="$RUN" \
        -seed="${FUZZ_SEED:-1}" -timeout=10 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
        -artifact_prefix="$OUT/crashes-$t/" "$work" "$seeds" $extra > "$OUT/fuzz_$t.log" 2>&1; then
      status=1
      tail -60 "$OUT/fuzz_$t.log"
    fi
    echo "[libfuzzer] $t: $(grep -E 'stat::number_of_executed_units' "$OUT/fuzz_$t.log" | tr -s ' ') \
$(grep -E 'stat::new_units_added' "$OUT/fuzz_$t.log" | tr -s ' ') (${RUN} s)"
    rm -rf "$work"
  done
  exit $status
fi
