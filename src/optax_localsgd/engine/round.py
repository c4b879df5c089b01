"""One communication round of local SGD (paper Algorithm 1) as a pure, jittable function.

:func:`make_round_fn` returns ``round_fn(params, server_state, key, data) -> (params,
server_state, metrics)``. It is a pure function of pytrees, so a user jits it, and the
meta-trainer can ``lax.scan`` it over many rounds and ``vmap`` it over particles (building the
server transform from perturbed meta-parameters inside the vmapped function).

Workers run either vmapped on one device, or, given a ``jax.sharding.Mesh`` with a ``"workers"``
axis, placed along that axis with ``shard_map``: each device runs its block of workers, the mean
delta is an explicit ``psum``, and LAgg-A's per-worker stack is gathered for the server step. The same program
runs under ``jax.distributed`` with several processes. Both placements draw the same minibatches
(worker k always uses ``split(key, K)[k]``), so they agree up to float summation order.

With ``RoundConfig(compression=...)`` every worker compresses its delta before it is sent
(:mod:`optax_localsgd.compression`) and the server sees the mean (or the stack) of the
compressed deltas. Each worker's compressor state (e.g. its error-feedback residual) persists
across rounds inside the round state, a :class:`CompressedState` built by
:func:`init_round_state`; on a mesh it stays sharded with the workers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from optax_localsgd.compression import Compression, round_bits
from optax_localsgd.engine import zero
from optax_localsgd.engine.batches import BatchFn, sample_indices
from optax_localsgd.errors import UsageError

WORKER_AXIS = "workers"
LossFn = Callable[[Any, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class RoundConfig:
  """Static shape of a round.

  Attributes:
    num_workers: K.
    local_steps: H, local optimizer steps per worker per round.
    batch_size: B_loc, examples per worker per local step.
    per_worker_deltas: give the server the ``(K, ...)`` stack of worker deltas (LAgg-A)
      instead of their mean.
    compression: what every worker does to its delta before sending it
      (``compression.TopK(0.01)``, ``compression.Quantize(4)``, ...); ``None``: send it
      uncompressed. With compression, the round state is :func:`init_round_state`'s.
  """
  num_workers: int
  local_steps: int
  batch_size: int
  per_worker_deltas: bool = False
  compression: Compression | None = None

  def __post_init__(self):
    for f in ("num_workers", "local_steps", "batch_size"):
      v = getattr(self, f)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"RoundConfig.{f} must be an integer >= 1, got {v!r}.")
    if self.compression is not None and not isinstance(self.compression, Compression):
      raise ValueError(f"RoundConfig.compression must be an optax_localsgd.compression."
                       f"Compression (e.g. compression.TopK(0.01)) or None, got "
                       f"{self.compression!r}.")


class CompressedState(NamedTuple):
  """The round state when the workers compress their deltas.

  Attributes:
    server: the server transform's state.
    workers: the K workers' compressor states, stacked on axis 0 (worker k's is ``[k]``),
      e.g. their error-feedback residuals.
  """
  server: Any
  workers: Any


def init_round_state(server_tx: optax.GradientTransformation, cfg: RoundConfig,
                     params: Any, mesh: Mesh | None = None, shard_server: bool = False) -> Any:
  """The state :func:`make_round_fn`'s round function starts from.

  Returns ``server_tx.init(params)`` without compression, else a :class:`CompressedState`
  holding it and ``cfg.compression.init_workers(params, K)``. With ``shard_server`` (and the
  ``mesh`` of the round), the server part is a :class:`~optax_localsgd.engine.zero.
  ShardedServerState`: each device's state of its slices of ``params``.
  """
  if shard_server:
    _check_shard_server(mesh)
    server = zero.init_sharded_server_state(server_tx, params, mesh, WORKER_AXIS)
  else:
    server = server_tx.init(params)
  if cfg.compression is None:
    return server
  return CompressedState(server, cfg.compression.init_workers(params, cfg.num_workers))


def _check_shard_server(mesh: Mesh | None) -> None:
  if mesh is None:
    raise ValueError("shard_server=True shards the server step over the devices of a mesh: "
                     "pass mesh=engine.worker_mesh().")


class DeviceData(NamedTuple):
  """A dataset resident on the device(s), split across workers.

  Attributes:
    arrays: the dataset's arrays (e.g. ``{"x": uint8 images, "y": labels}``), replicated.
    shards: ``(K, S)`` int32: worker k draws its examples from ``arrays[...][shards[k]]``
      (or, for a language model, its window offsets).
  """
  arrays: Any
  shards: jax.Array


def _worker_fn(loss_fn: LossFn, batch_fn: BatchFn, worker_tx: optax.GradientTransformation,
               cfg: RoundConfig, arrays) -> Callable:
  """H local steps of one worker: ``(params, key, shard) -> (delta, mean local loss)``."""

  def worker(params, key, shard):
    idx = sample_indices(key, shard, cfg.local_steps * cfg.batch_size)
    idx = idx.reshape(cfg.local_steps, cfg.batch_size)

    def step(carry, idx_h):
      p, s = carry
      loss, g = jax.value_and_grad(loss_fn)(p, batch_fn(arrays, idx_h))
      u, s = worker_tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), loss

    # Workers start every round from the global weights with a fresh optimizer state.
    (p_end, _), losses = jax.lax.scan(step, (params, worker_tx.init(params)), idx)
    delta = jax.tree.map(lambda old, new: old - new, params, p_end)
    return delta, jnp.mean(losses)

  return worker


def _mean0(tree):
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)



def check_worker_mesh(mesh: Mesh | None, k: int, what: str) -> None:
  """Errors unless ``mesh`` (if any) has a workers axis that splits ``k`` ``what`` evenly."""
  if mesh is None:
    return
  if WORKER_AXIS not in mesh.axis_names:
    raise ValueError(f"The mesh needs an axis named {WORKER_AXIS!r}; it has {mesh.axis_names}.")
  if k % mesh.shape[WORKER_AXIS]:
    raise UsageError(f"K={k} {what} cannot be split evenly over the mesh's "
                     f"{mesh.shape[WORKER_AXIS]} devices along {WORKER_AXIS!r}.")

def make_round_fn(loss_fn: LossFn, batch_fn: BatchFn, worker_tx: optax.GradientTransformation,
                  server_tx: optax.GradientTransformation, cfg: RoundConfig,
                  mesh: Mesh | None = None, shard_server: bool = False) -> Callable:
  """Build one local-SGD communication round.

  Args:
    loss_fn: ``loss(params, batch) -> scalar``, the training loss.
    batch_fn: ``batch(arrays, idx) -> batch`` turning sampled indices into a batch.
    worker_tx: the workers' optimizer (e.g. ``optax.sgd(0.3)``); its state is re-initialised
      every round.
    server_tx: the server transform (``local_sgd``, ``slowmo``, ``lopt_a``, ``lagg_a``, or any
      optax transform of the mean delta).
    cfg: K, H, B and whether the server reads per-worker deltas.
    mesh: ``None`` to vmap all workers on one device; or a mesh with a ``"workers"`` axis
      whose size divides K, to spread the workers over its devices.
    shard_server: with a ``mesh``, shard the server step and its state over the devices
      (ZeRO-1, :mod:`optax_localsgd.engine.zero`) instead of running it replicated: for an
      elementwise server transform (``local_sgd``, ``slowmo``, DiLoCo's Nesterov step, Adam,
      ...), ``lopt_a`` and ``lagg_a``. The state comes from ``init_round_state(..., mesh,
      shard_server=True)``.

  Returns:
    A function ``round_fn(params, server_state, key, data) -> (params, server_state, metrics)``
    of a :class:`DeviceData` ``data``, with ``metrics["train_loss"]`` the mean local training
    loss over workers and local steps (paper eq. 3, the meta-objective) and
    ``metrics["bits"]`` the bits the K workers sent this round (float32; the exact integer is
    ``compression.round_bits(cfg.compression, params, K)``). With ``cfg.compression``,
    ``server_state`` is a :class:`CompressedState` (start from :func:`init_round_state`).

  Examples:
    Linear regression with K = 4 workers, H = 4 local SGD steps of B = 8 examples, and
    plain averaging on the server:

    >>> import jax, jax.numpy as jnp, numpy as np, optax
    >>> from optax_localsgd import engine, local_sgd
    >>> from optax_localsgd.data import split_homogeneous
    >>> x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    >>> y = x @ np.array([1.0, -2.0, 0.5], np.float32)
    >>> data = engine.DeviceData({"x": x, "y": y}, split_homogeneous(64, 4, seed=0))
    >>> loss = lambda p, batch: jnp.mean((batch["x"] @ p["w"] - batch["y"]) ** 2)
    >>> server = local_sgd()
    >>> round_fn = jax.jit(engine.make_round_fn(
    ...     loss, engine.classification_batch, optax.sgd(0.1), server,
    ...     engine.RoundConfig(num_workers=4, local_steps=4, batch_size=8)))
    >>> params = {"w": jnp.zeros(3)}
    >>> state = server.init(params)
    >>> for r in range(50):
    ...   params, state, metrics = round_fn(params, state, jax.random.PRNGKey(r), data)
    >>> [round(float(w), 2) for w in params["w"]]
    [1.0, -2.0, 0.5]
    >>> bool(metrics["train_loss"] < 1e-6)
    True
  """
  k = cfg.num_workers
  check_worker_mesh(mesh, k, "workers")
  if shard_server:
    _check_shard_server(mesh)

  compressor = None if cfg.compression is None else cfg.compression.transform()

  def compress(deltas, wstates):
    """Each worker's delta through its own compressor state (a no-op without compression)."""
    if compressor is None:
      return deltas, wstates
    return jax.vmap(lambda d, s: compressor.update(d, s))(deltas, wstates)

  def device_workers(params, keys, shards, arrays, wstates):
    """Inside ``shard_map``: this device's block of workers; their (compressed) deltas, the
    mean local loss over all K workers, their compressor states."""
    # Each device's workers train their own copy of the weights. Marking the replicated
    # params as device-varying keeps autodiff from summing gradients across devices (the
    # transpose of an implicit replicated->varying cast is a psum).
    params = jax.tree.map(lambda x: jax.lax.pcast(x, WORKER_AXIS, to="varying"), params)
    w = _worker_fn(loss_fn, batch_fn, worker_tx, cfg, arrays)
    deltas, losses = jax.vmap(w, in_axes=(None, 0, 0))(params, keys, shards)
    # Compressed on the worker's own device, before anything crosses devices; the
    # compressor states never leave their workers' devices.
    deltas, wstates = compress(deltas, wstates)
    return deltas, jax.lax.psum(jnp.sum(losses), WORKER_AXIS) / k, wstates

  def workers(params, keys, data, wstates):
    worker = _worker_fn(loss_fn, batch_fn, worker_tx, cfg, data.arrays)
    if mesh is None:
      deltas, losses = jax.vmap(worker, in_axes=(None, 0, 0))(params, keys, data.shards)
      deltas, wstates = compress(deltas, wstates)
      server_in = deltas if cfg.per_worker_deltas else _mean0(deltas)
      return server_in, jnp.mean(losses), wstates

    def block(params, keys, shards, arrays, wstates):
      deltas, loss, wstates = device_workers(params, keys, shards, arrays, wstates)
      if cfg.per_worker_deltas:
        return deltas, loss, wstates  # this device's block of the (K, ...) stack; gathered below.
      return jax.tree.map(
          lambda d: jax.lax.psum(jnp.sum(d, axis=0), WORKER_AXIS) / k, deltas), loss, wstates

    # LAgg-A: the stack leaves shard_map sharded over "workers" and the (replicated) server
    # step consumes it whole, so XLA all-gathers the K deltas, in worker order.
    delta_spec = P(WORKER_AXIS) if cfg.per_worker_deltas else P()
    return jax.shard_map(
        block, mesh=mesh,
        in_specs=(P(), P(WORKER_AXIS), P(WORKER_AXIS), P(), P(WORKER_AXIS)),
        out_specs=(delta_spec, P(), P(WORKER_AXIS)))(
            params, keys, data.shards, data.arrays, wstates)

  def workers_and_sharded_server(params, keys, data, wstates, per_device):
    """The ZeRO-1 round on the mesh: workers, reduce-scatter, each device's server step on
    its slices; returns the update slices (gathered by their sharding), loss and states."""
    n = mesh.shape[WORKER_AXIS]
    update = zero.sharded_update(server_tx, n, WORKER_AXIS)

    def block(params, keys, shards, arrays, wstates, per_device):
      deltas, loss, wstates = device_workers(params, keys, shards, arrays, wstates)
      if cfg.per_worker_deltas:
        server_in = zero.scatter_stack(deltas, n, WORKER_AXIS)
      else:
        local_sum = jax.tree.map(lambda d: jnp.sum(d, axis=0), deltas)
        server_in = zero.scatter_mean(local_sum, n, WORKER_AXIS, k)
      upd, per_device = update(server_in, per_device, params)
      return upd, loss, wstates, per_device

    w = P(WORKER_AXIS)
    return jax.shard_map(block, mesh=mesh, in_specs=(P(), w, w, P(), w, w),
                         out_specs=(w, P(), w, w))(
                             params, keys, data.shards, data.arrays, wstates, per_device)

  def split_state(state):
    """``(server state, stacked worker compressor states)``; ``()`` for the latter without
    compression. Checked at trace time, so a mix-up is a clear error, not a shape error."""
    server = state.server if isinstance(state, CompressedState) else state
    if shard_server and not isinstance(server, zero.ShardedServerState):
      raise ValueError("shard_server=True needs the state of engine.init_round_state(server_tx, "
                       "cfg, params, mesh, shard_server=True).")
    if cfg.compression is None:
      if isinstance(state, CompressedState):
        raise ValueError("server_state is a CompressedState, but RoundConfig.compression is "
                         "None: pass server_tx.init(params).")
      return state, ()
    if not isinstance(state, CompressedState):
      raise ValueError("RoundConfig.compression is set: server_state must be a "
                       "CompressedState, from engine.init_round_state(server_tx, cfg, params).")
    for x in jax.tree.leaves(state.workers):
      if jnp.ndim(x) < 1 or jnp.shape(x)[0] != k:
        raise ValueError(f"CompressedState.workers must hold K={k} stacked worker states "
                         f"(leading axis {k}); a leaf has shape {jnp.shape(x)}.")
    return state.server, state.workers

  def round_fn(params, server_state, key, data: DeviceData):
    data = jax.tree.map(jnp.asarray, data)  # host (numpy) data works too, outside jit.
    if data.shards.shape[0] != k:
      raise ValueError(f"data.shards has {data.shards.shape[0]} worker shards; K={k}.")
    sstate, wstates = split_state(server_state)
    keys = jax.random.split(key, k)
    if shard_server:
      upd, train_loss, wstates, per_device = workers_and_sharded_server(
          params, keys, data, wstates, sstate.per_device)
      new_params, sstate = zero.assemble(upd, params, mesh), zero.ShardedServerState(per_device)
    else:
      server_in, train_loss, wstates = workers(params, keys, data, wstates)
      updates, sstate = server_tx.update(server_in, sstate, params)
      new_params = optax.apply_updates(params, updates)
    # A static count (shapes only); float32 because an int32 overflows for big models.
    bits = jnp.float32(round_bits(cfg.compression, params, k))
    new_state = sstate if cfg.compression is None else CompressedState(sstate, wstates)
    return new_params, new_state, {"train_loss": train_loss, "bits": bits}

  return round_fn


def make_data_parallel_round_fn(loss_fn: LossFn, batch_fn: BatchFn,
                                tx: optax.GradientTransformation,
                                cfg: RoundConfig) -> Callable:
  """The paper's non-local baselines (section 5.1.4): one step per round on K·H·B examples.

  Same signature as :func:`make_round_fn`'s result; ``server_state`` is ``tx``'s state.
  ``metrics["train_loss"]`` is the loss on the step's batch (before the step).
  """
  if cfg.compression is not None:
    raise ValueError("RoundConfig.compression applies to local SGD's worker deltas; the "
                     "data-parallel baselines send no deltas to compress.")
  n = cfg.num_workers * cfg.local_steps * cfg.batch_size

  def round_fn(params, opt_state, key, data: DeviceData):
    idx = sample_indices(key, data.shards.reshape(-1), n)
    loss, g = jax.value_and_grad(loss_fn)(params, batch_fn(data.arrays, idx))
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"train_loss": loss}

  return round_fn


def make_multi_round_fn(round_fn: Callable) -> Callable:
  """Many rounds in one program: ``(params, state, key, first_round, rounds, data) ->
  (params, state, per-round mean local losses)``, to ``jax.jit``.

  ``rounds`` is an int array (``jnp.arange(n)``); round ``first_round + i`` uses
  ``fold_in(key, first_round + i)``, so a run cut into chunks, or stopped and resumed, gives
  the same numbers as one long call.
  """
  def run(params, state, key, first_round, rounds, data):
    def body(carry, i):
      p, s = carry
      p, s, m = round_fn(p, s, jax.random.fold_in(key, first_round + i), data)
      return (p, s), m["train_loss"]
    (params, state), losses = jax.lax.scan(body, (params, state), rounds)
    return params, state, losses
  return run


def worker_mesh(devices=None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all devices of all processes), axis ``"workers"``."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices, dtype=object), (WORKER_AXIS,))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Place host arrays on every device of ``mesh``.

  Works with several processes too, where every process passes the same host data. A
  :class:`~optax_localsgd.engine.zero.ShardedServerState` in ``tree`` is left as it is: it
  holds one slice per device, not a copy for every device.
  """
  sharding = NamedSharding(mesh, P())
  sharded = lambda x: isinstance(x, zero.ShardedServerState)

  def put(x):
    if sharded(x):
      return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree.map(put, tree, is_leaf=sharded)
