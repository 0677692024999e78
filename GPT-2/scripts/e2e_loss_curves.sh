#!/usr/bin/env bash
# Paper loss-curve runs: GPT-2 medium, SGD vs scaled GD at lr 1e-2, 1e-3, 1e-4 (no decoding).
python "$(dirname "$0")/../train.py" -m sweep=loss_curves data.root=null "$@"
