#!/usr/bin/env bash
# `make bench`: hubmerge vs mergekit vs the floor script on synthetic Llama checkpoints.
#   bash bench/run.sh            full mode (~25 min on 2 cores; writes bench/RESULTS.md)
#   bash bench/run.sh --quick    0.2 GB models, linear and ties, and the Hub path (~3 min; prints, writes nothing)
#   bash bench/run.sh --device cuda   also accepted; any other flag goes to bench/bench.py (--help); with
#                                 --families, --methods, --tools, --device or --no-results the Hub path is left out,
#                                 and RESULTS.md is left alone unless --merge merges the cases into the last run's
# mergekit gets its own venv under bench/ and is never a dependency of hubmerge.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
HUBMERGE_PY=${HUBMERGE_PY:-.venv/bin/python}
MERGEKIT_VENV=bench/.venv-mergekit
MERGEKIT_VERSION=0.1.5
TORCH_VERSION=2.13.0  # first, so pip takes the CPU wheel and mergekit's own requirement is already met

if [ ! -x "$MERGEKIT_VENV/bin/mergekit-yaml" ]; then
    echo "installing mergekit==$MERGEKIT_VERSION into $MERGEKIT_VENV"
    "$PYTHON" -m venv "$MERGEKIT_VENV"
    "$MERGEKIT_VENV/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
    "$MERGEKIT_VENV/bin/pip" install --quiet --disable-pip-version-check "mergekit==$MERGEKIT_VERSION"
fi

data=${HUBMERGE_BENCH_DATA:-bench/data}
mkdir -p "$data"
quick=0; subset=0; merge=0
for arg in "$@"; do
    case "$arg" in
        --quick) quick=1 ;;
        --merge) merge=1 ;;
        --families*|--methods*|--tools*|--device*|--no-results) subset=1 ;;
    esac
done
# The checkpoints still to generate, and the outputs: about 1 GB for --quick, 16 GB for the whole benchmark.
need_gb=16; [ "$quick" = 1 ] && need_gb=2
families="small mid embed"; [ "$quick" = 1 ] && families="small"
missing=0
for family in $families; do [ -d "$data/$family" ] || missing=1; done
free_gb=$(df -Pk "$data" | awk 'NR==2 {print int($4 / 1048576)}')
if [ "$missing" = 1 ] && [ "$free_gb" -lt "$need_gb" ]; then
    echo "bench: $data has ${free_gb} GB free; the checkpoints and outputs need about ${need_gb} GB" >&2
    exit 1
fi

if [ "$quick" = 1 ]; then
    # A check, not a result: RESULTS.md holds the full run's tables.
    "$HUBMERGE_PY" bench/bench.py --data "$data" --no-results "$@"
    "$HUBMERGE_PY" bench/hub.py --data "$data" --family small --runs 3 --no-results
elif [ "$subset" = 1 ]; then
    # Part of the benchmark, the Hub path left out; it replaces RESULTS.md's table only merged (--merge)
    # into the last full run's cases.
    if [ "$merge" = 1 ]; then
        "$HUBMERGE_PY" bench/bench.py --data "$data" "$@"
    else
        "$HUBMERGE_PY" bench/bench.py --data "$data" --no-results "$@"
    fi
else
    "$HUBMERGE_PY" bench/bench.py --data "$data" "$@"
    # Part 3, the Hub path: the same merge through a local Hub server, with and without --push.
    "$HUBMERGE_PY" bench/hub.py --data "$data" --family mid --runs 3
fi
