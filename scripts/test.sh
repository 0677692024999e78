#!/usr/bin/env bash
# Set up .venv and run the whole test suite on CPU (the README's test command; .ci/run calls it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q "$@"
