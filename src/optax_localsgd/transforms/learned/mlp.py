"""The per-parameter MLP F_phi and the update rule of paper eq. 4.

:func:`reference_leaf_step` is the straightforward implementation: it materialises the feature
matrix of a tensor and runs the MLP on it (about 250 bytes of temporaries per parameter). The
default ``leaf_step`` of :func:`optax_localsgd.lopt_a` / :func:`optax_localsgd.lagg_a` is
:func:`~optax_localsgd.transforms.learned.blocked.blocked_leaf_step`, which runs it whole on
small tensors and in blocks on large ones; a fused kernel with the same signature
(:class:`LeafStep`) can replace either without touching the transforms.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp

from optax_localsgd.transforms.learned import features
from optax_localsgd.transforms.learned.params import MetaParams


class LeafStep(Protocol):
  """Signature of the per-tensor learned step.

  Args:
    meta: the meta-parameters.
    acc: accumulators of this tensor, already advanced with this round's mean delta.
    param: the current value W_t of this tensor.
    delta: the mean delta of this round (same shape as ``param``).
    delta_channels: ``(C,) + param.shape``; ``delta[None]`` for LOpt-A, the K worker deltas
      for LAgg-A.
    time_feats: the 11 time features of this round, shape ``(11,)``.

  Returns:
    the update to add to ``param`` (float32, shape of ``param``).
  """

  def __call__(self, meta: MetaParams, acc: features.AdaAccumulators, param: jax.Array,
               delta: jax.Array, delta_channels: jax.Array,
               time_feats: jax.Array) -> jax.Array:
    ...


MLP_DTYPES = ("float32", "bfloat16")


def check_mlp_dtype(mlp_dtype) -> str:
  """``mlp_dtype`` as one of :data:`MLP_DTYPES` (``None`` is float32); a ``ValueError``
  naming the choices otherwise."""
  if mlp_dtype is None:
    return "float32"
  try:
    name = jnp.dtype(mlp_dtype).name
  except TypeError:
    name = None
  if name not in MLP_DTYPES:
    raise ValueError(f"mlp_dtype must be one of {', '.join(MLP_DTYPES)} (or None for float32), "
                     f"got {mlp_dtype!r}.")
  return name


def _dense(x: jax.Array, w: jax.Array, dtype: str) -> jax.Array:
  """``x @ w``; with ``"bfloat16"`` the operands are rounded to bfloat16 and the products
  summed in float32 (what AMX and tensor cores do natively)."""
  if dtype == "float32":
    return x @ w
  return jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                 preferred_element_type=jnp.float32)


def mlp_apply(mlp: dict, x: jax.Array, time_feats: jax.Array,
              mlp_dtype: str = "float32") -> tuple[jax.Array, jax.Array]:
  """Run F_phi on per-parameter features.

  Args:
    mlp: weights ``w0, b0, w1, b1, w2, b2``; ``w0`` has ``x.shape[-1] + 11`` rows, the time
      features being the last 11 inputs.
    x: ``(N, n_in - 11)`` normalised features.
    time_feats: ``(11,)``; the same for all N rows, so their contribution to the first layer
      is folded into its bias instead of being tiled N times (same result, less memory).
    mlp_dtype: ``"float32"``, or ``"bfloat16"``: the two hidden layers' matmuls (nearly all of
      the MLP's FLOPs) take bfloat16 operands with float32 accumulation; biases, activations
      and the 2-unit output layer stay float32 (not in the paper: a speed option,
      ``docs/benchmarks.md``).

  Returns:
    ``(d, m)``, each of shape ``(N,)``: direction and log-magnitude outputs (float32).
  """
  n_x = x.shape[-1]
  w0 = mlp["w0"]
  b0 = mlp["b0"] + time_feats @ w0[n_x:]
  h = jax.nn.relu(_dense(x, w0[:n_x], mlp_dtype) + b0)
  h = jax.nn.relu(_dense(h, mlp["w1"], mlp_dtype) + mlp["b1"])
  out = h @ mlp["w2"] + mlp["b2"]
  return out[:, 0], out[:, 1]


def reference_leaf_step(meta: MetaParams, acc: features.AdaAccumulators, param: jax.Array,
                        delta: jax.Array, delta_channels: jax.Array,
                        time_feats: jax.Array, mlp_dtype: str = "float32") -> jax.Array:
  """Features, MLP and ``update = -lambda_1 * d * exp(lambda_2 * m)`` for one tensor
  (``mlp_dtype``: see :func:`mlp_apply`)."""
  cfg = meta.config
  x = features.tensor_features(acc, param, delta, delta_channels, cfg.eps, cfg.feature_set)
  d, m = mlp_apply(meta.mlp, x, time_feats, mlp_dtype)
  update = -cfg.step_mult * d * jnp.exp(cfg.exp_mult * m)
  return update.reshape(param.shape)
