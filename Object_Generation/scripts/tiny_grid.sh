#!/usr/bin/env bash
# The Figure 1 grid on the tiny random-init model (CPU, about 30 s per run); then make_figure.py --preset tiny.
exec python "$(dirname "$0")/../train.py" -m sweep=paper preset=tiny concept=vase "$@"
