#!/usr/bin/env bash
# Set up (once) and run the embedded demo: DM-Adapter on a synthetic CUHK-PEDES-layout set, experts on 2 ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"  # the deepspeed launcher and its JIT build (ninja) run from the venv
exec .venv/bin/deepspeed --num_gpus 2 dsmoe/train.py --ds_config ds_configs/zero2.json "$@"
