#!/usr/bin/env bash
# CPU reproduction: AdamW vs scaled AdamW at lr 1e-5, 1e-4, 1e-3, 1e-2 (8 runs).
python "$(dirname "$0")/../train.py" -m preset=smollm2_cpu sweep=lr_adamw_vs_scaled_adamw "$@"
