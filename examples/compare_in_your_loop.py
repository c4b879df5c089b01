"""The bundled learned optimizers against tuned baselines, in a plain JAX loop of your own.

A Flax ReLU MLP of your own on Fashion-MNIST pixels scaled to [0, 1] (no other preprocessing),
K workers each taking H SGD steps per round on their own shard, and one server transform per
method: local SGD (plain averaging), SlowMo and DiLoCo at the package's tuned values, and LOpt-A
and LAgg-A with their bundled weights. Nothing of the package's engine or preprocessing is used,
only its server transforms, its weights, its tuned numbers and its data loader, so this is
what a user who drops ``lopt_a(...)`` into their own loop gets.

Every method of a seed starts from the same init and sees the same minibatches. The table gives
the paper's Table 2 speedup (local SGD's rounds to its own best training loss, over the method's
rounds to that loss), the rounds to a target loss and the final loss, all on a fixed
10,000-example subset of the training set evaluated every ``--eval-every`` rounds.

  python examples/compare_in_your_loop.py                          # 2-layer MLP, 300 rounds
  python examples/compare_in_your_loop.py --hidden 128,128,128     # held out: 3 layers
  python examples/compare_in_your_loop.py --hidden 512,512         # held out: 4x wider
  python examples/compare_in_your_loop.py --weights lopt_a=runs/x/weights.safetensors

Writes ``--out``/compare.json and, with matplotlib, compare.png.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax_localsgd as ol
from optax_localsgd import data
from optax_localsgd.harness import sweep
from optax_localsgd.transforms import baselines

from custom_loop import make_round, sample_round

PROG = "compare_in_your_loop.py"
LEARNED = ("lopt_a", "lagg_a")


class PlainMLP(nn.Module):
  """ReLU layers of the given widths on pixels / 255, then 10 logits."""
  hidden: tuple[int, ...] = (128, 128)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(10)(x)


def servers(args: argparse.Namespace) -> dict[str, tuple[optax.GradientTransformation, bool, float]]:
  """Method -> (server transform, reads per-worker deltas, workers' learning rate)."""
  tuned = sweep.tuned_hparams(args.hparams_key)
  weights = dict(w.partition("=")[::2] for w in args.weights)
  out = {}
  for m in args.methods:
    hp = tuned.get(m, {})
    gamma = hp.get("local_lr", args.local_lr)
    if m == "local_sgd":
      out[m] = (ol.local_sgd(1.0), False, gamma)
    elif m == "slowmo":
      out[m] = (ol.slowmo(hp["server_lr"], hp["momentum"], gamma), False, gamma)
    elif m == "diloco":
      out[m] = (baselines.diloco(hp["server_lr"], hp["momentum"]), False, gamma)
    elif m in LEARNED:
      name = weights.get(m, f"{m}/fmnist_mlp_k{args.workers}_h{args.local_steps}")
      meta = ol.pretrained.load(name, num_workers=args.workers)
      tx = ol.lopt_a(meta) if m == "lopt_a" else ol.lagg_a(meta, args.workers)
      # The workers' learning rate the weights were meta-trained with (their card says it).
      info = ol.pretrained.metadata(name).get("info", {})
      out[m] = (tx, m == "lagg_a", float(info.get("local_lr", args.local_lr)))
    else:
      raise ValueError(f"unknown method {m!r}; choose from local_sgd, slowmo, diloco, "
                       f"lopt_a, lagg_a")
  return out


def run(model: nn.Module, server, per_worker: bool, gamma: float, train: dict, ev: dict,
        args: argparse.Namespace, seed: int) -> dict:
  def loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": params}, x), y).mean()

  params = model.init(jax.random.PRNGKey(seed), train["x"][:1])["params"]
  round_fn = make_round(optax.sgd(gamma), server, loss=loss, per_worker=per_worker)
  state = server.init(params)
  eval_loss = jax.jit(loss)
  shards = data.split_homogeneous(len(train["y"]), args.workers, seed)
  rng = np.random.default_rng(seed)  # the same minibatches for every method of a seed
  rounds, losses = [0], [float(eval_loss(params, ev["x"], ev["y"]))]
  for r in range(1, args.rounds + 1):
    x, y = sample_round(rng, train, shards, args.local_steps, args.batch_size)
    params, state, _ = round_fn(params, state, x, y)
    if r % args.eval_every == 0 or r == args.rounds:
      rounds.append(r)
      losses.append(float(eval_loss(params, ev["x"], ev["y"])))
  return {"rounds": rounds, "loss": losses}


def first_reach(h: dict, target: float) -> int | None:
  return next((r for r, v in zip(h["rounds"], h["loss"]) if v <= target), None)


def summarize(results: dict, target: float) -> dict:
  """Per method: mean over seeds of speedup, rounds to ``target`` and final loss."""
  table = {}
  for m, per_seed in results.items():
    sp, reach, final = [], [], []
    for seed, h in per_seed.items():
      local = results["local_sgd"][seed]
      best = min(local["loss"])
      r_m, r_l = first_reach(h, best), first_reach(local, best)
      sp.append(None if r_m is None else r_l / max(r_m, 1))
      reach.append(first_reach(h, target))
      final.append(h["loss"][-1])
    mean = lambda v: (float(np.mean([x for x in v if x is not None]))
                      if any(x is not None for x in v) else None)
    table[m] = {"speedup": mean(sp), "rounds_to_target": mean(reach),
                "reached": sum(x is not None for x in reach), "final_loss": float(np.mean(final)),
                "seeds": len(per_seed)}
  return table


def parse_args(argv):
  ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
  ap.add_argument("--methods", default="local_sgd,slowmo,diloco,lopt_a,lagg_a",
                  type=lambda s: s.split(","))
  ap.add_argument("--weights", action="append", default=[], metavar="METHOD=NAME_OR_PATH",
                  help="weights of a learned method (default METHOD/fmnist_mlp_kK_hH)")
  ap.add_argument("--hidden", default="128,128", type=lambda s: tuple(map(int, s.split(","))),
                  help="widths of the MLP's hidden layers (default 128,128)")
  ap.add_argument("--workers", "-K", type=int, default=8)
  ap.add_argument("--local-steps", "-H", type=int, default=4)
  ap.add_argument("--batch-size", "-B", type=int, default=128)
  ap.add_argument("--local-lr", type=float, default=0.3,
                  help="workers' SGD learning rate where the tuned file has none")
  ap.add_argument("--hparams-key", default="fmnist_mlp/K8/H4/B128",
                  help="entry of the package's tuned hyperparameters for the baselines")
  ap.add_argument("--rounds", type=int, default=300)
  ap.add_argument("--eval-every", type=int, default=5)
  ap.add_argument("--target-loss", type=float, default=0.2)
  ap.add_argument("--seeds", default="0,1", type=lambda s: [int(x) for x in s.split(",")])
  ap.add_argument("--data-dir", default=None)
  ap.add_argument("--out", default="runs/compare_in_your_loop")
  return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    txs = servers(args)
    train = data.load_fashion_mnist("train", args.data_dir)
  except (ValueError, FileNotFoundError) as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  train = {"x": train.x, "y": train.y}
  pick = np.random.default_rng(12345).choice(len(train["y"]), 10_000, replace=False)
  ev = {"x": jnp.asarray(train["x"][pick]), "y": jnp.asarray(train["y"][pick])}
  model = PlainMLP(args.hidden)
  results = {m: {} for m in txs}
  for seed in args.seeds:
    for m, (tx, per_worker, gamma) in txs.items():
      t0 = time.perf_counter()
      results[m][seed] = run(model, tx, per_worker, gamma, train, ev, args, seed)
      print(f"seed {seed} {m:9s} final loss {results[m][seed]['loss'][-1]:.4f} "
            f"({time.perf_counter() - t0:.0f} s)", flush=True)
  table = summarize(results, args.target_loss)
  fmt = lambda x, f: "not reached" if x is None else format(x, f)
  print(f"\nMLP {args.hidden}, inputs in [0, 1], K={args.workers}, H={args.local_steps}, "
        f"B={args.batch_size}, {args.rounds} rounds, seeds {args.seeds}\n")
  print(f"| method | speedup over local SGD | rounds to {args.target_loss} | final loss |")
  print("| --- | --- | --- | --- |")
  for m, row in table.items():
    print(f"| {m} | {fmt(row['speedup'], '.2f')} | {fmt(row['rounds_to_target'], '.0f')} "
          f"({row['reached']}/{row['seeds']}) | {row['final_loss']:.4f} |")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "compare.json").write_text(json.dumps(
      {"command": " ".join(["python examples/compare_in_your_loop.py", *(argv or sys.argv[1:])]),
       "hidden": args.hidden, "table": table, "curves": results}, indent=1) + "\n")
  _plot(results, out / "compare.png", args)
  return 0


def _plot(results: dict, path: pathlib.Path, args) -> None:
  try:
    from matplotlib.figure import Figure
  except ImportError:
    print(f"(no plot: pip install matplotlib for {path})")
    return
  fig = Figure(figsize=(6, 4), layout="constrained")
  ax = fig.add_subplot()
  for m, per_seed in results.items():
    curves = list(per_seed.values())
    ax.plot(curves[0]["rounds"], np.mean([c["loss"] for c in curves], axis=0), label=m)
  ax.set(yscale="log", xlabel="round", ylabel="training loss (10k subset)",
         title=f"your own loop: MLP {args.hidden}, K={args.workers}, H={args.local_steps}")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.savefig(path, dpi=110)
  print(f"wrote {path}")


if __name__ == "__main__":
  sys.exit(main())
