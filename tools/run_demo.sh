#!/usr/bin/env bash
# Set up (once) and run the embedded demo: DM-Adapter on a synthetic CUHK-PEDES-layout set, experts on 2 ranks.
#   tools/run_demo.sh [train.py options]
#   tools/run_demo.sh [deepspeed launcher options] -- [train.py options]
#   e.g. tools/run_demo.sh --master_port 29600 -- --set train.epochs=1
# Without --master_port the launcher gets a free port, so a second job on the host does not collide with the first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"  # the deepspeed launcher and its JIT build (ninja) run from the venv
launcher=()
if [[ " $* " == *" -- "* ]]; then
  while [[ $# -gt 0 && "$1" != "--" ]]; do launcher+=("$1"); shift; done
  shift
fi
if [[ " ${launcher[*]-} " != *"--master_port"* ]]; then
  launcher+=(--master_port "$(.venv/bin/python -c 'from dsmoe.launcher import free_port; print(free_port())')")
fi
if [[ " ${launcher[*]} " != *"--num_gpus"* && " ${launcher[*]} " != *"--include"* ]]; then
  launcher=(--num_gpus 2 "${launcher[@]}")
fi
exec .venv/bin/deepspeed "${launcher[@]}" dsmoe/train.py --ds_config ds_configs/zero2.json "$@"
