#!/usr/bin/env bash
# CPU reproduction: SGD vs scaled GD at lr 1e-2, 1e-3, 1e-4, training loss only (6 runs of 40 steps, no decoding).
python "$(dirname "$0")/../train.py" -m preset=smollm2_cpu sweep=loss_curves train.max_steps=40 train.eval_every=20 "$@"
