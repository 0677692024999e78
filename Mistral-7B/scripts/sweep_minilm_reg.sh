#!/usr/bin/env bash
# Hydra multirun (one run at a time): scaled_adamw with reg 1e-6, 1e-4, 1e-2 at lr 3e-3 and 1e-2 on MiniLM-L6 + SST-2 (6 runs); spec in conf/sweep/minilm_reg.yaml.
python "$(dirname "$0")/../train.py" -m sweep=minilm_reg "$@"
