"""What ``mlp_dtype="bfloat16"`` does to the learned step (issue 14), before it could be a default.

On the package's main task (Fashion-MNIST MLP, K = 8 workers, H = 4 local steps, B = 128) with
the bundled weights, for LOpt-A and LAgg-A:

1. **The update.** A float32 run; at a few rounds, the bfloat16 step is computed from the very
   same server state, params and deltas, and compared with the float32 step: relative error
   ``|u_bf16 - u_f32| / |u_f32|`` (global 2-norms over all tensors) and cosine similarity.
2. **A short run.** The same seeds trained again with the bfloat16 step throughout: final
   training loss (fixed 10,000-example training subset) against the float32 run's.

Usage:
  python benchmarks/mlp_precision.py [--rounds 300] [--seeds 100,101] [--out benchmarks/results]

Writes ``mlp_precision.json`` and ``mlp_precision.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import _results  # benchmarks/_results.py, next to this script
import optax_localsgd as ol
from optax_localsgd import data, engine, pretrained, tasks
from optax_localsgd.harness import trainer
from optax_localsgd.transforms import baselines

K, H, B = 8, 4, 128
PROBES = (1, 10, 100, 300)  # rounds after which the two steps are compared


def _server(kind: str, meta, dtype: str | None):
  return ol.lopt_a(meta, mlp_dtype=dtype) if kind == "lopt_a" else ol.lagg_a(meta, K,
                                                                               mlp_dtype=dtype)


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def run(kind: str, seed: int, rounds: int, dtype: str | None, task, arrays, evaluate,
        probe: bool) -> dict:
  """One run of ``rounds`` rounds; with ``probe``, the bfloat16-vs-float32 step comparison at
  :data:`PROBES` (recomputing the round's deltas from the same key)."""
  name = f"{kind}/fmnist_mlp_k8_h4"
  meta = pretrained.load(name, num_workers=K)
  local_lr = float(pretrained.metadata(name)["info"]["local_lr"])
  server = _server(kind, meta, dtype)
  cfg = engine.RoundConfig(K, H, B, per_worker_deltas=kind == "lagg_a")
  worker = baselines.worker_sgd(local_lr)
  round_fn = jax.jit(engine.make_round_fn(task.loss, engine.batch_fn_for(task), worker, server,
                                          cfg))
  ddata = jax.device_put(engine.DeviceData(
      arrays, data.split_homogeneous(tasks.num_items(task, arrays), K, seed)))
  key = jax.random.PRNGKey(seed)
  params = task.init(jax.random.fold_in(key, 0))
  state = engine.init_round_state(server, cfg, params)
  probes = []
  if probe:
    # The server step alone, float32 and bfloat16, on the deltas of the next round.
    f32, bf16 = _server(kind, meta, None), _server(kind, meta, "bfloat16")
    capture = _capture(cfg.per_worker_deltas)
    capture_fn = engine.make_round_fn(task.loss, engine.batch_fn_for(task), worker, capture, cfg)
    deltas_fn = jax.jit(lambda p, k: capture_fn(p, capture.init(p), k, ddata)[1])
    step32, step16 = jax.jit(f32.update), jax.jit(bf16.update)
  for r in range(rounds):
    k = jax.random.fold_in(jax.random.fold_in(key, 1), r)
    if probe and r + 1 in PROBES:
      d = deltas_fn(params, k)
      u32, _ = step32(d, state, params)
      u16, _ = step16(d, state, params)
      a, b = _flat(u32), _flat(u16)
      probes.append({"round": r + 1, "rel_error": float(np.linalg.norm(b - a) / np.linalg.norm(a)),
                     "cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))})
    params, state, _ = round_fn(params, state, k, ddata)
  loss, acc = evaluate(params)
  return {"kind": kind, "seed": seed, "mlp_dtype": dtype or "float32", "final_train_loss": loss,
          "final_train_accuracy": acc, "probes": probes}


def _capture(per_worker: bool) -> optax.GradientTransformation:
  """A 'server' that keeps the deltas it is given as its state (and takes no step): the round's
  deltas, as the learned step would see them."""
  lead = (K,) if per_worker else ()
  return optax.GradientTransformation(
      lambda p: jax.tree.map(lambda x: jnp.zeros(lead + x.shape, x.dtype), p),
      lambda u, s, p=None: (jax.tree.map(jnp.zeros_like, p), u))


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rounds", type=int, default=300)
  ap.add_argument("--seeds", default="100,101")
  ap.add_argument("--data-dir", default=None)
  ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
  args = ap.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(",")]
  task = tasks.from_spec("fmnist_mlp")
  arrays = tasks.load_split(task, "train", args.data_dir)
  evaluate = trainer.make_evaluator(task, engine.eval_batches(task, arrays, 10_000))
  runs = []
  for kind in ("lopt_a", "lagg_a"):
    for seed in seeds:
      for dtype in (None, "bfloat16"):
        runs.append(run(kind, seed, args.rounds, dtype, task, arrays, evaluate,
                        probe=dtype is None))
        print(f"{kind} seed {seed} {dtype or 'float32'}: {runs[-1]['final_train_loss']:.4f}",
              file=sys.stderr)
  result = {"runs": runs, "rounds": args.rounds, "seeds": seeds, "jax": jax.__version__,
            "device": str(jax.devices()[0].device_kind),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["python benchmarks/mlp_precision.py",
                                 *(argv if argv is not None else sys.argv[1:])])}
  _results.write(args.out, "mlp_precision", result, to_markdown(result))
  print(to_markdown(result))
  return result


def to_markdown(r: dict) -> str:
  lines = [f"# The learned step with bfloat16 MLP matmuls (`mlp_dtype=\"bfloat16\"`)", "",
           f"`{r['command']}` on {r['device']}, jax {r['jax']}, {r['date']}. Fashion-MNIST MLP, "
           f"K = {K}, H = {H}, B = {B}, the bundled weights, seeds "
           f"{', '.join(map(str, r['seeds']))}.", "",
           "The step itself, bfloat16 against float32 from the same state and deltas during a "
           "float32 run (mean over seeds):", "",
           "| optimizer | round | relative error of the update | cosine similarity |",
           "| --- | ---: | ---: | ---: |"]
  for kind in ("lopt_a", "lagg_a"):
    probes = [p for x in r["runs"] if x["kind"] == kind for p in x["probes"]]
    for rnd in sorted({p["round"] for p in probes}):
      ps = [p for p in probes if p["round"] == rnd]
      lines.append(f"| {kind} | {rnd} | {np.mean([p['rel_error'] for p in ps]):.4f} | "
                   f"{np.mean([p['cosine'] for p in ps]):.6f} |")
  lines += ["", f"Final training loss after {r['rounds']} rounds, each step float32 or bfloat16 "
            "throughout:", "", "| optimizer | seed | float32 | bfloat16 | difference |",
            "| --- | ---: | ---: | ---: | ---: |"]
  for kind in ("lopt_a", "lagg_a"):
    for seed in r["seeds"]:
      f32, b16 = (next(x["final_train_loss"] for x in r["runs"] if x["kind"] == kind and
                       x["seed"] == seed and x["mlp_dtype"] == d) for d in ("float32", "bfloat16"))
      lines.append(f"| {kind} | {seed} | {f32:.4f} | {b16:.4f} | {b16 - f32:+.4f} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
