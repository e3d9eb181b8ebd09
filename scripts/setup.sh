#!/usr/bin/env bash
# Creates .venv (once) and installs sa2va-trl with its test extras.
# torch goes first, pinned to the CPU wheel, or pip would pull a multi-GB CUDA build.
# As root it also installs Debian's WordNet 3.0 so METEOR works with no network.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.sa2va_trl_installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
    python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "is ignored" || true
    python -m pip install -q -e ".[dev,deepspeed]" 2>&1 | grep -v "is ignored" || true
    python -c "import torch, trl, transformers, sa2va_trl" || { echo "setup: install failed" >&2; exit 1; }
    touch "$stamp"
fi
if [ "$(id -u)" = 0 ] && { [ ! -f /usr/share/wordnet/data.noun ] || [ ! -f /usr/share/wordnet/index.sense ]; } && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wordnet-base wordnet-sense-index) >/dev/null 2>&1 \
        || echo "setup: could not install Debian's wordnet-base (METEOR will need NLTK data)" >&2
fi
