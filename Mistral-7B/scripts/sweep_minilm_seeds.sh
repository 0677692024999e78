#!/usr/bin/env bash
# Hydra multirun (one run at a time): all seven optimizers at their tuned LR on MiniLM-L6 + SST-2, seeds 43 and 44 (14 runs; seed 42 is in the LR sweeps); spec in conf/sweep/minilm_seeds.yaml.
python "$(dirname "$0")/../train.py" -m sweep=minilm_seeds "$@"
