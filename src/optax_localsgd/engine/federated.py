"""A federated round (paper appendix E.6): K of N clients, each on its own shard of the data.

:func:`make_federated_round_fn` returns ``round_fn(params, state, key, data) -> (params,
state, metrics)``, a pure, jittable function like :func:`~optax_localsgd.engine.make_round_fn`:

1. ``key`` picks K of the N clients uniformly without replacement
   (``jax.random.choice(..., replace=False)``); ``metrics["clients"]`` names them, in slot
   order.
2. Each sampled client starts from the global weights and runs its local steps on its own
   shard, drawing minibatches of B examples epoch by epoch (a fresh random order every epoch;
   a last partial epoch is a random subset).
3. The server transform sees the uniform mean of the K deltas ``W_old - W_client`` (Reddi et
   al. 2020's FedOpt; McMahan et al.'s FedAvg weights by client size instead), or with
   ``per_worker_deltas`` their ``(K, ...)`` stack in slot order (LAgg-A).

Local steps. The paper runs ``H = E * n_client / B`` steps per client. Client shards differ in
size, and ``jit`` needs one static loop length, so every client runs a ``lax.scan`` of
``cfg.local_steps`` steps and, with ``cfg.local_epochs = E``, only its first
``H_i = clip(ceil(E * n_i / B), 1, local_steps)`` steps change anything (the rest are masked:
computed, then discarded). That is the paper's per-client count (the last batch of an epoch
is topped up from the next epoch rather than dropped or shortened), at the cost of
``local_steps`` steps of compute for every client; :func:`federated_config` sets
``local_steps`` to the largest client's ``H_i``. With ``local_epochs=None`` every client runs
exactly ``local_steps`` steps, cheaper when the sizes are very uneven (e.g. ``H`` from the mean
client size), but then small clients make several passes and large ones less than one.

Client state. A *client hook* (:class:`ClientHook`, e.g. SCAFFOLD's
:class:`~optax_localsgd.transforms.scaffold.ScaffoldClient`) keeps a state per client, across
rounds, and a server-side state; it adds a correction to every local gradient and updates both
states from the clients' deltas. The N client states live in :class:`FederatedState`.

With a mesh, the K sampled clients are spread along its ``"workers"`` axis as in
:func:`~optax_localsgd.engine.make_round_fn`; both placements draw the same clients and
minibatches, so they agree up to float summation order.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from optax_localsgd import data as _data
from optax_localsgd.engine.batches import BatchFn
from optax_localsgd.engine.round import WORKER_AXIS, LossFn, check_worker_mesh
from optax_localsgd.errors import UsageError


@dataclasses.dataclass(frozen=True)
class FederatedConfig:
  """Static shape of a federated round.

  Attributes:
    num_clients: N, the client population.
    clients_per_round: K, clients sampled (without replacement) every round, ``K <= N``.
    batch_size: B_loc, examples per local step.
    local_steps: the length of every client's loop of local steps: exactly H, or with
      ``local_epochs`` the most steps any client takes.
    local_epochs: E: client i takes ``clip(ceil(E * n_i / B), 1, local_steps)`` steps;
      ``None``: every client takes ``local_steps``.
    per_worker_deltas: give the server the ``(K, ...)`` stack of client deltas (LAgg-A).
  """
  num_clients: int
  clients_per_round: int
  batch_size: int
  local_steps: int
  local_epochs: float | None = None
  per_worker_deltas: bool = False

  def __post_init__(self):
    for f in ("num_clients", "clients_per_round", "batch_size", "local_steps"):
      v = getattr(self, f)
      if not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"FederatedConfig.{f} must be an integer >= 1, got {v!r}.")
    if self.clients_per_round > self.num_clients:
      raise ValueError(f"FederatedConfig: cannot sample clients_per_round="
                       f"{self.clients_per_round} of num_clients={self.num_clients} without "
                       f"replacement.")
    if self.local_epochs is not None and not (math.isfinite(self.local_epochs)
                                              and self.local_epochs > 0):
      raise ValueError(f"FederatedConfig.local_epochs must be > 0 or None, got "
                       f"{self.local_epochs!r}.")

  def steps(self, sizes: jax.Array) -> jax.Array:
    """int32 local steps of clients with ``sizes`` examples (works on host or device)."""
    sizes = jnp.asarray(sizes)
    if self.local_epochs is None:
      return jnp.full(sizes.shape, self.local_steps, jnp.int32)
    h = jnp.ceil(self.local_epochs * sizes.astype(jnp.float32) / self.batch_size)
    return jnp.clip(h, 1, self.local_steps).astype(jnp.int32)


def federated_config(sizes: Sequence[int], clients_per_round: int, batch_size: int,
                     local_epochs: float = 1.0, per_worker_deltas: bool = False
                     ) -> FederatedConfig:
  """The config whose loop fits the largest client: ``local_steps = max ceil(E * n_i / B)``.

  ``sizes`` are the clients' example counts (``ClientData.sizes``, or ``len`` of each
  partition entry). The paper's FMNIST setting is ``clients_per_round=10, batch_size=20,
  local_epochs=1`` over 400 clients.
  """
  sizes = np.asarray(sizes, np.float64)
  h = int(np.max(np.ceil(float(local_epochs) * sizes / batch_size))) if sizes.size else 1
  return FederatedConfig(len(sizes), int(clients_per_round), int(batch_size), max(h, 1),
                         float(local_epochs), per_worker_deltas)


class ClientData(NamedTuple):
  """A dataset split among N clients of different sizes, resident on the device(s).

  Attributes:
    arrays: the dataset's arrays (``{"x", "y"}``), replicated.
    shards: ``(N, S_max)`` int32: client i's examples are ``shards[i, :sizes[i]]``; the rest of
      the row repeats valid indices and is never drawn.
    sizes: ``(N,)`` int32, every client's example count, ``>= 1``.
  """
  arrays: Any
  shards: jax.Array
  sizes: jax.Array


def client_data(arrays: Any, partition: Sequence[np.ndarray]) -> ClientData:
  """Pad a partition (one index array per client, e.g. ``data.dirichlet_partition``'s) into a
  :class:`ClientData` (host NumPy arrays; the round function moves them to the device).

  Raises:
    ValueError: a client has no example (it could not train: partition with ``min_size >= 1``),
      or there is no client.
  """
  sizes = np.array([len(p) for p in partition], np.int64)
  if sizes.size == 0:
    raise ValueError("The partition has no client.")
  if sizes.min() < 1:
    empty = np.flatnonzero(sizes < 1)
    raise ValueError(f"{empty.size} client(s) hold no example (e.g. client {int(empty[0])}); a "
                     f"client needs data to train. Partition with min_size >= 1 (the default "
                     f"of data.dirichlet_partition), or drop the empty clients.")
  shards = np.stack([np.resize(np.asarray(p, np.int32), sizes.max()) for p in partition])
  return ClientData(arrays, shards, sizes.astype(np.int32))


def dirichlet_client_data(task, arrays: Any, num_clients: int, alpha: float,
                          seed: int) -> ClientData:
  """:func:`client_data` of ``data.dirichlet_partition(arrays["y"], num_clients, alpha, seed)``:
  ``task``'s split cut among ``num_clients`` clients with Dirichlet(``alpha``) label skew.

  Raises:
    UsageError: ``task`` is not a classification task (the split is by label), or the split
      cannot be cut (e.g. more clients than examples).
  """
  if task.kind != "classification":
    raise UsageError(f"Federated training splits the data by label: {task.name} is a "
                     f"{task.kind} task, not a classification one.")
  try:
    parts = _data.dirichlet_partition(np.asarray(arrays["y"]), num_clients, alpha, seed)
  except ValueError as e:  # e.g. more clients than examples
    raise UsageError(f"Cannot partition {task.name}'s training split: {e}") from None
  return client_data(arrays, parts)


class ClientHook(Protocol):
  """What a federated algorithm does on the clients (SCAFFOLD's control variates, ...).

  All methods are pure functions of pytrees; the engine vmaps the per-client ones over the
  sampled clients.
  """

  def init(self, params: Any, num_clients: int) -> tuple[Any, Any]:
    """``(client states stacked on a leading axis of N, the server-side state)``."""

  def correction(self, client_state: Any, server_state: Any) -> Any:
    """A params-like tree added to every local gradient of this client this round."""

  def client_update(self, client_state: Any, server_state: Any, delta: Any,
                    steps: jax.Array) -> Any:
    """The client's new state from its delta ``W_old - W_client`` after ``steps`` steps."""

  def server_update(self, server_state: Any, old: Any, new: Any, num_clients: int) -> Any:
    """The new server-side state from the sampled clients' ``(K, ...)`` old and new states."""


class FederatedState(NamedTuple):
  """The state a federated round carries across rounds.

  Attributes:
    server: the server transform's state.
    clients: the N clients' hook states, stacked (client i's is ``[i]``); ``()`` without a hook.
    hook: the hook's server-side state (SCAFFOLD's ``c``); ``()`` without a hook.
  """
  server: Any
  clients: Any
  hook: Any


def init_federated_state(server_tx: optax.GradientTransformation, cfg: FederatedConfig,
                         params: Any, client_hook: ClientHook | None = None) -> FederatedState:
  """The state :func:`make_federated_round_fn`'s round function starts from."""
  if client_hook is None:
    return FederatedState(server_tx.init(params), (), ())
  clients, hook = client_hook.init(params, cfg.num_clients)
  return FederatedState(server_tx.init(params), clients, hook)


def _epoch_indices(key: jax.Array, shard: jax.Array, size: jax.Array, n: int) -> jax.Array:
  """``n`` draws from ``shard[:size]`` (``size`` traced), epoch after epoch, each epoch in a
  fresh random order and a partial last epoch a random subset."""
  k_perm, k_order = jax.random.split(key)
  pos = jnp.arange(shard.shape[0])
  # A random order of the valid positions: the padding sorts last.
  perm = jnp.argsort(jnp.where(pos < size, jax.random.uniform(k_perm, pos.shape), 2.0))
  slot = jnp.arange(n)
  # Slots sorted by epoch, randomly within one; the m-th of them gets offset m % size, so
  # every full epoch's slots hold each offset once, in a random order. No static bound on
  # the number of epochs is needed, which matters for tiny clients.
  order = jnp.lexsort((jax.random.uniform(k_order, (n,)), slot // size))
  offsets = jnp.zeros(n, jnp.int32).at[order].set((slot % size).astype(jnp.int32))
  return shard[perm[offsets]]


def _client_fn(loss_fn: LossFn, batch_fn: BatchFn, worker_tx: optax.GradientTransformation,
               cfg: FederatedConfig, hook: ClientHook | None, arrays) -> Callable:
  """One client's round: ``(params, key, shard, size, client state, hook state) -> (delta,
  mean loss over its active steps, new client state)``."""
  n_draws = cfg.local_steps * cfg.batch_size

  def client(params, key, shard, size, cstate, hstate):
    steps = cfg.steps(size)
    idx = _epoch_indices(key, shard, size, n_draws).reshape(cfg.local_steps, cfg.batch_size)
    corr = None if hook is None else hook.correction(cstate, hstate)

    def step(carry, xs):
      p, s = carry
      h, idx_h = xs
      loss, g = jax.value_and_grad(loss_fn)(p, batch_fn(arrays, idx_h))
      if corr is not None:
        g = jax.tree.map(lambda a, b: a + b.astype(a.dtype), g, corr)
      u, s_new = worker_tx.update(g, s, p)
      active = h < steps
      keep = lambda new, old: jnp.where(active, new, old)
      p_new = optax.apply_updates(p, u)
      return (jax.tree.map(keep, p_new, p), jax.tree.map(keep, s_new, s)), \
          jnp.where(active, loss, 0.0)

    (p_end, _), losses = jax.lax.scan(step, (params, worker_tx.init(params)),
                                      (jnp.arange(cfg.local_steps), idx))
    delta = jax.tree.map(lambda old, new: old - new, params, p_end)
    new_c = () if hook is None else hook.client_update(cstate, hstate, delta, steps)
    return delta, jnp.sum(losses) / steps, new_c

  return client


def make_federated_round_fn(loss_fn: LossFn, batch_fn: BatchFn,
                            worker_tx: optax.GradientTransformation,
                            server_tx: optax.GradientTransformation, cfg: FederatedConfig,
                            mesh: Mesh | None = None,
                            client_hook: ClientHook | None = None) -> Callable:
  """Build one federated round (see the module docstring).

  Args:
    loss_fn, batch_fn, worker_tx, server_tx: as for :func:`~optax_localsgd.engine.make_round_fn`
      (the clients' optimizer state is fresh every round).
    cfg: N, K, B, the local steps and epochs.
    mesh: ``None`` to vmap the K clients on one device; or a mesh with a ``"workers"`` axis
      whose size divides K.
    client_hook: per-client state and gradient correction (e.g. SCAFFOLD); ``None``: plain
      local SGD on the clients.

  Returns:
    ``round_fn(params, state, key, data) -> (params, state, metrics)`` of a
    :class:`FederatedState` (from :func:`init_federated_state`) and a :class:`ClientData`;
    ``metrics["train_loss"]`` is the mean over the sampled clients of their mean local loss,
    ``metrics["clients"]`` the ``(K,)`` int32 sampled client ids.
  """
  k, n = cfg.clients_per_round, cfg.num_clients
  check_worker_mesh(mesh, k, "sampled clients")

  def run_clients(arrays, params, keys, shards, sizes, cstates, hstate):
    def local(arrays, params, keys, shards, sizes, cstates, hstate):
      c = _client_fn(loss_fn, batch_fn, worker_tx, cfg, client_hook, arrays)
      return jax.vmap(c, in_axes=(None, 0, 0, 0, 0, None))(params, keys, shards, sizes,
                                                           cstates, hstate)

    if mesh is None:
      deltas, losses, new_c = local(arrays, params, keys, shards, sizes, cstates, hstate)
      server_in = deltas if cfg.per_worker_deltas else jax.tree.map(
          lambda d: jnp.mean(d, axis=0), deltas)
      return server_in, jnp.mean(losses), new_c

    def block(arrays, params, keys, shards, sizes, cstates, hstate):
      # As in engine.round: device-varying params keep autodiff from summing gradients
      # across devices.
      params = jax.tree.map(lambda x: jax.lax.pcast(x, WORKER_AXIS, to="varying"), params)
      deltas, losses, new_c = local(arrays, params, keys, shards, sizes, cstates, hstate)
      loss = jax.lax.psum(jnp.sum(losses), WORKER_AXIS) / k
      if cfg.per_worker_deltas:
        return deltas, loss, new_c
      return jax.tree.map(lambda d: jax.lax.psum(jnp.sum(d, axis=0), WORKER_AXIS) / k,
                          deltas), loss, new_c

    w = P(WORKER_AXIS)
    return jax.shard_map(
        block, mesh=mesh, in_specs=(P(), P(), w, w, w, w, P()),
        out_specs=(w if cfg.per_worker_deltas else P(), P(), w))(
            arrays, params, keys, shards, sizes, cstates, hstate)

  def round_fn(params, state: FederatedState, key, data: ClientData):
    if not isinstance(state, FederatedState):
      raise ValueError("state must be a FederatedState, from "
                       "engine.init_federated_state(server_tx, cfg, params, client_hook).")
    if not isinstance(data, ClientData):
      raise ValueError("data must be a ClientData, from engine.client_data(arrays, partition).")
    data = jax.tree.map(jnp.asarray, data)  # host (numpy) data works too, outside jit.
    if data.shards.shape[0] != n or data.sizes.shape != (n,):
      raise ValueError(f"data holds {data.shards.shape[0]} clients; cfg.num_clients={n}.")
    has_clients = bool(jax.tree.leaves(state.clients))
    if has_clients != (client_hook is not None):
      raise ValueError("state.clients does not match client_hook: build the state with "
                       "init_federated_state(..., client_hook) using the same hook.")
    for x in jax.tree.leaves(state.clients):
      if jnp.ndim(x) < 1 or jnp.shape(x)[0] != n:
        raise ValueError(f"FederatedState.clients must stack N={n} client states; a leaf has "
                         f"shape {jnp.shape(x)}.")
    k_sample, k_clients = jax.random.split(key)
    ids = jax.random.choice(k_sample, n, (k,), replace=False).astype(jnp.int32)
    cstates = jax.tree.map(lambda x: x[ids], state.clients)
    server_in, train_loss, new_c = run_clients(
        data.arrays, params, jax.random.split(k_clients, k), data.shards[ids], data.sizes[ids],
        cstates, state.hook)
    updates, sstate = server_tx.update(server_in, state.server, params)
    clients, hook = state.clients, state.hook
    if client_hook is not None:
      hook = client_hook.server_update(state.hook, cstates, new_c, n)
      clients = jax.tree.map(lambda a, b: a.at[ids].set(b), state.clients, new_c)
    return (optax.apply_updates(params, updates), FederatedState(sstate, clients, hook),
            {"train_loss": train_loss, "clients": ids})

  return round_fn
