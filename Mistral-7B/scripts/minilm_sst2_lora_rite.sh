#!/usr/bin/env bash
# MiniLM-L6 + SST-2 on a CPU (~1 min): lora_rite at its tuned LR (conf/tuned/minilm_sst2_lora_rite.yaml).
python "$(dirname "$0")/../train.py" preset=minilm_sst2 optim=lora_rite "$@"
