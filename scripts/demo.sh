#!/usr/bin/env bash
# The main job on the embedded default: cycle GRPO of the bundled tiny Sa2VA on the synthetic
# shapes world, on the CPU, no Hub. Extra arguments override the recipe (e.g. --max_steps 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec python -m sa2va_trl.grpo recipes/demo.yaml "$@"
