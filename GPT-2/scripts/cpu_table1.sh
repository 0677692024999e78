#!/usr/bin/env bash
# CPU reproduction, Table 1: SmolLM2-135M, the four optimizers at their paper lr (4 runs).
python "$(dirname "$0")/../train.py" -m preset=smollm2_cpu sweep=paper_optimizers "$@"
