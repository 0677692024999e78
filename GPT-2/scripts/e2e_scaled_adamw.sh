#!/usr/bin/env bash
# Paper run: GPT-2 medium, E2E, scaled AdamW (lr 8e-4, betas 0.7/0.8, reg 1e-6). Multi-GPU: replace python by accelerate launch.
python "$(dirname "$0")/../train.py" optim=scaled_adamw data.root=null "$@"
