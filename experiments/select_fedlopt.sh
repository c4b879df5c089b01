#!/usr/bin/env bash
# Snapshot selection for FedLOpt weights (issue 16; docs/federated.md): every snapshot of a
# `meta-train --federated` run, and the weights it started from, trained for 1000 rounds on the
# selection seeds 200-201 (never the held-out seeds 100-102 of the results pages); the lowest
# final global training loss wins (the meta-objective's quantity, not the test accuracy the
# pages report). FedAvg on the same seeds is the reference.
#   bash experiments/select_fedlopt.sh ALPHA RUN_DIR [START_WEIGHTS]
set -euo pipefail
alpha=$1; run=$2; start=${3:-lopt_a/fmnist_mlp_k8_h4}
out=runs/fedsel/a$alpha
common=(--federated --alpha "$alpha" --seeds 200-201 --rounds 1000 --cache runs/fedsel/cache
        --out "$out" --quiet)
optax-localsgd evaluate "${common[@]}" --methods fedavg --name "a${alpha}_fedavg" > /dev/null
candidates=("start=$start")
for f in "$run"/snapshots/weights_step*.safetensors; do
  s=$(basename "$f" .safetensors); candidates+=("${s#weights_}=$f")
done
for c in "${candidates[@]}"; do
  optax-localsgd evaluate "${common[@]}" --methods lopt_a --weights "lopt_a=${c#*=}" \
      --name "a${alpha}_${c%%=*}" > /dev/null
done
python - "$out" "$alpha" <<'PY'
import json, pathlib, sys
out, alpha = pathlib.Path(sys.argv[1]), sys.argv[2]
rows = []
for f in sorted(out.glob(f"a{alpha}_*.json")):
  s = json.loads(f.read_text())["summary"]
  for m, r in s.items():
    (loss, se, n), (acc, _, _) = r["final_train_loss"], r["test_accuracy"]
    rows.append((loss, f.stem, m, se, n))
print(f"| candidate | final training loss (seeds 200-201, 1000 rounds) |")
print("| --- | --- |")
for loss, name, m, se, n in sorted(rows, key=lambda r: (r[0] is None, r[0])):
  print(f"| {name} ({m}) | {loss:.4f} ± {se:.4f} ({n}/2) |" if loss is not None
        else f"| {name} ({m}) | diverged |")
PY
