"""Train a task with local SGD and a server optimizer: data on device, rounds scanned in chunks.

Used by the ``optax-localsgd train`` and ``demo`` commands. The loop is the engine's round
function, ``lax.scan``-ned over ``eval_every`` rounds per jitted call, so the host only
dispatches once per chunk; minibatches are sampled and gathered on the device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from optax_localsgd import compression, data, engine, tasks
from optax_localsgd.errors import UsageError
from optax_localsgd.harness import servers
from optax_localsgd.transforms import baselines
from optax_localsgd.transforms.learned.params import MetaParams
from optax_localsgd.util.progress import Progress



@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run.

  Attributes:
    task: task spec: a name (``optax_localsgd.tasks.available_tasks()``), optionally with
      overrides (``"fmnist_mlp:standardize=false"``, see :func:`optax_localsgd.tasks.from_spec`).
    server: server optimizer name (``optax_localsgd.harness.servers.available_servers()``).
    workers: K. local_steps: H. batch_size: B per worker per local step.
    rounds: communication rounds.
    seed: seed of the model init, the worker split and the minibatches.
    local_lr: the workers' SGD learning rate gamma.
    server_lr, momentum: server hyperparameters (``None``: the optimizer's default).
    clip_norm, weight_decay: for the workers' SGD (paper 5.5.6); ``None`` / 0 disables.
    eval_every: rounds between evaluations of the global model (also the scan chunk).
    eval_dense_until: evaluate after every round up to this round (rounds-to-target then has
      one-round resolution where it matters), every ``eval_every`` rounds after it.
    eval_examples: size of the fixed training subset for the global loss.
    devices: devices to spread the workers over (1: vmap on one device).
    data_dir: where the dataset is (``None``: the loader's search paths).
    compress: what every worker does to its delta before sending it, a spec of
      :func:`optax_localsgd.compression.from_spec` (``"top_k:0.01:ef"``, ``"quantize:4"``);
      ``None``: uncompressed.
  """
  task: str = "fmnist_mlp"
  server: str = "local_sgd"
  workers: int = 8
  local_steps: int = 4
  batch_size: int = 128
  rounds: int = 100
  seed: int = 0
  local_lr: float = 0.3
  server_lr: float | None = None
  momentum: float | None = None
  clip_norm: float | None = None
  weight_decay: float = 0.0
  eval_every: int = 10
  eval_dense_until: int = 0
  eval_examples: int = 10_000
  devices: int = 1
  data_dir: str | None = None
  compress: str | None = None

  def __post_init__(self):
    compression.from_flag(self.compress)  # a bad spec fails here, before any data is loaded


def round_config_for(server: servers.Server, workers: int, local_steps: int, batch_size: int,
                     compress: compression.Compression | None = None) -> engine.RoundConfig:
  """The engine's :class:`~optax_localsgd.engine.RoundConfig` for ``server``; compression only
  for a local-SGD server (the data-parallel baselines send gradients, not deltas)."""
  if compress is not None and server.mode != "local":
    raise UsageError(f"--compress applies to the workers' deltas of local SGD; {server.name} "
                     f"is a data-parallel baseline and sends none.")
  return engine.RoundConfig(workers, local_steps, batch_size,
                            per_worker_deltas=server.per_worker_deltas, compression=compress)


def round_fn_for(task: tasks.Task, server: servers.Server, workers: int, local_steps: int,
                 batch_size: int, local_lr, clip_norm: float | None = None,
                 weight_decay: float = 0.0, mesh=None,
                 compress: compression.Compression | None = None,
                 shard_server: bool = False) -> Callable:
  """The engine's round function for ``server``.

  ``server.mode == "local"``: K workers take H steps of SGD (``baselines.worker_sgd``), each
  compresses its delta with ``compress`` (if given), then the server step (over ``mesh``'s
  "workers" axis when given, sharded over it with ``shard_server``); its state is
  ``engine.init_round_state(server.tx, round_config_for(...), params[, mesh, shard_server])``.
  ``"data_parallel"``: one step of the server optimizer on K·H·B examples. ``local_lr`` may be a traced value (sweeps vmap over it).
  """
  round_cfg = round_config_for(server, workers, local_steps, batch_size, compress)
  batch_fn = engine.batch_fn_for(task)
  if server.mode == "data_parallel":
    return engine.make_data_parallel_round_fn(task.loss, batch_fn, server.tx, round_cfg)
  worker_tx = baselines.worker_sgd(local_lr, clip_norm, weight_decay)
  return engine.make_round_fn(task.loss, batch_fn, worker_tx, server.tx, round_cfg, mesh,
                              shard_server=shard_server)


@functools.lru_cache(maxsize=None)
def _metrics_fn(task: tasks.Task) -> Callable:
  # One jitted function per task (Task is a frozen dataclass: equal specs hash alike), so the
  # runs of an evaluation or a sweep, and a run's training and test batches, share one
  # compilation instead of compiling the same metrics twice per run.
  return jax.jit(lambda p, b: (task.loss(p, b), task.accuracy(p, b)))


def make_evaluator(task: tasks.Task, batches: list[dict]):
  """``evaluate(params) -> (mean loss, mean accuracy)`` over fixed batches (example-weighted)."""
  metrics = _metrics_fn(task)
  sizes = np.asarray([len(b["x"]) for b in batches], np.float64)

  def evaluate(params) -> tuple[float, float]:
    vals = np.asarray([jax.device_get(metrics(params, b)) for b in batches], np.float64)
    return tuple(float(v) for v in (sizes @ vals) / sizes.sum())

  return evaluate


def train(cfg: TrainConfig, *, meta_params: MetaParams | None = None, progress: bool = True,
          label: str | None = None) -> dict[str, Any]:
  """Run ``cfg`` and return its history (JSON-serialisable).

  Returns:
    ``{"config", "rounds", "train_loss", "eval_rounds", "global_train_loss",
    "global_train_accuracy", "bits_per_round", "test_loss", "test_accuracy", "wall_s"}``.
    ``train_loss`` is the mean local training loss of each round (over workers and local
    steps); ``global_train_loss`` is the global model's loss on the fixed training subset;
    ``bits_per_round`` is what the K workers send per round in the encoding of
    :mod:`optax_localsgd.compression.spec` (exact; ``None`` for a data-parallel baseline), so
    ``r * bits_per_round`` bits have been sent after round ``r``.
  """
  task = tasks.from_spec(cfg.task)
  train_arrays = tasks.load_split(task, "train", cfg.data_dir)
  n = tasks.num_items(task, train_arrays)
  shards = data.split_homogeneous(n, cfg.workers, cfg.seed)
  server = servers.make_server(
      cfg.server, num_workers=cfg.workers, local_learning_rate=cfg.local_lr,
      server_learning_rate=cfg.server_lr, momentum=cfg.momentum, meta_params=meta_params,
      seed=cfg.seed)
  mesh = None
  if cfg.devices > 1:
    if cfg.devices > len(jax.devices()):
      raise UsageError(f"--devices {cfg.devices} but JAX sees {len(jax.devices())} devices.")
    mesh = engine.worker_mesh(jax.devices()[:cfg.devices])
  compress = compression.from_flag(cfg.compress)
  round_cfg = round_config_for(server, cfg.workers, cfg.local_steps, cfg.batch_size, compress)
  # Over several devices, each computes the server step of its slice of every tensor (ZeRO-1,
  # docs/distributed.md); the data-parallel baselines have no server step to shard.
  shard = mesh is not None and server.mode == "local"
  round_fn = round_fn_for(task, server, cfg.workers, cfg.local_steps, cfg.batch_size,
                          cfg.local_lr, cfg.clip_norm, cfg.weight_decay, mesh, compress,
                          shard_server=shard)

  key = jax.random.PRNGKey(cfg.seed)
  params = task.init(jax.random.fold_in(key, 0))
  state = engine.init_round_state(server.tx, round_cfg, params, mesh, shard)
  dev_data = engine.DeviceData(train_arrays, shards)
  if mesh is not None:  # a sharded server state stays one slice per device
    dev_data, params, state = engine.replicate((dev_data, params, state), mesh)
  else:
    dev_data = jax.device_put(dev_data)
  round_key = jax.random.fold_in(key, 1)

  run_chunk = jax.jit(engine.make_multi_round_fn(round_fn))

  evaluate = make_evaluator(task, engine.eval_batches(task, train_arrays, cfg.eval_examples))
  hist = {"config": dataclasses.asdict(cfg), "label": label or cfg.server, "rounds": [],
          "train_loss": [], "eval_rounds": [], "global_train_loss": [],
          "global_train_accuracy": [], "sharded_server": shard,
          "bits_per_round": (compression.round_bits(compress, params, cfg.workers)
                             if server.mode == "local" else None)}

  def record_eval(r):
    loss, acc = evaluate(params)
    hist["eval_rounds"].append(r)
    hist["global_train_loss"].append(loss)
    hist["global_train_accuracy"].append(acc)
    return loss

  t0 = time.perf_counter()
  bar = Progress(cfg.rounds, desc=label or cfg.server, enabled=progress)
  last = record_eval(0)
  done = 0
  while done < cfg.rounds:
    n_chunk = min(1 if done < cfg.eval_dense_until else cfg.eval_every, cfg.rounds - done)
    params, state, losses = run_chunk(params, state, round_key, done, jnp.arange(n_chunk),
                                        dev_data)
    losses = np.asarray(jax.device_get(losses), np.float64)
    hist["rounds"].extend(range(done + 1, done + n_chunk + 1))
    hist["train_loss"].extend(losses.tolist())
    done += n_chunk
    last = record_eval(done)
    bar.update(n_chunk, local_loss=float(losses[-1]), global_loss=last)
    if not math.isfinite(last):
      bar.write(f"{label or cfg.server}: global loss is {last} at round {done}; stopping.")
      break
  bar.close()
  hist["wall_s"] = time.perf_counter() - t0
  try:
    test_arrays = tasks.load_split(task, "test", cfg.data_dir)
  except data.DatasetNotFoundError:
    test_arrays = None  # no held-out split on disk: report the training metrics only.
  if test_arrays is not None:
    hist["test_loss"], hist["test_accuracy"] = make_evaluator(
        task, engine.eval_batches(task, test_arrays, 10**9))(params)
  return hist


def rounds_to_reach(hist: dict, target: float) -> int | None:
  """First evaluated round whose global training loss is <= ``target`` (None if never)."""
  for r, v in zip(hist["eval_rounds"], hist["global_train_loss"]):
    if v <= target:
      return r
  return None
