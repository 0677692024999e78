#!/usr/bin/env bash
# Hydra multirun (one run at a time): LR 3e-4 and 3e-3 for adamw, scaled_adamw and the three peers on MiniLM-L6 + SST-2 (10 runs); spec in conf/sweep/minilm_lr_fine.yaml.
python "$(dirname "$0")/../train.py" -m sweep=minilm_lr_fine "$@"
