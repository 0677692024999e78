#!/usr/bin/env bash
# One CPU-sized run: MiniLM-L6 + SST-2 (preset=minilm_sst2) with OPTIM at its tuned LR (conf/tables/minilm.yaml).
#   bash Mistral-7B/scripts/minilm_sst2.sh scaled_adamw [overrides...]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../../scripts/choices.sh"
USAGE="usage: bash Mistral-7B/scripts/minilm_sst2.sh OPTIM [hydra overrides...]"
require_choice optimizer "${1-}" "$(options_of "$here/../conf/optim")"
exec python "$here/../train.py" preset=minilm_sst2 optim="$1" "${@:2}"
