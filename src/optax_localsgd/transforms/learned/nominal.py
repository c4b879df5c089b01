"""Meta-parameters that start as a hand-designed server optimizer (a meta-training init).

Meta-training from a random (or zero-output) MLP has to discover, by PES alone, even the
step that local SGD takes for free; on a 2-core budget it often does not, or collapses on the
way (``docs/meta.md``). :func:`nesterov_init` instead builds meta-parameters whose MLP
computes, exactly, a linear function of two normalised features: the mean delta and its
momentum. Under ada-v2's normaliser ``x * rsqrt(1e-5 + mean(x**2))`` that function is
DiLoCo's outer Nesterov step while the deltas are small, and a per-tensor-normalised version
of it where they are not. Meta-training then starts from a working optimizer and only has to
improve it; the remaining hidden units keep their random init with zero output weights, so the
meta-gradient can bring them in.

The update rule is the paper's (eq. 4, unchanged); only the starting point differs. It is the
``--init nesterov:LR,MOMENTUM`` option of ``optax-localsgd meta-train`` (``docs/meta.md``).
The idea of a learned optimizer that starts from, or keeps, a hand-designed "nominal" step is
Harrison, Metz and Sohl-Dickstein, *A Closer Look at Learned Optimization: Stability,
Robustness, and Inductive Biases*, NeurIPS 2022.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from optax_localsgd.transforms.learned import features
from optax_localsgd.transforms.learned.params import MetaParams

# Column indices in the feature matrix (docs/features.md): m_1 (decay beta_1) and the first
# delta channel.
M1_COLUMN = 1
DELTA_COLUMN = features.NUM_ACCUMULATOR_FEATURES


def nesterov_coefficients(config, server_lr: float, momentum: float) -> dict[int, float]:
  """Weights on the normalised feature columns that make ``d`` DiLoCo's Nesterov step.

  DiLoCo's server (``optax.sgd(lr, momentum=mu, nesterov=True)`` on the delta ``Δ = old -
  new``) adds ``-lr * (Δ + mu * b)`` with ``b = mu * b + Δ``. The feature ``m_1`` is the
  exponential average ``(1 - beta_1) b``, so with ``beta_1 = mu`` the step is
  ``-lr * (Δ + mu / (1 - mu) * m_1)``. Where a column's mean square is well below the
  normaliser's ``eps = 1e-5`` it is fed to the MLP as ``x / sqrt(eps)``; dividing by
  ``lambda_1 / sqrt(eps)`` makes ``update = -lambda_1 * d`` that step.

  Returns:
    ``{column: weight}``; LAgg-A splits the delta weight evenly over its K delta channels
    (their mean is the averaged delta).
  """
  scale = server_lr * math.sqrt(features.V2_NORMALIZER_EPS) / config.step_mult
  c = config.num_delta_channels
  coef = {DELTA_COLUMN + i: scale / c for i in range(c)}
  coef[M1_COLUMN] = scale * momentum / (1.0 - momentum)
  return coef


def nesterov_init(meta: MetaParams, server_lr: float = 1.0,
                  momentum: float = 0.95) -> MetaParams:
  """``meta`` changed to start as DiLoCo's outer Nesterov step (see the module docstring).

  Two hidden units of each layer carry ``z = a . x`` as ``relu(z)`` and ``relu(-z)``, and the
  direction output is their difference, so ``d = a . x`` exactly (and ``m = 0``: the
  magnitude factor is 1). The other hidden units keep ``meta``'s weights, with their output
  weights zeroed. The decay offset of ``beta_1`` is set so that ``beta_1 = momentum``.

  Args:
    meta: ada-v2 meta-parameters (a fresh init, for the random hidden units).
    server_lr: DiLoCo's outer learning rate (> 0).
    momentum: its Nesterov momentum, in (0, 1).

  Returns:
    :class:`MetaParams` with the same config.

  Examples:
    >>> import jax
    >>> from optax_localsgd import init_lopt_a
    >>> from optax_localsgd.transforms.learned.nominal import nesterov_init
    >>> meta = nesterov_init(init_lopt_a(jax.random.PRNGKey(0)), 1.0, 0.95)
    >>> round(float(meta.decays()[0]), 4)
    0.95
  """
  cfg = meta.config
  if cfg.feature_set != "ada-v2":
    raise ValueError(f"nesterov_init needs ada-v2 meta-parameters (its normaliser keeps the "
                     f"scale of small deltas); got {cfg.feature_set!r}.")
  if not (math.isfinite(server_lr) and server_lr > 0):
    raise ValueError(f"server_lr must be a positive finite number, got {server_lr}.")
  if not 0.0 < momentum < 1.0:
    raise ValueError(f"momentum must lie in (0, 1), got {momentum}.")
  if cfg.hidden_size < 2:
    raise ValueError(f"nesterov_init needs hidden_size >= 2, got {cfg.hidden_size}.")
  a = np.zeros((cfg.num_inputs,), np.float32)
  for col, w in nesterov_coefficients(cfg, server_lr, momentum).items():
    a[col] = w
  mlp = {k: np.array(v, np.float32) for k, v in meta.mlp.items()}
  mlp["w0"][:, :2] = np.stack([a, -a], axis=1)
  mlp["b0"][:2] = 0.0
  mlp["w1"][:, :2] = 0.0
  mlp["w1"][:2, :2] = [[1.0, -1.0], [-1.0, 1.0]]
  mlp["b1"][:2] = 0.0
  mlp["w2"][:] = 0.0
  mlp["w2"][:2, 0] = [1.0, -1.0]
  mlp["b2"][:] = 0.0
  offsets = np.array(meta.decay_offsets, np.float32)
  b0 = cfg.initial_decays[0]
  # ada-v2: 1 - beta = exp(10 (log(1 - beta0) / 10 + offset)).
  offsets[0] = (math.log1p(-momentum) - math.log1p(-b0)) / features.V2_DECAY_SCALE
  return MetaParams(mlp={k: jnp.asarray(v) for k, v in mlp.items()},
                    decay_offsets=jnp.asarray(offsets), config=cfg)
