#!/usr/bin/env bash
# `make bench`: hubmerge vs mergekit vs the floor script on synthetic Llama checkpoints.
#   bash bench/run.sh            full mode (~25 min on 2 cores; writes bench/RESULTS.md)
#   bash bench/run.sh --quick    0.2 GB models, linear and ties (~3 min)
#   bash bench/run.sh --device cuda   also accepted; any other flag goes to bench/bench.py (--help)
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
need_gb=16
free_gb=$(df -Pk "$data" | awk 'NR==2 {print int($4 / 1048576)}')
if [ ! -d "$data/mid" ] && [ "$free_gb" -lt "$need_gb" ]; then
    echo "bench: $data has ${free_gb} GB free; the checkpoints and outputs need about ${need_gb} GB" >&2
    exit 1
fi

"$HUBMERGE_PY" bench/bench.py --data "$data" "$@"
# Part 3, the Hub path: the same merge through a local Hub server, with and without --push.
case " $* " in
    *" --quick "*) "$HUBMERGE_PY" bench/hub.py --data "$data" --family small --runs 3 ;;
    *" --no-results "*) ;;
    *) "$HUBMERGE_PY" bench/hub.py --data "$data" --family mid --runs 3 ;;
esac
