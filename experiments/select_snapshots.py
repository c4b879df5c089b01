"""Snapshot selection for a meta-training run (docs/meta.md, docs/federated.md).

Every snapshot of ``RUN/snapshots/`` and the weights the run started from are trained with
``optax-localsgd evaluate`` on the selection seeds (200-201 by default, never the held-out seeds
of the results pages), next to a reference baseline on the same seeds. The rule, fixed before
any candidate is run: the lowest mean final global training loss (the meta-objective's quantity)
wins; with ``--max-rounds-to-target`` a candidate must also reach the target loss (0.2) no later
than the starting weights did, so a pick never trades early speed for its final loss. Test
accuracy and speedup are printed, never used.

  python experiments/select_snapshots.py --optimizer lopt_a --run runs/late/lopt_a \
      --start lopt_a/fmnist_mlp_k8_h4 --rounds 1000 --max-rounds-to-target --out runs/sel_late
  python experiments/select_snapshots.py --optimizer lopt_a --run runs/fed/lopt_a_a100 \
      --federated --alpha 100 --out runs/fedsel/a100            # FedLOpt (issue 16)

Each evaluation is cached (``--cache``), so an interrupted selection resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shlex
import shutil
import subprocess
import sys


def evaluate(args: argparse.Namespace, name: str, method: str, weights: str | None) -> dict:
  """One ``optax-localsgd evaluate`` on the selection seeds; its summary row for ``method``."""
  out = pathlib.Path(args.out)
  # The iid evaluation measures speedups against local SGD, so it runs too. The evaluation
  # caches per name: a baseline's histories (local SGD, the reference) are copied from any
  # earlier name, so each trains once; a copy is used only if its fingerprint (the whole run
  # configuration) matches.
  methods = method if args.federated else f"local_sgd,{method}"
  cache = out / "cache" / name
  cache.mkdir(parents=True, exist_ok=True)
  for baseline in ([] if args.federated else ["local_sgd"]) + ([method] if weights is None else []):
    for done in (out / "cache").glob(f"*/{baseline}_seed*.json"):
      if not (cache / done.name).exists():
        shutil.copyfile(done, cache / done.name)
  cmd = [sys.executable, "-m", "optax_localsgd.cli", "evaluate", "--seeds", args.seeds,
         "--rounds", str(args.rounds), "--methods", methods, "--name", name, "--cache",
         str(out / "cache"), "--out", str(out), "--quiet"]
  if args.federated:
    cmd += ["--federated", "--alpha", args.alpha]
  else:
    cmd += ["--task", args.task, "-K", str(args.K), "-H", str(args.H),
            "--target-loss", str(args.target_loss)]
  if weights is not None:
    cmd += ["--weights", f"{method}={weights}"]
  cmd += shlex.split(args.evaluate_args)
  subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
  return json.loads((out / f"{name}.json").read_text())["summary"][method]


def mean(row: dict, key: str) -> float:
  """The mean of ``row[key]`` (mean, standard error, count); inf where no seed has one."""
  value = row.get(key)
  if value is None or value[0] is None or math.isnan(value[0]):
    return math.inf
  return value[0]


def cell(row: dict, key: str, fmt: str) -> str:
  if key not in row:  # the federated pages have no speedup or rounds to target
    return "-"
  if mean(row, key) == math.inf:
    return "not reached"
  value = row[key]
  return f"{value[0]:{fmt}} ± {value[1]:{fmt}} ({value[2]}/{row['n']})"


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--optimizer", choices=("lopt_a", "lagg_a"), required=True)
  p.add_argument("--run", required=True, help="a meta-train --out folder with snapshots/")
  p.add_argument("--start", default=None,
                 help="the weights the run started from (default: OPTIMIZER/fmnist_mlp_k8_h4)")
  p.add_argument("--reference", default=None,
                 help="baseline run next to them (default: diloco; fedavg with --federated)")
  p.add_argument("--task", default="fmnist_mlp")
  p.add_argument("-K", type=int, default=8)
  p.add_argument("-H", type=int, default=4)
  p.add_argument("--federated", action="store_true")
  p.add_argument("--alpha", default="100")
  p.add_argument("--seeds", default="200-201")
  p.add_argument("--rounds", type=int, default=1000)
  p.add_argument("--target-loss", type=float, default=0.2)
  p.add_argument("--max-rounds-to-target", action="store_true",
                 help="only candidates that reach the target loss no later than the start")
  p.add_argument("--steps", default=None,
                 help="only the snapshots of these outer steps, comma-separated (default: all)")
  p.add_argument("--evaluate-args", default="",
                 help="more evaluate flags for every run, e.g. \"--hparams-key fmnist_mlp/K8/H4/B128\"")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)

  run = pathlib.Path(args.run)
  snapshots = sorted((run / "snapshots").glob("weights_step*.safetensors"))
  if args.steps is not None:
    wanted = {int(s) for s in args.steps.split(",")}
    snapshots = [f for f in snapshots if int(f.stem.removeprefix("weights_step")) in wanted]
  if not snapshots:
    p.error(f"no snapshots in {run / 'snapshots'} (meta-train with --snapshot-every N)")
  tag = f"a{args.alpha}_" if args.federated else f"{args.optimizer}_"
  reference = args.reference or ("fedavg" if args.federated else "diloco")
  rows = {f"{tag}{reference}": (reference, evaluate(args, f"{tag}{reference}", reference, None))}
  start = args.start or f"{args.optimizer}/fmnist_mlp_k8_h4"
  candidates = {f"{tag}start": start}
  candidates.update({f"{tag}{f.stem.removeprefix('weights_')}": str(f) for f in snapshots})
  for name, weights in candidates.items():
    rows[name] = (args.optimizer, evaluate(args, name, args.optimizer, weights))

  final = lambda row: mean(row, "final_train_loss")
  reach = lambda row: mean(row, "rounds_to_target")
  limit = reach(rows[f"{tag}start"][1]) if args.max_rounds_to_target else math.inf
  eligible = {n: r for n, (_, r) in rows.items() if n in candidates and reach(r) <= limit}
  pick = min(eligible, key=lambda n: final(eligible[n])) if eligible else None

  seeds, rounds = args.seeds, args.rounds
  lines = [f"| candidate | final training loss (seeds {seeds}, {rounds} rounds) | "
           f"rounds to {args.target_loss} | speedup | test accuracy |",
           "| --- | --- | --- | --- | --- |"]
  for name, (method, row) in sorted(rows.items(), key=lambda kv: final(kv[1][1])):
    mark = " **(pick)**" if name == pick else ""
    lines.append(f"| {name} ({method}){mark} | {cell(row, 'final_train_loss', '.4f')} | "
                 f"{cell(row, 'rounds_to_target', '.0f')} | {cell(row, 'speedup', '.2f')} | "
                 f"{cell(row, 'test_accuracy', '.4f')} |")
  report = "\n".join(lines) + f"\n\npick: {pick} = {candidates.get(pick)}\n"
  print(report, end="")
  (pathlib.Path(args.out) / f"{tag}selection.md").write_text(report)


if __name__ == "__main__":
  main()
