#!/usr/bin/env bash
# Hydra multirun (one run at a time): paper Table 2: nine GLUE tasks x four optimizers on Mistral-7B (36 GPU runs); spec in conf/sweep/paper.yaml.
python "$(dirname "$0")/../train.py" -m sweep=paper "$@"
