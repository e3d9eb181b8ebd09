#!/usr/bin/env bash
# The test command. Fast tests by default; `--all` adds the slow and distributed ones (CI runs --all).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if [ "${1:-}" = "--all" ]; then
    shift
    exec python -m pytest -m "" "$@"
fi
exec python -m pytest -m "not slow and not distributed" "$@"
