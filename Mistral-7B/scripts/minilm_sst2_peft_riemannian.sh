#!/usr/bin/env bash
# MiniLM-L6 + SST-2 on a CPU (~1 min): peft_riemannian at its tuned LR (conf/tuned/minilm_sst2_peft_riemannian.yaml).
python "$(dirname "$0")/../train.py" preset=minilm_sst2 optim=peft_riemannian "$@"
