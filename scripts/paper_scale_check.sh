#!/usr/bin/env bash
# Paper-scale check: the experiments' full-size paths with the real architectures and sizes, random weights, on
# this machine, nothing downloaded (scripts/paper_scale_check.py: --list, --parts, --optimizers, --workdir, ...).
# Prints per part what ran and how long it took. Every part together takes longer than 10 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
HF_HUB_OFFLINE=1 "$PYTHON" scripts/paper_scale_check.py "$@"
