#!/usr/bin/env bash
# CPU reproduction, Table 1 again with a 10-step warm-up (of 20) instead of 2: the four optimizers at their paper lr.
python "$(dirname "$0")/../train.py" -m preset=smollm2_cpu sweep=paper_optimizers train.warmup_steps=10 tags.sweep=warmup10 "$@"
