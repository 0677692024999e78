#!/usr/bin/env bash
# Appendix figure: the chair, adamw vs scaled_adamw x the same four text-encoder settings (GPU).
exec python "$(dirname "$0")/../train.py" -m sweep=paper concept=chair "$@"
