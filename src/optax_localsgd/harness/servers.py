"""Server optimizers by name, for the CLI and the evaluation harness.

Each entry builds an Optax transform and says how the engine must drive it: ``"local"``
(K workers x H local steps, then the server reads the mean delta or, for LAgg-A, the stack) or
``"data_parallel"`` (the paper's non-local SGD/Adam baselines: one step per round on K·H·B
examples).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import optax

from optax_localsgd.errors import UsageError
from optax_localsgd.transforms import baselines, lagg_a, local_sgd, lopt_a, slowmo
from optax_localsgd.transforms.learned.params import MetaParams, init_lagg_a, init_lopt_a


@dataclasses.dataclass(frozen=True)
class Server:
  """A server optimizer ready for the engine.

  Attributes:
    name: registry name.
    tx: the Optax transform.
    mode: ``"local"`` or ``"data_parallel"``.
    per_worker_deltas: the transform reads the ``(K, ...)`` stack (LAgg-A).
  """
  name: str
  tx: optax.GradientTransformation
  mode: str = "local"
  per_worker_deltas: bool = False


def _learned(kind: str, k: int, meta: MetaParams | None, seed: int) -> Server:
  if meta is None:
    key = jax.random.PRNGKey(seed)
    meta = init_lopt_a(key) if kind == "lopt_a" else init_lagg_a(key, k)
  if kind == "lopt_a":
    return Server("lopt_a", lopt_a(meta))
  return Server("lagg_a", lagg_a(meta, k), per_worker_deltas=True)


# name -> (builder(k, local_lr, server_lr, momentum, meta, seed), default server_lr, momentum)
_REGISTRY: dict[str, tuple[Callable[..., Server], float | None, float | None]] = {
    "local_sgd": (lambda k, g, a, b, m, s: Server("local_sgd", local_sgd(a)), 1.0, None),
    "slowmo": (lambda k, g, a, b, m, s: Server("slowmo", slowmo(a, b, g)), 1.0, 0.95),
    "diloco": (lambda k, g, a, b, m, s: Server("diloco", baselines.diloco(a, b)), 0.7, 0.9),
    "fedadam": (lambda k, g, a, b, m, s: Server("fedadam", baselines.fedadam(a)), 1e-2, None),
    "fedyogi": (lambda k, g, a, b, m, s: Server("fedyogi", baselines.fedyogi(a)), 1e-2, None),
    "fedadagrad": (lambda k, g, a, b, m, s: Server("fedadagrad", baselines.fedadagrad(a)),
                   1e-1, None),
    "lopt_a": (lambda k, g, a, b, m, s: _learned("lopt_a", k, m, s), None, None),
    "lagg_a": (lambda k, g, a, b, m, s: _learned("lagg_a", k, m, s), None, None),
    "sgd": (lambda k, g, a, b, m, s: Server("sgd", optax.sgd(a), "data_parallel"), 0.1, None),
    "adam": (lambda k, g, a, b, m, s: Server("adam", optax.adam(a), "data_parallel"), 1e-2, None),
}


def available_servers() -> list[str]:
  """Names accepted by :func:`make_server`."""
  return sorted(_REGISTRY)


def defaults(name: str) -> tuple[float | None, float | None]:
  """``(server_lr, momentum)`` that :func:`make_server` uses for ``name`` when given ``None``
  (``None`` where the optimizer has no such hyperparameter)."""
  if name not in _REGISTRY:
    raise UsageError(f"Unknown server {name!r}; available: {', '.join(available_servers())}.")
  return _REGISTRY[name][1], _REGISTRY[name][2]


def make_server(name: str, *, num_workers: int, local_learning_rate: float,
                server_learning_rate: float | None = None, momentum: float | None = None,
                meta_params: MetaParams | None = None, seed: int = 0) -> Server:
  """Build a server optimizer by name.

  Args:
    name: one of :func:`available_servers`.
    num_workers: K (LAgg-A is built for exactly this K).
    local_learning_rate: the workers' learning rate gamma (SlowMo needs it).
    server_learning_rate: alpha for slowmo, lr for local_sgd / diloco / fed* and for the
      data-parallel sgd / adam; ``None`` takes the default of that optimizer.
    momentum: beta for slowmo / diloco; ``None`` takes the default.
    meta_params: weights for lopt_a / lagg_a; ``None`` makes fresh, un-meta-trained ones.
    seed: seed of those fresh weights.
  """
  if name not in _REGISTRY:
    raise UsageError(f"Unknown server {name!r}; available: {', '.join(available_servers())}.")
  build, default_lr, default_momentum = _REGISTRY[name]
  lr = default_lr if server_learning_rate is None else server_learning_rate
  mom = default_momentum if momentum is None else momentum
  return build(num_workers, local_learning_rate, lr, mom, meta_params, seed)
