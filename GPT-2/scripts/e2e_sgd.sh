#!/usr/bin/env bash
# Paper run: GPT-2 medium, E2E, SGD (lr 9e-2). Needs the GPT-2 weights and the E2E train split (data.root=null: HF hub).
python "$(dirname "$0")/../train.py" optim=sgd data.root=null "$@"
