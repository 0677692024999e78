#!/usr/bin/env bash
# Paper Figure 3: EDLoRA, adamw vs scaled_adamw x (text, UNet) LR pairs (5e-4, 5e-4), (1e-5, 1e-4), (5e-6, 5e-5) (ChilloutMix, GPU).
exec python "$(dirname "$0")/../train.py" -m sweep=paper "$@"
