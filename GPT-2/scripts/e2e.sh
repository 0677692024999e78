#!/usr/bin/env bash
# Paper Table 1, one run: GPT-2 medium on E2E with OPTIM at its paper preset (conf/optim/OPTIM.yaml: SGD lr 9e-2,
# scaled GD lr 2e-2, AdamW lr 2e-4, scaled AdamW lr 8e-4 with betas 0.7/0.8, reg 1e-6). Needs the GPT-2 weights and
# the E2E train split, read from the hub (data.root=null). Extra Hydra overrides pass through.
#   bash GPT-2/scripts/e2e.sh scaled_adamw [overrides...]
# Several GPUs: accelerate launch GPT-2/train.py optim=OPTIM data.root=null instead of this script.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../../scripts/choices.sh"
USAGE="usage: bash GPT-2/scripts/e2e.sh OPTIM [hydra overrides...]"
require_choice optimizer "${1-}" "$(options_of "$here/../conf/optim")"
exec python "$here/../train.py" optim="$1" data.root=null "${@:2}"
