"""Meta-training throughput: problem-rounds/s, the share of this machine's matmul peak, and the
PES overhead over the bare rounds.

One PES outer step unrolls ``2 x tasks_per_estimate`` particles for ``truncation`` rounds of
local SGD with the learned server, then does the PES bookkeeping (perturbations, accumulated
perturbations, resets, NaN guards) and one AdamW step. The "bare" program runs the same
particles for the same rounds from the same states with fixed meta-parameters and nothing
else. Both are jitted, warmed up, and timed interleaved; the ratio is PES / bare.

In the same run it times a batched matmul ``(16, 1024, 784) @ (784, 128)`` in float32 and in
bfloat16 (the machine's peak for this kind of work). The inner training's matmul FLOPs are
counted analytically for tasks whose weights are all dense matrices (the MLPs): ``6 B`` FLOPs
per kernel entry per local step (forward 2, backward 4), times K workers, H steps and the
rounds. (XLA's cost analysis counts a loop body once, not once per trip, so it cannot be used
for a scanned program.) Achieved GFLOP/s and their share of the peak come from one process.

Usage (defaults are the paper's settings: FMNIST MLP, K=8, H=4, B=128, 8 tasks, T_r=50):
  python benchmarks/meta_train.py [--optimizer lopt_a] [--reps 3] [--truncation 50]
      [--task fmnist_mlp:compute_dtype=bfloat16] [--tag NAME]
Writes ``meta_train_{optimizer}_{platform}[_{tag}].json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import statistics
import sys
import time

import _results  # benchmarks/_results.py, next to this script


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
  ap.add_argument("--tag", default=None, help="suffix of the output files")
  ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np
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
  # The first bare unroll starts from the initial meta-parameters, the same in every run with
  # the same settings: its losses tell whether a cheaper compute dtype changes what PES sees.
  _, _, init_losses = jax.block_until_ready(bare(state.theta, state.groups[0]))
  compile_bare = time.perf_counter() - t0
  init_losses = np.asarray(init_losses, np.float64).ravel()  # one mean loss per particle
  print(f"compiled: PES {compile_pes:.1f}s, bare {compile_bare:.1f}s", file=sys.stderr)

  flops = _inner_matmul_flops(group.task, args.batch_size, args.workers, args.local_steps) * (
      2 * args.tasks_per_estimate * args.truncation)
  peak = {dt: _matmul_gflops(dt) for dt in ("float32", "bfloat16")}
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
      "problem_rounds_per_s": rounds / pes_s, "inner_matmul_gflop_per_step": flops / 1e9,
      "achieved_gflops": flops / 1e9 / pes_s, "matmul_peak_gflops": peak,
      "share_of_f32_peak": flops / 1e9 / pes_s / peak["float32"],
      "share_of_bf16_peak": flops / 1e9 / pes_s / peak["bfloat16"],
      "unroll_loss_at_init": float(init_losses.mean()),
      "unroll_loss_at_init_se": float(init_losses.std(ddof=1) / np.sqrt(init_losses.size)),
      "platform": jax.default_backend(), "device": jax.devices()[0].device_kind,
      "cpu_count": os.cpu_count(), "jax": jax.__version__,
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "command": " ".join(["python benchmarks/meta_train.py", *(argv or sys.argv[1:])])}
  stem = f"meta_train_{args.optimizer}_{result['platform']}" + (f"_{args.tag}" if args.tag else "")
  md = "\n".join([
      f"# Meta-training throughput ({args.optimizer}, {args.task}, K={args.workers}, "
      f"H={args.local_steps}, B={args.batch_size}, {args.tasks_per_estimate} tasks, "
      f"T_r={args.truncation})", "",
      f"`{result['command']}` on {result['platform']} ({result['device']}, "
      f"{result['cpu_count']} cores), jax {result['jax']}, {result['date']}; median of "
      f"{args.reps}.", "",
      "| PES outer step (s) | bare rounds (s) | PES / bare | problem-rounds/s | outer steps/s | "
      "5000 steps (h) |", "| ---: | ---: | ---: | ---: | ---: | ---: |",
      f"| {pes_s:.2f} | {bare_s:.2f} | {pes_s / bare_s:.3f} | {rounds / pes_s:.1f} | "
      f"{1 / pes_s:.4f} | {result['hours_for_5000_steps']:.1f} |", "",
      f"Inner-training matmuls: {flops / 1e9:.1f} GFLOP per outer step, so "
      f"{flops / 1e9 / pes_s:.0f} GFLOP/s achieved. Matmul peak measured in this run ((16, 1024, 784) @ (784, 128)): "
      f"{peak['float32']:.0f} GFLOP/s in float32, {peak['bfloat16']:.0f} in bfloat16; the "
      f"outer step reaches {100 * result['share_of_f32_peak']:.0f}% of the float32 peak and "
      f"{100 * result['share_of_bf16_peak']:.0f}% of the bfloat16 one.", "",
      f"Mean loss of the {init_losses.size} particles' first unroll from the initial "
      f"meta-parameters (same in every run of these settings; compare across compute dtypes): "
      f"{result['unroll_loss_at_init']:.4f} ± {result['unroll_loss_at_init_se']:.4f} "
      "(standard error over particles)."]) + "\n"
  _results.write(args.out, stem, result, md)
  print(md)
  return result


def _inner_matmul_flops(task, batch: int, workers: int, local_steps: int) -> float:
  """Matmul FLOPs of one round's local training: 6 B per dense-kernel entry per local step,
  times K and H; NaN for a task with other than 2-D kernels and 1-D biases (convolutions)."""
  import jax
  import numpy as np
  leaves = jax.tree.leaves(task.init(jax.random.PRNGKey(0)))
  if any(np.ndim(x) > 2 for x in leaves):
    return float("nan")
  entries = sum(int(np.prod(np.shape(x))) for x in leaves if np.ndim(x) == 2)
  return 6.0 * batch * entries * workers * local_steps


def _matmul_gflops(dtype: str, reps: int = 10) -> float:
  """GFLOP/s of a batched ``(16, 1024, 784) @ (784, 128)`` matmul in ``dtype`` (best of reps)."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((16, 1024, 784), dtype)
  b = jnp.ones((784, 128), dtype)
  f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  jax.block_until_ready(f(a, b))
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, b))
    best = min(best, time.perf_counter() - t0)
  return 2 * 16 * 1024 * 784 * 128 / best / 1e9


if __name__ == "__main__":
  main()
