"""Meta-training throughput: PES outer steps/s, and PES overhead over the bare rounds.

One PES outer step unrolls ``2 x tasks_per_estimate`` particles for ``truncation`` rounds of
local SGD with the learned server, then does the PES bookkeeping (perturbations, accumulated
perturbations, resets, NaN guards) and one AdamW step. The "bare" program runs the same
particles for the same rounds from the same states with fixed meta-parameters and nothing
else. Both are jitted, warmed up, and timed interleaved; the ratio is PES / bare.

Usage (defaults are the paper's settings: FMNIST MLP, K=8, H=4, B=128, 8 tasks, T_r=50):
  python benchmarks/meta_train.py [--optimizer lopt_a] [--reps 3] [--truncation 50]
Writes ``meta_train.json`` and ``meta_train.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import sys
import time


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--optimizer", default="lopt_a", choices=("lopt_a", "lagg_a"))
  ap.add_argument("--task", default="fmnist_mlp")
  ap.add_argument("--workers", type=int, default=8)
  ap.add_argument("--local-steps", type=int, default=4)
  ap.add_argument("--batch-size", type=int, default=128)
  ap.add_argument("--tasks-per-estimate", type=int, default=8)
  ap.add_argument("--truncation", type=int, default=50)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  from optax_localsgd.meta import problem
  from optax_localsgd.meta.train import MetaTrainConfig, _setup

  cfg = MetaTrainConfig(
      optimizer=args.optimizer, tasks=(args.task,), workers=args.workers,
      local_steps=args.local_steps, batch_size=args.batch_size,
      tasks_per_estimate=args.tasks_per_estimate,
      pes=problem.PESConfig(truncation=args.truncation))
  groups, datas, state = _setup(cfg)
  (group,), (dd,) = groups, datas
  outer = jax.jit(problem.make_outer_step(groups, cfg.pes))
  unroll = problem._unroll_fn(group, cfg.pes.truncation, dd)

  @jax.jit
  def bare(theta, gs):
    # The same particles and rounds, no perturbation, no PES bookkeeping, no meta-update.
    def pair(params, sstate, key, start):
      return jax.vmap(lambda p, s: unroll(theta, (p, s), (key, start)))(params, sstate)
    (p, s), losses = jax.vmap(pair)(gs.params, gs.server_state, gs.key, gs.rounds_done)
    return p, s, losses

  t0 = time.perf_counter()
  jax.block_until_ready(outer(state, datas))
  compile_pes = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(bare(state.theta, state.groups[0]))
  compile_bare = time.perf_counter() - t0
  print(f"compiled: PES {compile_pes:.1f}s, bare {compile_bare:.1f}s", file=sys.stderr)

  t_pes, t_bare = [], []
  for rep in range(args.reps):
    t0 = time.perf_counter()
    state, _ = jax.block_until_ready(outer(state, datas))
    t_pes.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    jax.block_until_ready(bare(state.theta, state.groups[0]))
    t_bare.append(time.perf_counter() - t0)
    print(f"rep {rep + 1}: PES {t_pes[-1]:.2f}s bare {t_bare[-1]:.2f}s", file=sys.stderr)

  pes_s, bare_s = statistics.median(t_pes), statistics.median(t_bare)
  rounds = 2 * args.tasks_per_estimate * args.truncation
  result = {
      "optimizer": args.optimizer, "task": args.task, "K": args.workers,
      "H": args.local_steps, "B": args.batch_size, "tasks_per_estimate": args.tasks_per_estimate,
      "truncation": args.truncation, "rounds_per_outer_step": rounds,
      "pes_step_s": pes_s, "bare_rounds_s": bare_s, "pes_over_bare": pes_s / bare_s,
      "outer_steps_per_s": 1 / pes_s, "round_ms_in_pes": 1e3 * pes_s / rounds,
      "hours_for_5000_steps": 5000 * pes_s / 3600, "compile_s": compile_pes, "reps": args.reps,
      "platform": jax.default_backend(), "device": jax.devices()[0].device_kind,
      "cpu_count": os.cpu_count(), "jax": jax.__version__,
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "command": " ".join(["python benchmarks/meta_train.py", *(argv or sys.argv[1:])])}
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = f"meta_train_{args.optimizer}_{result['platform']}"
  (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
  md = "\n".join([
      f"# Meta-training throughput ({args.optimizer}, {args.task}, K={args.workers}, "
      f"H={args.local_steps}, B={args.batch_size}, {args.tasks_per_estimate} tasks, "
      f"T_r={args.truncation})", "",
      f"`{result['command']}` on {result['platform']} ({result['device']}, "
      f"{result['cpu_count']} cores), jax {result['jax']}, {result['date']}; median of "
      f"{args.reps}.", "",
      "| PES outer step (s) | bare rounds (s) | PES / bare | outer steps/s | "
      "5000 steps (h) |", "| ---: | ---: | ---: | ---: | ---: |",
      f"| {pes_s:.2f} | {bare_s:.2f} | {pes_s / bare_s:.3f} | {1 / pes_s:.4f} | "
      f"{result['hours_for_5000_steps']:.1f} |"]) + "\n"
  (out / f"{stem}.md").write_text(md)
  print(md)
  return result


if __name__ == "__main__":
  main()
