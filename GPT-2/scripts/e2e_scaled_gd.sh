#!/usr/bin/env bash
# Paper run: GPT-2 medium, E2E, scaled GD (lr 2e-2, reg 1e-6).
python "$(dirname "$0")/../train.py" optim=scaled_gd data.root=null "$@"
