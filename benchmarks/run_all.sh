#!/usr/bin/env bash
# Every benchmark at its default size, one after another, on a quiet machine: each writes
# benchmarks/results/<name>.json (bench_methods also <name>.md). Arguments go to every script, so only
# the flag they all take makes sense here: `bash benchmarks/run_all.sh --quick` is a smoke pass.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}

"$python" benchmarks/bench_inference.py --compile "$@"
"$python" benchmarks/bench_cached_vs_online.py "$@"
"$python" benchmarks/bench_train_overhead.py "$@"
"$python" benchmarks/bench_label.py "$@"
"$python" benchmarks/bench_augment.py "$@"
"$python" benchmarks/bench_label_scale.py "$@"
"$python" benchmarks/bench_general.py "$@"
"$python" benchmarks/bench_methods.py "$@"
