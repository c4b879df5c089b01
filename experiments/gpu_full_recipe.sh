#!/usr/bin/env bash
# The paper's full meta-training recipe (appendix B: 5000 outer steps, 8 tasks per estimate,
# truncations of 50 rounds, inner problems of 100-1000 rounds) on one GPU, inside one device call
# of fixed length: it stops with a checkpoint after the first outer step that ends past
# TIME_BUDGET seconds and writes the weights it has ($OUT/OPTIMIZER/weights.safetensors, whose
# metadata say how many of the 5000 steps were done). A later call with --resume goes on from
# there.
#
#   OUT=/tmp/out DATA_DIR=data/fashion-mnist bash experiments/gpu_full_recipe.sh lopt_a
#   bash experiments/gpu_full_recipe.sh lagg_a --resume        # the next device call
#
# Extra flags after the optimizer override the recipe's (argparse keeps the last value), which
# is how tests/test_gpu_recipe.py runs it at tiny scale on a CPU. TASK (default fmnist_mlp) is
# the task spec, e.g. TASK=fmnist_mlp:hidden=16 (--task adds a task rather than replacing one).
set -euo pipefail
cd "$(dirname "$0")/.."
OPTIMIZER="${1:-lopt_a}"
shift || true
OUT="${OUT:-runs/gpu}"
TIME_BUDGET="${TIME_BUDGET:-540}"
TASK="${TASK:-fmnist_mlp}"
DATA=()
if [ -n "${DATA_DIR:-}" ]; then DATA=(--data-dir "$DATA_DIR"); fi
# The package from this checkout, whether or not it is installed on the device machine.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec python -m optax_localsgd.cli meta-train --optimizer "$OPTIMIZER" --task "$TASK" \
  -K 8 -H 4 -B 128 --outer-steps 5000 --tasks-per-estimate 8 --truncation 50 \
  --min-inner 100 --max-inner 1000 --lr-peak 3e-3 --warmup-steps 100 --feature-set ada-v2 \
  --checkpoint-every 100 --time-budget "$TIME_BUDGET" --export-partial --quiet \
  "${DATA[@]}" --out "$OUT/$OPTIMIZER" "$@"
