#!/usr/bin/env bash
# Paper Figure 1: the vase, adamw vs scaled_adamw x text-encoder LR 1e-2/1e-3/5e-5/1e-6 (Stable Diffusion v1.5, GPU).
exec python "$(dirname "$0")/../train.py" -m sweep=paper concept=vase "$@"
