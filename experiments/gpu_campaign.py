"""One device call of fixed length: several meta-training recipes side by side on one GPU, then
the selection protocol of ``docs/meta.md`` and the held-out evaluation of what it picks.

The stages share one deadline (``--deadline`` seconds after the start), so the call ends in
time and always brings back what it has:

1. **Meta-train** every variant of :data:`VARIANTS` as its own process (``optax-localsgd
   meta-train``, snapshots every few steps, ``--time-budget`` for all of them), at the same
   time: a variant with a few tasks per estimate is a chain of small kernels that leaves most of
   a GPU idle, so several can share it.
2. **Select** per optimizer and H: the final weights and a few snapshots of every variant are
   evaluated on the *selection* seeds 200-201 (300 rounds) against local SGD and tuned DiLoCo;
   the rule, fixed before any held-out number exists, is the highest speedup over local SGD,
   then the lowest final training loss (as in rounds 4-6 of ``docs/meta.md``).
3. **Held out**: the pick of each optimizer and H on seeds 100-109, 1000 rounds, against local
   SGD, SlowMo and DiLoCo (``optax-localsgd evaluate``'s defaults, the published table's protocol).

Everything lands in ``OUT/campaign.tar.gz`` (weights, snapshots, meta-training logs, every
evaluation's table and JSON) and ``OUT/summary.json``, after each stage, so a call cut short
still returns the stages it finished. Usage on the device machine (the four Fashion-MNIST
files copied into the git-ignored ``data/fashion-mnist`` and named in ``carry``)::

  python experiments/gpu_campaign.py --out $OUT --data-dir data/fashion-mnist --deadline 560

``--scale tiny`` runs the same stages on a 16-unit MLP with 2 tasks and truncations of 2
rounds, in a couple of minutes on a CPU (``tests/test_gpu_campaign.py`` runs its train stage).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tarfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
try:
  from optax_localsgd import cli
except ImportError:  # the device machine has no installed package: this checkout's, as below
  sys.path.insert(0, str(ROOT / "src"))
  from optax_localsgd import cli

# The paper's appendix-B recipe (experiments/gpu_full_recipe.sh), planned for 5000 steps.
PAPER = ("--task fmnist_mlp -K 8 -H 4 -B 128 --outer-steps 5000 --tasks-per-estimate 8 "
         "--truncation 50 --min-inner 100 --max-inner 1000 --lr-peak 3e-3 --warmup-steps 100 "
         "--feature-set ada-v2")
# DiLoCo's outer Nesterov step as the start (docs/meta.md round 3) with 8x the paper's
# particles per estimate: round 3 measured one 4-task estimate at 1.6% signal, and a GPU runs
# a wider vmap at little extra cost per step.
NOMINAL = ("--task fmnist_mlp -K 8 -H 4 -B 128 --init nesterov:1.0,0.95 --local-lr 0.1 "
           "--outer-steps 1500 --tasks-per-estimate 64 --truncation 50 --min-inner 100 "
           "--max-inner 1000 --lr-peak 1e-3 --lr-end 1e-4 --warmup-steps 20 --loss-clip 1.5")
# Round 4's subset (output layer and decays) with the same particles.
OUTPUT = NOMINAL.replace("--lr-peak 1e-3", "--lr-peak 3e-3") + \
    " --perturb w2,b2,decay_offsets"

# Round 8 (planned, not run yet): go on from round 7's bundled weights at a lower learning rate
# with inner problems twice as long (round 7 ended behind DiLoCo in final loss after 1000
# rounds), fine-tune LAgg-A for H = 16, and two more seeds of round 7's recipe (robustness).
CONTINUE = ("--task fmnist_mlp -K 8 -H 4 -B 128 --local-lr 0.1 --outer-steps 1000 "
            "--tasks-per-estimate 64 --truncation 50 --min-inner 100 --max-inner 2000 "
            "--lr-peak 3e-4 --lr-end 3e-5 --warmup-steps 10 --loss-clip 1.5 --snapshot-every 100")

VARIANTS = {
    # Round 7 (docs/meta.md).
    "lopt_paper": f"--optimizer lopt_a {PAPER} --snapshot-every 250",
    "lagg_paper": f"--optimizer lagg_a {PAPER} --snapshot-every 250",
    "lopt_nom64": f"--optimizer lopt_a {NOMINAL} --snapshot-every 100",
    "lagg_nom64": f"--optimizer lagg_a {NOMINAL} --snapshot-every 100",
    "lopt_out64": f"--optimizer lopt_a {OUTPUT} --snapshot-every 100",
    "lagg_out64": f"--optimizer lagg_a {OUTPUT} --snapshot-every 100",
    # Round 8.
    "lopt_cont64": f"--optimizer lopt_a --init-from lopt_a/fmnist_mlp_k8_h4 {CONTINUE}",
    "lagg_cont64": f"--optimizer lagg_a --init-from lagg_a/fmnist_mlp_k8_h4 {CONTINUE}",
    "lagg_h16": ("--optimizer lagg_a --init-from lagg_a/fmnist_mlp_k8_h4 "
                 + CONTINUE.replace("-H 4", "-H 16").replace("--max-inner 2000",
                                                             "--max-inner 1000")),
    "lopt_nom64_s1": f"--optimizer lopt_a {NOMINAL} --snapshot-every 100 --seed 1",
    "lopt_nom64_s2": f"--optimizer lopt_a {NOMINAL} --snapshot-every 100 --seed 2",
}
ROUND7 = "lopt_paper,lagg_paper,lopt_nom64,lagg_nom64,lopt_out64,lagg_out64"
ROUND8 = "lopt_cont64,lagg_cont64,lagg_h16,lopt_nom64_s1,lopt_nom64_s2"
# What --scale tiny appends to every variant (argparse keeps the last value of a flag), and its
# task (a repeated --task would add a task, not replace it).
TINY = "--tasks-per-estimate 2 --truncation 2 --min-inner 4 --max-inner 8 --snapshot-every 1"
TINY_TASK = "fmnist_mlp:hidden=16"


def setting_of(flags: str) -> tuple[str, int]:
  """The optimizer and H that ``meta-train FLAGS`` trains (read by the command's own parser)."""
  args = cli.build_parser().parse_args(["meta-train", *shlex.split(flags), "--out", "-"])
  return args.optimizer, args.local_steps


def group_of(flags: str) -> str:
  """What the selection picks one of: an optimizer at one H, e.g. ``lagg_a_h16``."""
  optimizer, local_steps = setting_of(flags)
  return f"{optimizer}_h{local_steps}"


class Clock:
  def __init__(self, deadline_s: float):
    self.t0, self.deadline = time.monotonic(), deadline_s

  def elapsed(self) -> float:
    return time.monotonic() - self.t0

  def left(self) -> float:
    return self.deadline - self.elapsed()


def run_all(cmds: dict[str, list[str]], logs: pathlib.Path, timeout_s: float,
            env: dict) -> dict[str, int]:
  """Run the commands at once; kill what is still running after ``timeout_s``."""
  logs.mkdir(parents=True, exist_ok=True)
  procs = {name: subprocess.Popen(cmd, stdout=open(logs / f"{name}.log", "w"),
                                  stderr=subprocess.STDOUT, env=env, cwd=ROOT)
           for name, cmd in cmds.items()}
  end = time.monotonic() + timeout_s
  rcs = {}
  for name, p in procs.items():
    try:
      rcs[name] = p.wait(timeout=max(end - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
      p.terminate()  # meta-train and evaluate checkpoint/cache what they have on SIGTERM
      try:
        rcs[name] = p.wait(timeout=20)
      except subprocess.TimeoutExpired:
        p.kill()
        rcs[name] = -9
  return rcs


def candidates(run: pathlib.Path, per_run: int) -> list[pathlib.Path]:
  """The run's final weights and up to ``per_run - 1`` snapshots spread over its history."""
  final = run / "weights.safetensors"
  out = [final] if final.exists() else []
  snaps = sorted((run / "snapshots").glob("weights_step*.safetensors"))
  pool = snaps[:-1] if out else snaps  # the last snapshot is a few steps before the final
  n = min(per_run - len(out), len(pool))
  return out + [pool[(i + 1) * len(pool) // n - 1] for i in range(n)] if n > 0 else out


def evaluate_cmd(name: str, flags: str, weights: pathlib.Path, out: pathlib.Path,
                 cache: pathlib.Path, args, held_out: bool) -> list[str]:
  """``optax-localsgd evaluate`` of ``weights``, meta-trained by ``meta-train FLAGS``, at their
  H: the selection protocol, or with ``held_out`` the published table's."""
  optimizer, local_steps = setting_of(flags)
  cmd = [sys.executable, "-m", "optax_localsgd.cli", "evaluate", "--task", args.task,
         "-K", "8", "-H", str(local_steps), "--quiet", "--name", name, "--cache", str(cache),
         "--out", str(out), "--weights", f"{optimizer}={weights}"]
  if args.data_dir:
    cmd += ["--data-dir", args.data_dir]
  if args.hparams_key:
    cmd += ["--hparams-key", args.hparams_key]
  if held_out:
    return cmd + ["--seeds", args.heldout_seeds, "--rounds", str(args.heldout_rounds),
                  "--methods", f"local_sgd,slowmo,diloco,{optimizer}"]
  return cmd + ["--seeds", "200-201", "--rounds", str(args.select_rounds), "--methods",
                f"local_sgd,diloco,{optimizer}", "--target-loss", "0.2", "--eval-every", "10",
                "--eval-dense-until", "0"]


def score(eval_json: pathlib.Path, optimizer: str) -> tuple[float, float]:
  """The selection rule as a sort key: highest speedup, then lowest final training loss."""
  s = json.loads(eval_json.read_text())["summary"][optimizer]
  speed, loss = s["speedup"][0], s["final_train_loss"][0]
  speed = speed if speed is not None and speed == speed else 0.0
  loss = loss if loss is not None and loss == loss else float("inf")
  return (-speed, loss)


def pack(work: pathlib.Path, out: pathlib.Path, summary: dict) -> None:
  (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
  tmp = out / "campaign.tar.gz.tmp"
  with tarfile.open(tmp, "w:gz") as tar:
    for p in sorted(work.rglob("*")):
      if p.is_file() and p.suffix != ".npz" and "jax_cache" not in p.parts:
        tar.add(p, arcname=str(p.relative_to(work)))
  tmp.rename(out / "campaign.tar.gz")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True, help="where the results go ($OUT on the device)")
  ap.add_argument("--work", default="/tmp/gpu_campaign", help="scratch directory")
  ap.add_argument("--data-dir", default=None)
  ap.add_argument("--deadline", type=float, default=560, help="seconds for the whole call")
  ap.add_argument("--train-s", type=float, default=270, help="meta-training's time budget")
  ap.add_argument("--select-s", type=float, default=110, help="the selection stage's budget")
  ap.add_argument("--variants", default=ROUND8,
                  help=f"comma-separated names from VARIANTS (default: round 8's, {ROUND8}; "
                       f"round 7 ran {ROUND7})")
  ap.add_argument("--per-run", type=int, default=4, help="candidates per variant")
  ap.add_argument("--select-rounds", type=int, default=300)
  ap.add_argument("--heldout-seeds", default="100-109")
  ap.add_argument("--heldout-rounds", type=int, default=1000)
  ap.add_argument("--task", default="fmnist_mlp", help="the evaluation task")
  ap.add_argument("--hparams-key", default=None,
                  help="the baselines' tuned-hyperparameter entry (default: the task's)")
  ap.add_argument("--scale", choices=["full", "tiny"], default="full")
  ap.add_argument("--stages", default="train,select,heldout",
                  help="stages to run; 'train' alone leaves the evaluation to another machine")
  args = ap.parse_args(argv)
  clock = Clock(args.deadline)
  out, work = pathlib.Path(args.out), pathlib.Path(args.work)
  out.mkdir(parents=True, exist_ok=True)
  work.mkdir(parents=True, exist_ok=True)
  names = args.variants.split(",")
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
  env = dict(os.environ)
  env["PYTHONPATH"] = f"{ROOT / 'src'}:{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(
      ROOT / "src")
  # Several JAX processes share the GPU: none may take the default 75% of its memory.
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / len(names):.3f}")
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(work / "jax_cache"))
  summary = {"variants": {n: VARIANTS[n] for n in names}, "scale": args.scale, "stages": {}}

  # 1. Meta-train.
  cmds = {}
  for n in names:
    flags = VARIANTS[n]
    if args.scale == "tiny":
      flags = flags.replace("--task fmnist_mlp ", f"--task {TINY_TASK} ") + " " + TINY
    cmd = [sys.executable, "-m", "optax_localsgd.cli", "meta-train", *shlex.split(flags),
           "--time-budget", str(args.train_s), "--export-partial", "--quiet",
           "--checkpoint-every", "100000", "--out", str(work / "runs" / n)]
    if args.data_dir:
      cmd += ["--data-dir", args.data_dir]
    cmds[n] = cmd
  rcs = run_all(cmds, work / "logs" / "train", args.train_s + 60, env)
  runs = {}
  for n in names:
    log = work / "runs" / n / "log.json"
    walls = json.loads(log.read_text())["wall_s"] if log.exists() else []  # one per step
    runs[n] = {"rc": rcs[n], "steps": len(walls),
               "median_step_s": sorted(walls)[len(walls) // 2] if walls else None}
  summary["stages"]["train"] = {"s": clock.elapsed(), "runs": runs}
  pack(work, out, summary)
  if "select" not in args.stages.split(","):
    print(json.dumps(summary, indent=1))
    return 0

  # 2. Select on seeds 200-201.
  sel_of = {f"{n}__{w.stem}": (n, w) for n in names
            for w in candidates(work / "runs" / n, args.per_run)}
  # One process per variant, its candidates one after the other (the baselines come from the
  # process's cache after the first).
  sel_cmds = {}
  for n in names:
    sel = work / "select" / n
    script = " && ".join(shlex.join(evaluate_cmd(t, VARIANTS[n], w, sel, sel / "cache", args,
                                                 False))
                         for t, (m, w) in sel_of.items() if m == n)
    if script:
      sel_cmds[n] = ["bash", "-c", script]
  budget = min(args.select_s, clock.left() - 30)
  run_all(sel_cmds, work / "logs" / "select", max(budget, 1), env)
  scores = {}
  for t, (n, w) in sel_of.items():
    j = work / "select" / n / f"{t}.json"
    if j.exists():
      scores[t] = score(j, setting_of(VARIANTS[n])[0])
  picks = {}
  for group in sorted({group_of(VARIANTS[n]) for n in names}):
    mine = sorted((s, t) for t, s in scores.items() if group_of(VARIANTS[sel_of[t][0]]) == group)
    if mine:
      (speed, loss), tag = mine[0]
      n, w = sel_of[tag]
      picks[group] = {"candidate": tag, "weights": str(w), "flags": VARIANTS[n],
                      "speedup": -speed, "final_loss": loss}
  summary["stages"]["select"] = {"s": clock.elapsed(),
                                 "scores": {t: list(s) for t, s in scores.items()},
                                 "picks": picks}
  pack(work, out, summary)
  if "heldout" not in args.stages.split(","):
    print(json.dumps(summary, indent=1))
    return 0

  # 3. Held out: the picks, each in its own process.
  # Separate caches: two processes never write one file.
  held = {g: evaluate_cmd(f"heldout_{g}", p["flags"], pathlib.Path(p["weights"]),
                          work / "heldout", work / "heldout" / f"cache_{g}", args, True)
          for g, p in picks.items()}
  run_all(held, work / "logs" / "heldout", max(clock.left() - 25, 1), env)
  summary["stages"]["heldout"] = {"s": clock.elapsed(), "done": {
      g: (work / "heldout" / f"heldout_{g}.json").exists() for g in held}}
  pack(work, out, summary)
  print(json.dumps(summary, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
