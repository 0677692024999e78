#!/usr/bin/env bash
# Paper Table 2 run: Mistral-7B (4-bit NF4) on wnli with scaled_gd; lr/reg from conf/tuned/paper_wnli_scaled_gd.yaml.
# Extra Hydra overrides pass through (e.g. data.root=/path/to/glue_data); multi-GPU: accelerate launch instead of python.
python "$(dirname "$0")/../train.py" task=wnli optim=scaled_gd "$@"
