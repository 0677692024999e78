#!/usr/bin/env bash
# Paper run: GPT-2 medium, E2E, AdamW (lr 2e-4, betas 0.9/0.999).
python "$(dirname "$0")/../train.py" optim=adamw data.root=null "$@"
