#!/usr/bin/env bash
# Set up .venv and run the whole test suite on CPU (the README's test command; .ci/run calls it). The tests that
# recompute numbers and compare them with committed records (-m committed_numbers) then run once more under a second
# CPU code path (portable ATen kernels, MKL's compatible mode), so that a result that holds only on the CPU that
# wrote it fails here before it fails for a user. Extra arguments go to the first pytest run only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q "$@"
if [ "$#" -eq 0 ]; then
  echo "committed numbers again under a second CPU code path (ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE):"
  ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -m committed_numbers
fi
