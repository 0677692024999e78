#!/usr/bin/env bash
# A versioned Hydra sweep (-m, one run at a time) of conf/sweep/<SWEEP>.yaml; extra overrides narrow or extend it:
#   bash Mistral-7B/scripts/sweep.sh minilm_lr optim=adamw,scaled_adamw
# minilm_lr: adamw, scaled_adamw and the three peers at lr 1e-5..1e-2 | minilm_lr_fine: the same five at 3e-4, 3e-3
# minilm_lr_sgd: sgd, scaled_gd at lr 1e-3..10 | minilm_reg: scaled_adamw x reg 1e-6, 1e-4, 1e-2 at lr 3e-3, 1e-2
# minilm_seeds: all seven at their tuned LR, seeds 43 and 44 | paper: Table 2, 9 tasks x 4 optimizers (Mistral-7B, GPU)
# minilm_lora_scale(_rslora): adamw, scaled_adamw x LoRA rank and alpha (and rsLoRA) x lr 1e-4..3e-2
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../../scripts/choices.sh"
USAGE="usage: bash Mistral-7B/scripts/sweep.sh SWEEP [hydra overrides...]"
require_choice sweep "${1-}" "$(options_of "$here/../conf/sweep")"
exec python "$here/../train.py" -m sweep="$1" "${@:2}"
