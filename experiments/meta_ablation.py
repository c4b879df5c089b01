"""Meta-training ablations at equal compute: several recipes, the same outer-step budget, one
evaluation protocol, one table.

Each variant is ``NAME=FLAGS``: extra ``optax-localsgd meta-train`` flags on top of a common
base recipe (``--base``). Every variant meta-trains for ``--steps`` outer steps of a schedule
planned for ``--outer-steps`` into ``OUT/NAME/`` (resuming from its checkpoint when one is
there, so an interrupted ablation goes on where it stopped, and the winner can go on as the
campaign with ``meta-train ... --resume``), exports the weights it has, and is evaluated with ``optax-localsgd evaluate`` against local SGD and
tuned DiLoCo on *selection* seeds (default 200-201: never the held-out seeds 100-109 that the
published tables use, so that choosing a recipe does not tune the evaluation).

Usage (what ``docs/meta.md`` ran):
  python experiments/meta_ablation.py --steps 150 --out runs/ablation \\
      --variant v2="--feature-set ada-v2" --variant v1="--feature-set ada-v1"

Writes ``OUT/ablation.json`` and ``OUT/ablation.md``. Variants run one after the other; start
several processes with disjoint ``--variant`` sets (and the same ``--out``) to use more cores,
then ``--report-only`` collects every variant found under ``OUT``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys

BASE = ("--optimizer lopt_a --task fmnist_mlp -K 8 -H 4 -B 128 --tasks-per-estimate 4 "
        "--truncation 10 --min-inner 50 --max-inner 500 --lr-peak 3e-3 --warmup-steps 20 "
        "--checkpoint-every 10 --quiet")


def _steps_done(run: pathlib.Path) -> int:
  log = run / "log.json"
  return len(json.loads(log.read_text())["step"]) if log.exists() else 0


def _meta_train(name: str, flags: str, base: str, steps: int, planned: int,
                out: pathlib.Path) -> pathlib.Path:
  from optax_localsgd import cli, pretrained
  run = out / name
  done = _steps_done(run)
  for weights in (pretrained.RUN_WEIGHTS, pretrained.LEGACY_RUN_WEIGHTS):  # an older run's too
    if done >= steps and (run / weights).exists():
      return run / weights
  argv = ["meta-train", *shlex.split(base), *shlex.split(flags), "--outer-steps", str(planned),
          "--stop-after", str(steps - done), "--export-partial", "--out", str(run)]
  if (run / "checkpoint.npz").exists():
    argv += ["--resume"]
  rc = cli.main(argv)
  if rc != 0:
    raise SystemExit(f"meta-train {name} failed with exit code {rc}: {' '.join(argv)}")
  return run / pretrained.RUN_WEIGHTS


def _evaluate(name: str, weights: pathlib.Path, optimizer: str, args) -> dict:
  from optax_localsgd import cli
  out = pathlib.Path(args.out) / name
  argv = ["evaluate", "--task", args.task, "-K", str(args.workers), "-H", str(args.local_steps),
          "--rounds", str(args.rounds), "--seeds", args.seeds,
          "--methods", f"local_sgd,diloco,{optimizer}", "--weights", f"{optimizer}={weights}",
          "--target-loss", str(args.target_loss), "--eval-every", "10",
          "--eval-dense-until", "0", "--name", "eval", "--cache", str(out / "eval_cache"),
          "--out", str(out), "--quiet"]
  if cli.main(argv) != 0:
    raise SystemExit(f"evaluate {name} failed: {' '.join(argv)}")
  return json.loads((out / "eval.json").read_text())


def _row(name: str, flags: str, result: dict, optimizer: str, log: dict) -> dict:
  summary = result["summary"]
  get = lambda m, k: summary[m][k][0]
  losses = log["meta_loss"]
  return {
      "variant": name, "flags": flags, "outer_steps": len(losses),
      "meta_loss_first10": sum(losses[:10]) / max(len(losses[:10]), 1),
      "meta_loss_last10": sum(losses[-10:]) / max(len(losses[-10:]), 1),
      "max_meta_loss": max(losses) if losses else None,
      "speedup": get(optimizer, "speedup"), "diloco_speedup": get("diloco", "speedup"),
      "final_loss": get(optimizer, "final_train_loss"),
      "diloco_final_loss": get("diloco", "final_train_loss"),
      "local_sgd_final_loss": get("local_sgd", "final_train_loss"),
      "wall_h": sum(log["wall_s"]) / 3600,
  }


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS")
  ap.add_argument("--base", default=BASE, help="meta-train flags common to every variant")
  ap.add_argument("--steps", type=int, default=150, help="outer steps per variant")
  ap.add_argument("--outer-steps", type=int, default=2000,
                  help="the schedule's planned length (warm-up, then cosine decay)")
  ap.add_argument("--rounds", type=int, default=300, help="rounds of each evaluation run")
  ap.add_argument("--seeds", default="200-201", help="selection seeds (not 100-109)")
  ap.add_argument("--task", default="fmnist_mlp")
  ap.add_argument("--workers", "-K", type=int, default=8)
  ap.add_argument("--local-steps", "-H", type=int, default=4)
  ap.add_argument("--target-loss", type=float, default=0.2)
  ap.add_argument("--out", default="runs/ablation")
  ap.add_argument("--report-only", action="store_true",
                  help="only collect the variants already evaluated under --out")
  args = ap.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  for spec in args.variant:
    name, _, flags = spec.partition("=")
    if not name or "/" in name:
      raise SystemExit(f"--variant wants NAME=FLAGS with a plain NAME, got {spec!r}.")
    (out / name).mkdir(exist_ok=True)
    (out / name / "flags.txt").write_text(flags + "\n")
    if args.report_only:
      continue
    weights = _meta_train(name, flags, args.base, args.steps, args.outer_steps, out)
    optimizer = _optimizer(args.base, flags)
    _evaluate(name, weights, optimizer, args)
  rows = []
  for d in sorted(p for p in out.iterdir() if (p / "eval.json").exists()):
    flags = (d / "flags.txt").read_text().strip()
    optimizer = _optimizer(args.base, flags)
    log = json.loads((d / "log.json").read_text())
    rows.append(_row(d.name, flags, json.loads((d / "eval.json").read_text()), optimizer, log))
  (out / "ablation.json").write_text(json.dumps({"base": args.base, "steps": args.steps,
                                                 "seeds": args.seeds, "rounds": args.rounds,
                                                 "rows": rows}, indent=2) + "\n")
  head = ("| variant | flags | outer steps | meta-loss first 10 → last 10 (max) | speedup "
          "(DiLoCo) | final loss (DiLoCo, local SGD) | CPU h |")
  lines = [f"# Meta-training ablation ({args.task}, K={args.workers}, H={args.local_steps})", "",
           f"Base recipe: `{args.base}`; evaluation: seeds {args.seeds}, {args.rounds} rounds.",
           "", head, "|" + " --- |" * 7]
  for r in rows:
    lines.append(
        f"| {r['variant']} | `{r['flags']}` | {r['outer_steps']} | "
        f"{r['meta_loss_first10']:.3f} → {r['meta_loss_last10']:.3f} ({r['max_meta_loss']:.2f}) | "
        f"{_fmt(r['speedup'])} ({_fmt(r['diloco_speedup'])}) | {r['final_loss']:.4f} "
        f"({r['diloco_final_loss']:.4f}, {r['local_sgd_final_loss']:.4f}) | {r['wall_h']:.2f} |")
  (out / "ablation.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


def _optimizer(base: str, flags: str) -> str:
  """The optimizer a variant meta-trains: its flags' ``--optimizer`` over the base's."""
  return "lagg_a" if "lagg_a" in (base + " " + flags).split() else "lopt_a"


def _fmt(x):
  return "not reached" if x is None or x != x else f"{x:.2f}"


if __name__ == "__main__":
  sys.exit(main())
