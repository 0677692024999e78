#!/usr/bin/env bash
# Hydra multirun (one run at a time): LR sweep 1e-5..1e-2 of adamw, scaled_adamw and the three peers on MiniLM-L6 + SST-2 (20 runs); spec in conf/sweep/minilm_lr.yaml.
python "$(dirname "$0")/../train.py" -m sweep=minilm_lr "$@"
