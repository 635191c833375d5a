#!/usr/bin/env sh
# Run the benchmark the way benchmarks/README.md's table was made, keeping the raw JSON and
# the machine description next to the table. Usage, from the repository root:
#   benchmarks/run.sh [more `batchnorm bench` options, e.g. --threads 1]
set -eu
PY=${PY:-.venv/bin/python}
out=benchmarks/results-$(date +%Y%m%d-%H%M%S)
{ lscpu | grep -E 'Model name|^CPU\(s\)|Thread|Core|L2|L3' || true; "$PY" -m batchnorm info; } \
    > "$out.machine.txt"
"$PY" -m batchnorm bench --save "$out.json" "$@" | tee "$out.md"
