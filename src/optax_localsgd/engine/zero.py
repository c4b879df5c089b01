"""The server step sharded over the workers' devices (the ZeRO-1 pattern).

With ``make_round_fn(..., mesh=mesh, shard_server=True)`` no device holds the server state of
the whole model or computes the whole server step. Each of the N devices along ``"workers"``
owns one slice of every parameter tensor: the tensor is flattened, padded with zeros to a
multiple of N entries and cut into N equal slices, slice ``i`` on device ``i``. A round then

1. sums each device's workers' deltas and **reduce-scatters** the sum, so that device ``i``
   receives slice ``i`` of the mean delta (one ``psum_scatter``, the same bytes on the wire as
   half an all-reduce); for LAgg-A, which reads every worker's delta, an **all-to-all** instead
   gives device ``i`` slice ``i`` of each of the K deltas;
2. runs the server transform on its slices alone: ``server_tx.update(delta_slices, state_i,
   param_slices)``, with ``state_i`` its own, built by ``server_tx.init(param_slices)``;
3. **all-gathers** the updated slices into the new weights, replicated on every device.

The server state is a :class:`ShardedServerState`: every leaf is the N devices' states stacked
on a leading axis and sharded along ``"workers"``, so its memory per device is divided by N.

The transform sees each slice as an :class:`optax_localsgd.sharding.ShardSlice` node (the
``(L,)`` slice plus the whole tensor's shape). An **elementwise** server transform, one where a
parameter's update depends on its own delta, state and value (``local_sgd``, ``slowmo``,
``optax.sgd`` with momentum or Nesterov, Adam, chains of these), runs on the slices unchanged.
``lopt_a`` and ``lagg_a`` recognise the nodes and combine their tensor-wide statistics (the
factored second moments and the feature normalisers) over the devices with ``psum``, so they
too compute the replicated step (``transforms/learned/sharded.py``). A transform that reduces over a tensor or the model without knowing of the
nodes (``optax.clip_by_global_norm``) would see one slice: do not shard it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from optax_localsgd.sharding import ShardSlice, is_shard_slice, slice_length


class ShardedServerState(NamedTuple):
  """The server state of a sharded server step.

  Attributes:
    per_device: ``server_tx.init`` of each device's parameter slices, stacked on axis 0
      (device ``i``'s state is ``[i]``) and sharded over the ``"workers"`` axis.
  """
  per_device: Any


def _flat_padded(x: jax.Array, num_devices: int) -> jax.Array:
  """``x`` flattened and zero-padded to ``N * L`` entries, ``L = ceil(x.size / N)``."""
  return jnp.pad(x.reshape(-1), (0, slice_length(x.size, num_devices) * num_devices - x.size))


def local_slices(tree: Any, num_devices: int, axis_name: str) -> Any:
  """Inside ``shard_map``: this device's slice of every leaf (flattened, zero-padded to
  ``N * slice_length`` entries, slice ``axis_index``), as :class:`ShardSlice` nodes."""
  idx = jax.lax.axis_index(axis_name)

  def one(x):
    length = slice_length(x.size, num_devices)
    return ShardSlice(jax.lax.dynamic_slice_in_dim(_flat_padded(x, num_devices), idx * length,
                                                   length), x.shape, num_devices, axis_name)

  return jax.tree.map(one, tree)


def scatter_mean(tree: Any, num_devices: int, axis_name: str, k: int) -> Any:
  """Inside ``shard_map``: sum ``tree`` (each device's sum of its workers' deltas) over the
  devices, divide by ``k``, and keep this device's slice of each leaf (a reduce-scatter), as
  :class:`ShardSlice` nodes."""

  def one(x):
    flat = _flat_padded(x, num_devices)
    return ShardSlice(jax.lax.psum_scatter(flat, axis_name, scatter_dimension=0, tiled=True) / k,
                      x.shape, num_devices, axis_name)

  return jax.tree.map(one, tree)


def scatter_stack(tree: Any, num_devices: int, axis_name: str) -> Any:
  """Inside ``shard_map``: from each device's block of worker deltas (leaves ``(K/N, ...)``),
  this device's slice of *every* worker's delta, ``(K, L)`` per leaf in worker order, as
  :class:`ShardSlice` nodes (one all-to-all; LAgg-A reads the K deltas of its slice)."""

  def one(x):
    local_k, length = x.shape[0], slice_length(x[0].size, num_devices)
    flat = jax.vmap(lambda w: _flat_padded(w, num_devices))(x)
    # Slice j of this device's workers goes to device j, which stacks what it receives in
    # device order: worker (device d, local i) lands at row d * K/N + i, its global index.
    out = jax.lax.all_to_all(flat.reshape(local_k, num_devices, length), axis_name,
                             split_axis=1, concat_axis=0, tiled=True)
    return ShardSlice(out.reshape(local_k * num_devices, length), x.shape[1:], num_devices,
                      axis_name)

  return jax.tree.map(one, tree)


def _as_block(state: Any) -> Any:
  """One device's state as its block of the stacked ``per_device`` (a leading axis of 1)."""
  return jax.tree.map(lambda x: jnp.asarray(x)[None], state)


def init_sharded_server_state(server_tx: optax.GradientTransformation, params: Any,
                              mesh: Mesh, axis_name: str) -> ShardedServerState:
  """Each device's ``server_tx.init`` of its slices of ``params``, stacked and sharded."""
  n = mesh.shape[axis_name]

  def init(p):
    return _as_block(server_tx.init(local_slices(p, n, axis_name)))

  per_device = jax.jit(jax.shard_map(init, mesh=mesh, in_specs=P(), out_specs=P(axis_name)))(
      params)
  return ShardedServerState(per_device)


def sharded_update(server_tx: optax.GradientTransformation, num_devices: int,
                   axis_name: str) -> Callable:
  """Inside ``shard_map``: ``(delta_slices, state, params) -> (update_slices, state)`` for
  one device, where ``state`` is this device's block of a :class:`ShardedServerState`'s
  ``per_device`` (leading axis 1) and ``params`` the replicated weights."""

  def update(delta_slices, state_block, params):
    state = jax.tree.map(lambda x: x[0], state_block)
    slices = local_slices(params, num_devices, axis_name)
    upd, state = server_tx.update(delta_slices, state, slices)
    upd = jax.tree.map(lambda u: u.data if is_shard_slice(u) else u, upd, is_leaf=is_shard_slice)
    return upd, _as_block(state)

  return update


def assemble(update_slices: Any, params: Any, mesh: Mesh) -> Any:
  """Outside ``shard_map``: the new weights from the gathered update slices (``(N * L,)`` per
  leaf, sharded), replicated on every device of ``mesh``."""

  updates = jax.tree.map(lambda u, p: u[:p.size].reshape(p.shape), update_slices, params)
  new = optax.apply_updates(params, updates)
  return jax.lax.with_sharding_constraint(new, NamedSharding(mesh, P()))
