#!/usr/bin/env bash
# Runtime figure: wall-clock per step of the four optimizers at r=4 and r=256, GPT-2 medium shape, random weights. On a GPU add: --batch 8 --seq 512 --steps 20
python "$(dirname "$0")/../runtime.py" "$@"
