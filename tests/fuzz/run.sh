#!/usr/bin/env bash
# Builds the libFuzzer targets under ASan + UBSan (clang) and fuzzes one of them, or all of them in turn.
#   tests/fuzz/run.sh TARGET SECONDS     e.g. tests/fuzz/run.sh fuzz_encode 60
#   tests/fuzz/run.sh all SECONDS        each target for SECONDS
#   tests/fuzz/run.sh atheris SECONDS    the Python-level target (tokenizer files, special tokens), via atheris
# The grown corpus lives in build/fuzz/corpus/TARGET (kept between runs, seeded from tests/fuzz/seeds); a crash
# is written to build/fuzz/crash-* and the run exits non-zero. Extra arguments go to libFuzzer.
set -euo pipefail
cd "$(dirname "$0")/../.."
target=${1:?usage: tests/fuzz/run.sh TARGET|all|atheris SECONDS [libFuzzer options]}
seconds=${2:?usage: tests/fuzz/run.sh TARGET|all|atheris SECONDS [libFuzzer options]}
shift 2

if [[ $target == atheris ]]; then
  exec python tests/fuzz/fuzz_tokenizer_files.py -max_total_time="$seconds" "$@"
fi

mkdir -p build
cmake -S . -B build/fuzz -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=clang++ \
  -DFASTLM_SANITIZE=address,undefined -DFASTLM_BUILD_FUZZERS=ON -DFASTLM_BUILD_PYTHON=OFF -DFASTLM_BUILD_TESTS=OFF \
  > build/fuzz.configure.log || { cat build/fuzz.configure.log; exit 1; }
cmake --build build/fuzz > build/fuzz.build.log || { cat build/fuzz.build.log; exit 1; }

if [[ $target == all ]]; then
  targets=$(cd tests/fuzz && ls fuzz_*.cc | sed 's/\.cc$//')
else
  targets=$target
fi
for name in $targets; do
  corpus=build/fuzz/corpus/$name
  mkdir -p "$corpus"
  echo "== $name: $seconds s"
  # -rss_limit_mb: the models are small, so a run near it means memory grows without bound.
  build/fuzz/"$name" "$corpus" tests/fuzz/seeds -max_total_time="$seconds" -max_len=4096 -rss_limit_mb=2048 \
    -artifact_prefix=build/fuzz/ -print_final_stats=1 "$@"
done
