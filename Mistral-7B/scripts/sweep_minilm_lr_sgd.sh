#!/usr/bin/env bash
# Hydra multirun (one run at a time): LR sweep 1e-3..10 of sgd and scaled_gd on MiniLM-L6 + SST-2 (12 runs); spec in conf/sweep/minilm_lr_sgd.yaml.
python "$(dirname "$0")/../train.py" -m sweep=minilm_lr_sgd "$@"
