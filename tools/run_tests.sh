#!/usr/bin/env bash
# Set up (once) and run the whole test suite, the 2-rank deepspeed-launcher integration tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"  # the deepspeed launcher and its JIT build (ninja) run from the venv
exec .venv/bin/python -m pytest -q "$@"
