"""One device's slice of a tensor, as the sharded server step hands it to a server transform.

With ``engine.make_round_fn(..., shard_server=True)`` (``engine/zero.py``) each of the N devices
along a mesh axis owns one slice of every parameter tensor: the tensor is flattened, padded
with zeros to ``N * L`` entries (``L = ceil(size / N)``), and device ``i`` holds entries
``[i * L, (i + 1) * L)``. The engine passes the params, the deltas and (through ``init``) the
state of a server transform as trees of :class:`ShardSlice` nodes.

A :class:`ShardSlice` is a pytree node with one child, the ``(L,)`` slice, so an elementwise
transform (``jax.tree.map`` over the leaves: SGD, momentum, Adam, SlowMo) runs on the slices
unchanged and returns the same structure. A transform that needs the whole tensor's shape or
reductions over it (the learned optimizers' factored statistics and feature normalisation)
recognises the nodes (``jax.tree.leaves(tree, is_leaf=is_shard_slice)``), reads ``shape`` and
combines its partial reductions over ``axis_name``.

This module imports nothing of the package, so the engine and the transforms (which never
import each other) can share it.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_pytree_node_class
class ShardSlice:
  """This device's slice of a flattened, zero-padded tensor.

  Attributes:
    data: the ``(L,)`` slice (or ``(C, L)``: C channels of it, e.g. LAgg-A's K worker deltas).
    shape: the whole tensor's shape.
    num_shards: N, the devices along ``axis_name``.
    axis_name: the mesh axis the tensor is sharded over (inside ``shard_map``).
  """

  def __init__(self, data: Any, shape: tuple[int, ...], num_shards: int, axis_name: str):
    self.data = data
    self.shape = tuple(int(s) for s in shape)
    self.num_shards = int(num_shards)
    self.axis_name = axis_name

  @property
  def size(self) -> int:
    """Entries of the whole tensor."""
    return math.prod(self.shape)

  @property
  def length(self) -> int:
    """L, entries per slice."""
    return slice_length(self.size, self.num_shards)

  def indices(self) -> jax.Array:
    """Flat (C-order) indices into the whole tensor of this slice's entries, ``(L,)`` int32;
    ``>= size`` for the padding. Only inside ``shard_map`` over ``axis_name``."""
    start = jax.lax.axis_index(self.axis_name) * self.length
    return start + jnp.arange(self.length, dtype=jnp.int32)

  def like(self, data: Any) -> "ShardSlice":
    """``data`` as a slice of the same tensor (same shape, shards and axis)."""
    return ShardSlice(data, self.shape, self.num_shards, self.axis_name)

  def tree_flatten(self):
    return (self.data,), (self.shape, self.num_shards, self.axis_name)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], *aux)

  def __repr__(self) -> str:
    return (f"ShardSlice(shape={self.shape}, num_shards={self.num_shards}, "
            f"axis_name={self.axis_name!r}, data={self.data!r})")


def is_shard_slice(x: Any) -> bool:
  """``is_leaf`` for trees of :class:`ShardSlice` nodes."""
  return isinstance(x, ShardSlice)


def slice_length(size: int, num_shards: int) -> int:
  """Entries of one device's slice of a tensor of ``size`` entries: ``ceil(size / N)``."""
  return max(1, math.ceil(size / num_shards))
