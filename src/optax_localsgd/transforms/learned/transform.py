"""Learned server optimizers LOpt-A and LAgg-A (Joseph et al., "Meta-learning Optimizers for
Communication-Efficient Learning", TMLR 2025, section 4 and appendix A).

Both keep Ada-feature accumulators of the averaged delta and apply a small per-parameter MLP
(:mod:`optax_localsgd.transforms.learned.mlp`) to the features of ``docs/features.md``.
LOpt-A reads the averaged delta; LAgg-A reads the stack of the K worker deltas and averages it
itself.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_localsgd.sharding import is_shard_slice
from optax_localsgd.transforms import _validation
from optax_localsgd.transforms.learned import blocked, features, sharded
from optax_localsgd.transforms.learned.params import MetaParams
from optax_localsgd.transforms.learned.mlp import LeafStep, check_mlp_dtype


class LearnedOptState(NamedTuple):
  """State of :func:`lopt_a` and :func:`lagg_a`.

  Attributes:
    count: rounds done (int32); the time features read it before it is incremented.
    accumulators: a pytree like params whose leaves are
      :class:`optax_localsgd.transforms.learned.features.AdaAccumulators` (float32).
  """
  count: jax.Array
  accumulators: Any


def _check_meta(meta_params, fn_name):
  if not isinstance(meta_params, MetaParams):
    raise ValueError(
        f"{fn_name} expects MetaParams (from init_{fn_name}(...) or a pretrained file), "
        f"got {type(meta_params).__name__}.")


def _learned(meta_params: MetaParams, num_workers: int | None, leaf_step: LeafStep | None,
             block_size: int | None, mlp_dtype: str | None
             ) -> optax.GradientTransformationExtraArgs:
  """The transform, running ``leaf_step`` on whole tensors: the blocked built-in step (with
  ``block_size`` and ``mlp_dtype``) unless the caller brings their own."""
  name = meta_params.config.kind
  custom_step = leaf_step is not None
  if custom_step:
    for arg, value in (("block_size", block_size), ("mlp_dtype", mlp_dtype)):
      if value is not None:
        raise ValueError(f"{name} got both leaf_step and {arg}; {arg} configures the "
                         f"built-in step, so pass only one of them.")
  block_size = blocked.check_block_size(block_size)
  dtype = check_mlp_dtype(mlp_dtype)  # also the sharded step's
  if not custom_step:
    leaf_step = functools.partial(blocked.blocked_leaf_step, block_size=block_size,
                                  mlp_dtype=dtype)

  def init_fn(params):
    init = lambda p: (sharded.init_accumulators(p) if is_shard_slice(p)
                      else features.init_accumulators(p))
    return LearnedOptState(count=jnp.zeros([], jnp.int32),
                           accumulators=jax.tree.map(init, params, is_leaf=is_shard_slice))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
          f"{name} needs the current global params: call "
          f"tx.update(deltas, state, params) (the learned optimizer reads W_t as a feature).")
    if num_workers is None:
      _validation.check_deltas_match(updates, params)
    else:
      _validation.check_deltas_match(
          updates, params, leading=(num_workers,), what="worker deltas")
    dec = meta_params.decay_rates()
    fset = meta_params.config.feature_set
    time_feats = features.time_features(state.count, fset)

    def one(p, d, acc):
      # ``p`` and ``d`` are ShardSlices under the sharded server step (engine.make_round_fn(
      # ..., shard_server=True)): one device's slice of a tensor, for LAgg-A ``(K, L)``.
      sliced = is_shard_slice(p)
      if sliced and custom_step:
        raise ValueError(f"{name} got a custom leaf_step, which works on whole tensors; the "
                         f"sharded server step runs its own. Use shard_server=False.")
      raw = d.data if sliced else d
      mean_d = raw if num_workers is None else jnp.mean(raw.astype(jnp.float32), axis=0)
      channels = mean_d[None] if num_workers is None else raw
      if sliced:
        mean_d = p.like(mean_d)
        acc = sharded.update_accumulators(acc, mean_d, dec, fset)
        step = sharded.leaf_step(meta_params, acc, p, mean_d, channels, time_feats, dtype)
        return p.like(step.astype(p.data.dtype)), acc
      acc = features.update_accumulators(acc, mean_d, dec, fset)
      step = leaf_step(meta_params, acc, p, mean_d, channels, time_feats)
      return step.astype(p.dtype), acc

    treedef = jax.tree.structure(params, is_leaf=is_shard_slice)
    pairs = [one(p, d, a) for p, d, a in
             zip(treedef.flatten_up_to(params), treedef.flatten_up_to(updates),
                 treedef.flatten_up_to(state.accumulators))]
    new_updates = treedef.unflatten([u for u, _ in pairs])
    new_acc = treedef.unflatten([a for _, a in pairs])
    return new_updates, LearnedOptState(
        count=optax.safe_int32_increment(state.count), accumulators=new_acc)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lopt_a(meta_params: MetaParams, leaf_step: LeafStep | None = None,
           block_size: int | None = None,
           mlp_dtype: str | None = None) -> optax.GradientTransformationExtraArgs:
  """LOpt-A: the worker-invariant learned server optimizer.

  ``updates`` is the averaged delta ``Delta = mean_k (W_old - W_new^(k))``, a pytree like
  params (the sign of a gradient). For each parameter the 39 Ada features of
  ``docs/features.md`` feed the MLP, whose outputs ``(d, m)`` give
  ``update = -0.001 * d * exp(0.001 * m)``, to be added with ``optax.apply_updates``.
  ``update`` must be called with ``params`` (the current global weights W_t).

  Args:
    meta_params: LOpt-A :class:`~optax_localsgd.MetaParams` (``init_lopt_a`` or pretrained).
    leaf_step: per-tensor features + MLP; ``None`` for the built-in
      :func:`~optax_localsgd.transforms.learned.blocked.blocked_leaf_step`. Replace with a fused
      kernel of the same signature (:class:`optax_localsgd.transforms.learned.mlp.LeafStep`)
      to speed up large models: ``transforms.learned.pallas.pallas_leaf_step`` is one (a fused
      Pallas kernel for GPUs); ``reference_leaf_step`` is the unblocked original.
      (The default is ``None`` rather than a function because ``optax.inject_hyperparams``
      takes every callable argument for a schedule; pass ``static_args=("leaf_step",)`` there
      when you give a kernel.)
    block_size: at most this many parameters per block of the built-in step (an int >= 1).
      A tensor that fits is evaluated whole; a larger one in balanced blocks, so the step's
      temporaries per tensor stay near ``250 * block_size`` bytes whatever its size. ``None``
      (automatic): tensors up to 131,072 parameters whole, larger ones in blocks of at most
      65,536. The result is the same to float32 rounding. Only with ``leaf_step=None``.
    mlp_dtype: ``None`` or ``"float32"`` (the paper); ``"bfloat16"``: the MLP's hidden-layer
      matmuls take bfloat16 operands and accumulate in float32, for hardware where that is
      much faster (GPUs, TPUs). On the 2-core AMX CPU of ``docs/benchmarks.md`` the MLP's
      narrow layers gain only about 1.1x; the update differs from float32 by about 0.25 %
      of its size (``benchmarks/mlp_precision.py``).
      Only with ``leaf_step=None``.

  There are no numeric hyperparameters: the meta-parameters fix the step (the learned MLP
  plays the role of a learning rate), so nothing here takes a schedule.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; extra keyword arguments are ignored.
    State memory: 4 float32 copies of the params plus sub-linear factored statistics.

  Raises:
    ValueError: wrong kind of meta-parameters, a ``block_size`` that is not a positive int,
      an unknown ``mlp_dtype``, or ``leaf_step`` with ``block_size`` or ``mlp_dtype``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from optax_localsgd import init_lopt_a, lopt_a
    >>> server = lopt_a(init_lopt_a(jax.random.PRNGKey(0)))  # fresh, not meta-trained
    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    >>> state = server.init(params)
    >>> delta = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)  # W_old - W_new
    >>> updates, state = jax.jit(server.update)(delta, state, params)  # params: required
    >>> jax.tree.map(jnp.shape, updates)
    {'b': (3,), 'w': (4, 3)}
    >>> int(state.count)
    1
    >>> bool(jnp.abs(updates["w"]).max() < 1e-3)  # fresh weights take tiny steps
    True
    >>> params = optax.apply_updates(params, updates)
  """
  _check_meta(meta_params, "lopt_a")
  if meta_params.config.kind != "lopt_a":
    raise ValueError(
        f"lopt_a got meta-parameters built for {meta_params.config.kind} "
        f"(K={meta_params.config.num_workers}); use lagg_a(meta_params, k) for those.")
  return _learned(meta_params, None, leaf_step, block_size, mlp_dtype)


def lagg_a(meta_params: MetaParams, k: int, leaf_step: LeafStep | None = None,
           block_size: int | None = None,
           mlp_dtype: str | None = None) -> optax.GradientTransformationExtraArgs:
  """LAgg-A: the worker-aware learned server optimizer (a learned aggregator).

  ``updates`` is the per-worker stack: every leaf has shape ``(k,) + param.shape`` and holds
  ``W_old - W_new^(j)`` for worker ``j`` at index ``j``. The Ada accumulators follow the mean
  over workers; the MLP also reads each worker's delta (38 + K features per parameter).
  The result is one update per parameter, added with ``optax.apply_updates``.

  Args:
    meta_params: LAgg-A :class:`~optax_localsgd.MetaParams` built for exactly ``k`` workers.
    k: the number of workers K (the leading axis of every delta leaf). It fixes shapes, so
      under ``optax.inject_hyperparams`` it must be static: ``static_args=("k",)``.
    leaf_step: per-tensor features + MLP (see :func:`lopt_a`).
    block_size: parameters per block of the built-in step (see :func:`lopt_a`); a block also
      holds its K worker deltas' columns, about ``4 K`` more bytes per parameter.
    mlp_dtype: ``None``/``"float32"`` or ``"bfloat16"`` MLP matmuls (see :func:`lopt_a`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; extra keyword arguments are ignored.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from optax_localsgd import init_lagg_a, lagg_a
    >>> k = 4
    >>> server = lagg_a(init_lagg_a(jax.random.PRNGKey(1), k), k)
    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    >>> worker_deltas = jax.tree.map(  # worker j's W_old - W_new at index j
    ...     lambda p: 0.01 * jax.random.normal(jax.random.PRNGKey(2), (k,) + p.shape), params)
    >>> jax.tree.map(jnp.shape, worker_deltas)
    {'b': (4, 3), 'w': (4, 4, 3)}
    >>> updates, state = jax.jit(server.update)(worker_deltas, server.init(params), params)
    >>> jax.tree.map(jnp.shape, updates)  # one update per parameter
    {'b': (3,), 'w': (4, 3)}
  """
  _check_meta(meta_params, "lagg_a")
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
    raise ValueError(
        f"lagg_a needs k as a Python integer (it fixes the deltas' leading axis), got "
        f"{type(k).__name__}. Under optax.inject_hyperparams pass static_args=('k',).")
  k = int(k)
  cfg = meta_params.config
  if cfg.kind != "lagg_a":
    raise ValueError(
        "lagg_a got LOpt-A meta-parameters; use lopt_a(meta_params) for those, or "
        "init_lagg_a(key, k) / a LAgg-A weight file.")
  if cfg.num_workers != k:
    raise ValueError(
        f"These LAgg-A meta-parameters were built for K={cfg.num_workers} workers "
        f"({cfg.num_inputs} inputs), but lagg_a was asked for k={k}. LAgg-A weights only "
        f"work with the K they were meta-trained for; use LOpt-A for a varying K.")
  return _learned(meta_params, k, leaf_step, block_size, mlp_dtype)
