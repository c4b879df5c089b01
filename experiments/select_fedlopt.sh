#!/usr/bin/env bash
# Snapshot selection for FedLOpt weights (issue 16; docs/federated.md): every snapshot of a
# `meta-train --federated` run and the weights it started from, 1000 rounds on the selection
# seeds 200-201 in the run's federated setting; the lowest final training loss wins, FedAvg is
# the reference (experiments/select_snapshots.py has the rule).
#   bash experiments/select_fedlopt.sh ALPHA RUN_DIR [START_WEIGHTS]
set -euo pipefail
exec python "$(dirname "$0")/select_snapshots.py" --optimizer lopt_a --federated --alpha "$1" \
  --run "$2" --start "${3:-lopt_a/fmnist_mlp_k8_h4}" --rounds 1000 --out "runs/fedsel/a$1"
