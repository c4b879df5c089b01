"""Your own Flax model and training loop, with a learned server optimizer from optax-localsgd.

A small MLP of your own, K workers that each take H steps of ``optax.chain(clip, sgd)`` on
their own shard of Fashion-MNIST, and LOpt-A on the server with meta-trained weights. Each
round every worker starts from the global weights; the server reads the mean of their deltas
``old - new`` (the sign of a gradient) and returns an update for ``optax.apply_updates``.
Only the server transform (and the data loader) come from the package: swap in your own
model, data and worker optimizer. (``optax_localsgd.engine.make_round_fn`` packages the same round, with
minibatches drawn on the device and a multi-device option.)

  python examples/custom_loop.py                           # bundled weights
  python examples/custom_loop.py --weights my.safetensors  # a weight file of your own
  python examples/custom_loop.py --untrained               # no weights installed: fresh LOpt-A

Runs in well under a minute on a CPU.
"""

from __future__ import annotations

import argparse
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax_localsgd as ol
from optax_localsgd import data

PROG = "custom_loop.py"


class SmallMLP(nn.Module):
  """Two 64-unit ReLU layers with LayerNorm, then a linear classifier: 10 logits."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0  # uint8 pixels -> [0, 1]
    for _ in range(2):
      x = nn.relu(nn.LayerNorm()(nn.Dense(64)(x)))
    return nn.Dense(10)(x)


MODEL = SmallMLP()


def loss_fn(params, x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy in nats."""
  logits = MODEL.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(params, x: jax.Array, y: jax.Array) -> jax.Array:
  """Fraction of examples whose arg-max logit is the label."""
  return (MODEL.apply({"params": params}, x).argmax(-1) == y).mean()


def load_data(args: argparse.Namespace) -> tuple[dict, dict]:
  """Train and test ``{"x": uint8 (N, 28, 28, 1) pixels, "y": int32 (N,) labels 0..9}``."""
  if args.synthetic:  # ten Gaussian blobs of 28x28 "images", for a run without any files.
    rng = np.random.default_rng(args.seed)
    centers = rng.uniform(0, 255, (10, 28, 28, 1))

    def make(n: int) -> dict:
      y = rng.integers(0, 10, n).astype(np.int32)
      x = np.clip(centers[y] + rng.normal(0, 60, (n, 28, 28, 1)), 0, 255).astype(np.uint8)
      return {"x": x, "y": y}

    return make(20_000), make(2_000)
  train, test = (data.load_fashion_mnist(s, args.data_dir) for s in ("train", "test"))
  return {"x": train.x, "y": train.y}, {"x": test.x, "y": test.y}


def server_weights(args: argparse.Namespace) -> ol.MetaParams:
  """LOpt-A meta-parameters: a bundled name or a weight file, or fresh ones with --untrained."""
  if args.untrained:
    print("note: fresh, un-meta-trained LOpt-A weights (the starting point of meta-training, "
          "not a useful optimizer yet).", file=sys.stderr)
    return ol.init_lopt_a(jax.random.PRNGKey(args.seed))
  return ol.pretrained.load(args.weights)


def make_round(worker_tx: optax.GradientTransformation, server: optax.GradientTransformation,
               loss=loss_fn, per_worker: bool = False):
  """One round: ``(params, server_state, x, y) -> (params, server_state, mean local loss)``.

  ``x``, ``y``: the round's minibatches, shape ``(K, H, B, ...)``: worker k's step h uses
  ``x[k, h]``. ``loss(params, x, y)``: the model's loss. ``per_worker``: the server reads the
  ``(K, ...)`` stack of worker deltas (LAgg-A) instead of their mean.
  """

  def worker(params, xs, ys):
    def step(carry, batch):
      p, s = carry
      loss_value, g = jax.value_and_grad(loss)(p, *batch)
      u, s = worker_tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), loss_value

    # Every worker starts from the global weights with a fresh optimizer state.
    (p, _), losses = jax.lax.scan(step, (params, worker_tx.init(params)), (xs, ys))
    return p, losses.mean()

  @jax.jit
  def round_fn(params, server_state, x, y):
    new, losses = jax.vmap(worker, in_axes=(None, 0, 0))(params, x, y)
    if per_worker:  # worker k's old - new at index k
      delta = jax.tree.map(lambda old, w: old[None] - w, params, new)
    else:  # the mean of old - new
      delta = jax.tree.map(lambda old, w: old - w.mean(0), params, new)
    updates, server_state = server.update(delta, server_state, params)  # LOpt-A reads params
    return optax.apply_updates(params, updates), server_state, losses.mean()

  return round_fn


def sample_round(rng: np.random.Generator, train: dict, shards: np.ndarray, h: int,
                 b: int) -> tuple[np.ndarray, np.ndarray]:
  """Each worker's H minibatches of B examples from its own shard: arrays ``(K, H, B, ...)``."""
  k = len(shards)
  idx = np.stack([rng.choice(shard, h * b, replace=False) for shard in shards])
  idx = idx.reshape(k, h, b)
  return train["x"][idx], train["y"][idx]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog=PROG, description="A Flax MLP trained with local SGD: "
                               "K workers x H steps of clip+SGD, LOpt-A on the server.")
  ap.add_argument("--weights", default="lopt_a/fmnist_mlp_k8_h4",
                  help="LOpt-A weights: a bundled name or a .safetensors (or older .npz) path "
                  "(default lopt_a/fmnist_mlp_k8_h4)")
  ap.add_argument("--untrained", action="store_true",
                  help="fresh, un-meta-trained LOpt-A weights (when none are installed)")
  ap.add_argument("--workers", "-K", type=int, default=8, help="workers K (default 8)")
  ap.add_argument("--local-steps", "-H", type=int, default=4, help="local steps H (default 4)")
  ap.add_argument("--batch-size", "-B", type=int, default=32,
                  help="examples per worker per local step (default 32)")
  ap.add_argument("--rounds", type=int, default=100, help="communication rounds (default 100)")
  ap.add_argument("--local-lr", type=float, default=0.1, help="workers' SGD learning rate")
  ap.add_argument("--print-every", type=int, default=10, help="rounds between log lines")
  ap.add_argument("--synthetic", action="store_true",
                  help="random Gaussian-blob images instead of Fashion-MNIST")
  ap.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the "
                  "package's search paths, e.g. /usr/share/datasets/fashion-mnist)")
  ap.add_argument("--seed", type=int, default=0)
  return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    meta = server_weights(args)
    train, test = load_data(args)
  except (ValueError, FileNotFoundError) as e:  # unknown weights, missing or corrupt data
    print(f"{PROG}: error: {e}\n(--untrained runs without weight files, --synthetic without "
          f"data files.)", file=sys.stderr)
    return 2

  worker_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(args.local_lr))
  server = ol.lopt_a(meta)
  params = MODEL.init(jax.random.PRNGKey(args.seed), train["x"][:1])["params"]
  server_state = server.init(params)
  round_fn = make_round(worker_tx, server)
  shards = data.split_homogeneous(len(train["y"]), args.workers, args.seed)
  rng = np.random.default_rng(args.seed)

  t0 = time.perf_counter()
  for r in range(1, args.rounds + 1):
    x, y = sample_round(rng, train, shards, args.local_steps, args.batch_size)
    params, server_state, loss = round_fn(params, server_state, x, y)
    if r % args.print_every == 0 or r == args.rounds:
      print(f"round {r:4d}  mean local loss {float(loss):.4f}  "
            f"({time.perf_counter() - t0:.1f} s)", flush=True)
  acc = float(jax.jit(accuracy)(params, test["x"], test["y"]))
  print(f"test accuracy after {args.rounds} rounds: {100 * acc:.2f}%")
  return 0


if __name__ == "__main__":
  sys.exit(main())
