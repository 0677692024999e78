#!/usr/bin/env bash
# Paper Table 2, one run: Mistral-7B (4-bit NF4, GPU) fine-tuned on TASK with OPTIM; lr / reg from the paper's
# per-task table (conf/tables/paper.yaml). Extra Hydra overrides pass through, e.g. data.root=/path/to/glue_data.
#   bash Mistral-7B/scripts/paper.sh rte scaled_adamw [overrides...]
# Several GPUs: accelerate launch Mistral-7B/train.py task=TASK optim=OPTIM instead of this script.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../../scripts/choices.sh"
USAGE="usage: bash Mistral-7B/scripts/paper.sh TASK OPTIM [hydra overrides...]"
require_choice task "${1-}" "$(top_level_keys "$here/../conf/tables/paper.yaml")"
require_choice optimizer "${2-}" "$(options_of "$here/../conf/optim")"
exec python "$here/../train.py" task="$1" optim="$2" "${@:3}"
