#!/usr/bin/env bash
# CPU reproduction: the peers (PEFT Riemannian, LoRA+, LoRA-RITE) on the same lr grid (12 runs).
python "$(dirname "$0")/../train.py" -m preset=smollm2_cpu sweep=lr_peers "$@"
