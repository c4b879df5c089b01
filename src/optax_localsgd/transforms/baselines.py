"""Baselines expressed as Optax compositions, not rewrites.

* Worker side: SGD with optional gradient clipping and weight decay (paper section 5.5.6 uses
  clip 5 and weight decay 1e-4 for the local steps).
* Server side, applied to the mean delta (which has the sign of a gradient):
  DiLoCo's outer Nesterov SGD (Douillard et al., 2023) and the adaptive federated optimizers
  FedAdam / FedYogi / FedAdagrad (Reddi et al., 2020, "Adaptive Federated Optimization"),
  with the paper's Table 7 defaults (beta1 0.9, beta2 0.99, tau = eps = 1e-3).
* Federated, with client state: SCAFFOLD (Karimireddy et al., 2020), a server transform plus
  a client hook for :func:`optax_localsgd.engine.make_federated_round_fn`.
* The non-local data-parallel SGD and Adam baselines (paper 5.1.4) are plain ``optax.sgd`` /
  ``optax.adam`` run by :func:`optax_localsgd.engine.make_data_parallel_round_fn`.
"""

from __future__ import annotations

import optax

from optax_localsgd.transforms.averaging import local_sgd
from optax_localsgd.transforms.scaffold import ScaffoldClient


def worker_sgd(learning_rate: optax.ScalarOrSchedule, clip_norm: float | None = None,
               weight_decay: float = 0.0) -> optax.GradientTransformation:
  """The workers' optimizer: ``sgd(lr)``, optionally after global-norm clipping and with
  (coupled) weight decay added to the gradient.

  Args:
    learning_rate: gamma, a number or an Optax schedule of the worker's step count. The engine
      gives the workers a fresh optimizer state every round, so such a schedule restarts at 0
      each round: it runs over the H local steps of one round.
    clip_norm: clip each gradient to this global norm first; ``None``: no clipping.
    weight_decay: coefficient of the ``weight_decay * params`` added to the gradient.
  """
  parts = []
  if clip_norm is not None:
    parts.append(optax.clip_by_global_norm(clip_norm))
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(optax.sgd(learning_rate))
  return optax.chain(*parts)


def diloco(learning_rate: optax.ScalarOrSchedule = 0.7,
           momentum: float = 0.9) -> optax.GradientTransformation:
  """DiLoCo's outer optimizer: Nesterov SGD on the mean delta (defaults from the DiLoCo paper),
  ``optax.sgd(learning_rate, momentum, nesterov=True)``::

      m_t      = momentum * m_{t-1} + Delta_t
      update_t = -lr_t * (Delta_t + momentum * m_t)

  Args:
    learning_rate: the outer learning rate, dimensionless (it scales deltas); a number or an
      Optax schedule of the round count (0 at the first update).
    momentum: the Nesterov momentum coefficient (a number, as in ``optax.sgd``).

  Examples:
    >>> import jax.numpy as jnp
    >>> from optax_localsgd.transforms import baselines
    >>> server = baselines.diloco()  # optax.sgd(0.7, momentum=0.9, nesterov=True)
    >>> params = {"w": jnp.zeros(2)}
    >>> mean_delta = {"w": jnp.array([1.0, -2.0])}  # W_old - W_new
    >>> updates, state = server.update(mean_delta, server.init(params), params)
    >>> [round(float(u), 3) for u in updates["w"]]  # first Nesterov step: -0.7 * 1.9 * delta
    [-1.33, 2.66]
  """
  return optax.sgd(learning_rate, momentum=momentum, nesterov=True)


def fedadam(learning_rate: optax.ScalarOrSchedule = 1e-2, b1: float = 0.9, b2: float = 0.99,
            eps: float = 1e-3) -> optax.GradientTransformation:
  """FedAdam server optimizer: ``optax.adam`` on the mean delta (Reddi et al., 2020).

  ``learning_rate`` (in weight units: Adam's steps are about ``lr`` per coordinate) may be an
  Optax schedule of the round count.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optax_localsgd.transforms import baselines
    >>> server = baselines.fedadam(learning_rate=0.1)
    >>> params = {"w": jnp.zeros(2)}
    >>> mean_delta = {"w": jnp.array([1.0, -2.0])}  # W_old - W_new, like a gradient
    >>> updates, state = server.update(mean_delta, server.init(params), params)
    >>> [round(float(u), 3) for u in updates["w"]]  # Adam's first step: about -lr * sign
    [-0.1, 0.1]
  """
  return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)


def fedyogi(learning_rate: optax.ScalarOrSchedule = 1e-2, b1: float = 0.9, b2: float = 0.99,
            eps: float = 1e-3) -> optax.GradientTransformation:
  """FedYogi server optimizer: ``optax.yogi`` on the mean delta (Reddi et al., 2020);
  ``learning_rate`` may be an Optax schedule of the round count."""
  return optax.yogi(learning_rate, b1=b1, b2=b2, eps=eps)


def fedadagrad(learning_rate: optax.ScalarOrSchedule = 1e-1,
               eps: float = 1e-3) -> optax.GradientTransformation:
  """FedAdagrad server optimizer: ``optax.adagrad`` on the mean delta (Reddi et al., 2020);
  ``learning_rate`` may be an Optax schedule of the round count."""
  return optax.adagrad(learning_rate, eps=eps)


def scaffold(local_learning_rate: float, server_learning_rate: optax.ScalarOrSchedule = 1.0
             ) -> tuple[optax.GradientTransformation, ScaffoldClient]:
  """SCAFFOLD (Karimireddy et al., 2020, option II): ``(server_tx, client_hook)``.

  ``server_tx`` is ``local_sgd(server_learning_rate)`` (``x <- x - lr_g * mean delta``);
  ``client_hook`` is a :class:`~optax_localsgd.transforms.scaffold.ScaffoldClient` holding the
  control variates. Pass both to :func:`optax_localsgd.engine.make_federated_round_fn`, with
  ``worker_tx=optax.sgd(local_learning_rate)``.

  Args:
    local_learning_rate: the clients' SGD learning rate (option II divides by it).
    server_learning_rate: lr_g, dimensionless (1.0: the new weights are the clients' mean).
  """
  return local_sgd(server_learning_rate), ScaffoldClient(float(local_learning_rate))
