#!/usr/bin/env bash
# Set up (once) and run the whole test suite, the 2-rank deepspeed-launcher integration tests included; the 30
# slowest tests are listed at the end. Arguments go to pytest:
#   bash tools/run_tests.sh                          # everything (CI runs this)
#   bash tools/run_tests.sh -m "not integration"     # the quick loop: no launched processes (about 3 minutes)
#   bash tools/run_tests.sh tests/test_pipeline.py   # one file
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"  # the deepspeed launcher and its JIT build (ninja) run from the venv
exec .venv/bin/python -m pytest -q --durations=30 "$@"
