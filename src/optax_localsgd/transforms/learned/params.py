"""Meta-parameters of the learned server optimizers: one object for weights and metadata.

A :class:`MetaParams` is a JAX pytree whose leaves are the MLP weights and the seven decay
offsets, and whose static part is a frozen :class:`LearnedOptimizerConfig` describing how those
numbers are to be interpreted (input size, hidden size, K, multipliers, feature-set version,
sign convention). Because only the arrays are leaves, a meta-trainer can perturb or differentiate
a ``MetaParams`` with ``jax.tree.map`` while the metadata travels along unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from optax_localsgd.transforms.learned import features

FEATURE_SET_VERSION = features.DEFAULT_FEATURE_SET  # of new meta-parameters
SIGN_CONVENTION = "delta = old - new"
Kind = Literal["lopt_a", "lagg_a"]


@dataclasses.dataclass(frozen=True)
class LearnedOptimizerConfig:
  """Static description of a learned server optimizer (paper section 4, appendix A).

  Attributes:
    kind: ``"lopt_a"`` (worker-invariant, reads the mean delta) or ``"lagg_a"``
      (worker-aware, reads the K worker deltas).
    num_workers: K for ``"lagg_a"``; ``None`` for ``"lopt_a"``.
    hidden_size: width of the two hidden layers (32 in the paper).
    step_mult: lambda_1 in ``update = -lambda_1 * d * exp(lambda_2 * m)``.
    exp_mult: lambda_2 in the same rule.
    initial_decays: beta_1..beta_7 when all decay offsets are 0.
    eps: ada-v1 only: floor of the second-moment quantities under a reciprocal square root
      (ada-v2 uses the authors' epsilons).
    feature_set: version of the feature definition in ``docs/features.md``: ``"ada-v2"``
      (the authors' semantics, the default) or ``"ada-v1"`` (the package's first version,
      kept so that weights meta-trained with it keep their numbers).
    sign_convention: the meaning of the input deltas.
  """

  kind: Kind
  num_workers: int | None = None
  hidden_size: int = 32
  step_mult: float = 1e-3
  exp_mult: float = 1e-3
  initial_decays: tuple[float, ...] = features.INITIAL_DECAYS
  eps: float = features.EPS
  feature_set: str = FEATURE_SET_VERSION
  sign_convention: str = SIGN_CONVENTION

  def __post_init__(self):
    if self.kind not in ("lopt_a", "lagg_a"):
      raise ValueError(f"kind must be 'lopt_a' or 'lagg_a', got {self.kind!r}.")
    if self.kind == "lopt_a" and self.num_workers is not None:
      raise ValueError("LOpt-A is worker-invariant: num_workers must be None.")
    if self.kind == "lagg_a" and (
        not isinstance(self.num_workers, int) or self.num_workers < 1):
      raise ValueError(
          f"LAgg-A needs num_workers = K >= 1, got {self.num_workers!r}.")
    if len(self.initial_decays) != features.NUM_DECAYS:
      raise ValueError(
          f"initial_decays needs {features.NUM_DECAYS} values, got "
          f"{len(self.initial_decays)}.")
    if not all(0.0 < b < 1.0 for b in self.initial_decays):
      raise ValueError(f"initial_decays must lie in (0, 1): {self.initial_decays}.")
    features.check_feature_set(self.feature_set)

  @property
  def num_delta_channels(self) -> int:
    """1 for LOpt-A (the mean delta), K for LAgg-A (one per worker)."""
    return 1 if self.kind == "lopt_a" else self.num_workers

  @property
  def num_inputs(self) -> int:
    """MLP input size: 39 for LOpt-A, 38 + K for LAgg-A."""
    return features.num_features(self.num_delta_channels)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MetaParams:
  """Weights of a learned server optimizer together with their static config.

  Attributes:
    mlp: dict with ``w0 (n_in, h), b0 (h,), w1 (h, h), b1 (h,), w2 (h, 2), b2 (2,)``.
    decay_offsets: shape ``(7,)``; ada-v2: ``beta_j = 1 - exp(10 (log(1 - beta0_j)/10 +
      offset_j))``; ada-v1: ``beta_j = sigmoid(logit(beta0_j) + offset_j)``.
    config: the static :class:`LearnedOptimizerConfig` (not a pytree leaf).
  """

  mlp: dict
  decay_offsets: jax.Array
  config: LearnedOptimizerConfig = dataclasses.field(metadata=dict(static=True))

  def decay_rates(self) -> features.Decays:
    """beta_1..beta_7 and 1 - beta_1..7 under this config's feature set."""
    return features.decays(self.decay_offsets, self.config.initial_decays,
                           self.config.feature_set)

  def decays(self) -> jax.Array:
    """The seven decays beta_1..beta_7, shape ``(7,)``."""
    return self.decay_rates().keep

  def num_mlp_params(self) -> int:
    """Number of MLP weights (2402 for LOpt-A; decays are counted separately)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.mlp))


def mlp_shapes(num_inputs: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
  """Shapes of the MLP weights ``num_inputs -> hidden -> hidden -> 2``."""
  return {
      "w0": (num_inputs, hidden_size), "b0": (hidden_size,),
      "w1": (hidden_size, hidden_size), "b1": (hidden_size,),
      "w2": (hidden_size, 2), "b2": (2,),
  }


def _init(key: jax.Array, config: LearnedOptimizerConfig,
          output_init_scale: float = 1.0) -> MetaParams:
  if not (math.isfinite(output_init_scale) and output_init_scale >= 0):
    raise ValueError(f"output_init_scale must be a finite number >= 0, got "
                     f"{output_init_scale}.")
  shapes = mlp_shapes(config.num_inputs, config.hidden_size)
  keys = jax.random.split(key, 3)
  mlp = {}
  for i, k in enumerate(keys):
    fan_in, fan_out = shapes[f"w{i}"]
    # Truncated at 2 std, std 1/sqrt(fan_in): LeCun-style, keeps hidden activations O(1)
    # for unit-second-moment inputs.
    mlp[f"w{i}"] = jax.random.truncated_normal(
        k, -2.0, 2.0, (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in)
    mlp[f"b{i}"] = jnp.zeros((fan_out,), jnp.float32)
  mlp["w2"] = output_init_scale * mlp["w2"]
  return MetaParams(
      mlp=mlp,
      decay_offsets=jnp.zeros((features.NUM_DECAYS,), jnp.float32),
      config=config)


def init_lopt_a(key: jax.Array, output_init_scale: float = 1.0,
                **config_overrides) -> MetaParams:
  """Fresh (un-meta-trained) LOpt-A meta-parameters.

  Args:
    key: a ``jax.random`` key.
    output_init_scale: factor on the initial output-layer weights ``w2`` (1: the authors'
      init). 0 starts meta-training from an optimizer that takes no step at all, instead of
      random steps that raise the loss (a meta-training choice, see ``docs/meta.md``; the
      update rule is the same).
    **config_overrides: fields of :class:`LearnedOptimizerConfig` other than kind/K
      (e.g. ``hidden_size``).

  Returns:
    :class:`MetaParams` with 2402 MLP weights (39 inputs, 32, 32, 2) and 7 decay offsets.

  Examples:
    >>> import jax
    >>> from optax_localsgd import init_lopt_a
    >>> meta = init_lopt_a(jax.random.PRNGKey(0))
    >>> meta.config.kind, meta.config.num_inputs, meta.num_mlp_params()
    ('lopt_a', 39, 2402)
    >>> [round(float(b), 3) for b in meta.decays()]  # offsets start at 0
    [0.9, 0.99, 0.999, 0.999, 0.9, 0.99, 0.999]
  """
  return _init(key, LearnedOptimizerConfig(kind="lopt_a", **config_overrides),
               output_init_scale)


def init_lagg_a(key: jax.Array, k: int, output_init_scale: float = 1.0,
                **config_overrides) -> MetaParams:
  """Fresh (un-meta-trained) LAgg-A meta-parameters for exactly ``k`` workers.

  Args:
    key: a ``jax.random`` key.
    k: number of workers K; the MLP reads 38 + K features.
    output_init_scale: factor on the initial output-layer weights (see :func:`init_lopt_a`).
    **config_overrides: other fields of :class:`LearnedOptimizerConfig`.

  Returns:
    :class:`MetaParams` with 2626 / 2882 / 3394 MLP weights for K = 8 / 16 / 32.

  Examples:
    >>> import jax
    >>> from optax_localsgd import init_lagg_a
    >>> meta = init_lagg_a(jax.random.PRNGKey(0), k=8)
    >>> meta.config.num_workers, meta.config.num_inputs, meta.num_mlp_params()
    (8, 46, 2626)
    >>> {name: w.shape for name, w in meta.mlp.items()}
    {'w0': (46, 32), 'b0': (32,), 'w1': (32, 32), 'b1': (32,), 'w2': (32, 2), 'b2': (2,)}
  """
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
    raise ValueError(f"init_lagg_a needs an integer k >= 1 (number of workers), got {k!r}.")
  return _init(key, LearnedOptimizerConfig(
      kind="lagg_a", num_workers=int(k), **config_overrides), output_init_scale)
