"""SCAFFOLD's control variates (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", Algorithm 1 with option II), as a client hook of
:func:`optax_localsgd.engine.make_federated_round_fn`.

SCAFFOLD is two pieces. On the server it is FedAvg with a server learning rate,
``x <- x - lr_g * mean_i(Delta_i)`` with ``Delta_i = x - y_i``: :func:`~optax_localsgd.
transforms.averaging.local_sgd` (``lr_g``). On the clients it corrects every local gradient
with control variates, a per-client ``c_i`` and a server ``c``, both zero at the start:

* local step: ``y <- y - lr * (g(y) - c_i + c)``;
* after client i's ``H_i`` steps: ``c_i+ = c_i - c + Delta_i / (H_i * lr)`` (option II);
* server: ``c <- c + (1/N) * sum over the sampled clients of (c_i+ - c_i)``.

:class:`ScaffoldClient` is that client side: the engine keeps the N ``c_i`` and ``c`` in its
:class:`~optax_localsgd.engine.FederatedState`, adds :meth:`ScaffoldClient.correction` to
every gradient and calls the update methods after the local steps. Option II's ``c_i+``
assumes the clients run plain SGD with learning rate ``local_learning_rate``, so build the
workers' optimizer as ``optax.sgd(local_learning_rate)`` (no momentum, no schedule).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ScaffoldClient:
  """SCAFFOLD's client side (option II): per-client control variates ``c_i`` and the server's
  ``c``, pytrees like the params (in gradient units: loss per weight unit).

  Attributes:
    local_learning_rate: lr, the clients' SGD learning rate (the same number as their
      ``optax.sgd``), > 0.
  """
  local_learning_rate: float

  def __post_init__(self):
    if not self.local_learning_rate > 0:
      raise ValueError(f"ScaffoldClient.local_learning_rate must be > 0, got "
                       f"{self.local_learning_rate!r}.")

  def init(self, params: Any, num_clients: int) -> tuple[Any, Any]:
    """``(c_i stacked over the N clients, c)``, all zero (the paper's initialisation)."""
    zeros = jax.tree.map(jnp.zeros_like, params)
    return jax.tree.map(lambda z: jnp.zeros((num_clients,) + z.shape, z.dtype), zeros), zeros

  def correction(self, client_state: Any, server_state: Any) -> Any:
    """``c - c_i``, added to every local gradient."""
    return jax.tree.map(lambda ci, c: c - ci, client_state, server_state)

  def client_update(self, client_state: Any, server_state: Any, delta: Any,
                    steps: jax.Array) -> Any:
    """Option II: ``c_i+ = c_i - c + delta / (steps * lr)``, with ``delta = x - y_i``."""
    scale = 1.0 / (steps.astype(jnp.float32) * self.local_learning_rate)
    return jax.tree.map(lambda ci, c, d: ci - c + (d * scale).astype(ci.dtype),
                        client_state, server_state, delta)

  def server_update(self, server_state: Any, old: Any, new: Any, num_clients: int) -> Any:
    """``c + (1/N) * sum_k (c_k+ - c_k)`` over the ``(K, ...)`` stacks of sampled clients."""
    return jax.tree.map(lambda c, o, n_: c + jnp.sum(n_ - o, axis=0) / num_clients,
                        server_state, old, new)
