"""Label-skewed partitions of a dataset among federated clients (paper appendix E.6).

:func:`dirichlet_partition` is the Dirichlet label-skew split of Li et al. (2021, "Federated
Learning on Non-IID Data Silos", NIID-Bench), the one the paper's federated experiments use
(400 clients of Fashion-MNIST's 60000 training examples, alpha 0.1 and 100).
:func:`label_counts` tabulates a partition for inspection and for the plot of
:func:`optax_localsgd.util.plotting.plot_partition` (the paper's Figure 16).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                        min_size: int = 1) -> list[np.ndarray]:
  """Split example indices among ``num_clients`` clients with Dirichlet(alpha) label skew.

  The NIID-Bench procedure: for every class ``c`` (in increasing order), shuffle the indices of
  its examples, draw proportions ``p_c ~ Dirichlet(alpha * ones(num_clients))`` over the
  clients, and cut the shuffled indices at ``floor(cumsum(p_c) * n_c)``, so client ``i``
  receives about ``p_c[i] * n_c`` examples of class ``c``. Small ``alpha`` concentrates each
  class on a few clients (each client then holds a few labels); large ``alpha`` gives every
  client close to the global label mix and ``n / num_clients`` examples.

  Small clients. At small ``alpha`` some clients receive no example at all (about 2 of 400 on
  Fashion-MNIST at ``alpha = 0.1``, and about 40 receive fewer than 20). A client without data
  cannot train, so after the split every client below ``min_size`` is topped up with examples
  moved, at random, from the currently largest client (one at a time, so the donors stay
  large). The moved examples carry the donor's labels, so the skew is kept; at most
  ``num_clients * min_size`` examples move (none at large ``alpha``). NIID-Bench instead
  redraws the whole split until ``min_size`` is met, which at 400 clients and ``alpha = 0.1``
  practically never terminates for ``min_size >= 2``. ``min_size=0`` allows empty clients.

  Args:
    labels: the integer class label of every example, shape ``(n,)``.
    num_clients: N, ``1 <= N``, with ``N * min_size <= n``.
    alpha: the Dirichlet concentration, ``> 0`` (the paper: 0.1 and 100).
    seed: seed of ``np.random.default_rng``; the partition depends only on
      ``(labels, num_clients, alpha, seed, min_size)``.
    min_size: the fewest examples a client may hold (see above), ``>= 0``.

  Returns:
    ``num_clients`` sorted int64 index arrays into ``labels``: pairwise disjoint, together
    exactly ``range(n)``.

  Raises:
    ValueError: ``alpha <= 0``, ``num_clients < 1``, ``labels`` not 1-D integers, or more
      clients (times ``min_size``) than examples.

  Examples:
    >>> import numpy as np
    >>> from optax_localsgd.data import dirichlet_partition, label_counts
    >>> labels = np.repeat(np.arange(3), 100)
    >>> parts = dirichlet_partition(labels, num_clients=4, alpha=100.0, seed=0)
    >>> sum(len(p) for p in parts), len(np.unique(np.concatenate(parts)))
    (300, 300)
    >>> label_counts(parts, labels).sum(axis=1).tolist()  # examples per client
    [69, 75, 71, 85]
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} and dtype "
                     f"{labels.dtype}.")
  num_clients, min_size = int(num_clients), int(min_size)
  if not (np.isfinite(alpha) and alpha > 0):
    raise ValueError(f"alpha must be a positive number (Dirichlet concentration), got {alpha!r}.")
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}.")
  if min_size < 0:
    raise ValueError(f"min_size must be >= 0, got {min_size}.")
  n = labels.shape[0]
  if num_clients > n:
    raise ValueError(f"Cannot split {n} examples among {num_clients} clients: more clients than "
                     f"examples. Use at most {n} clients.")
  if num_clients * min_size > n:
    raise ValueError(f"{num_clients} clients of at least min_size={min_size} examples need "
                     f"{num_clients * min_size} examples; there are {n}. Lower min_size or "
                     f"num_clients.")
  rng = np.random.default_rng(seed)
  parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    p = rng.dirichlet(np.full(num_clients, float(alpha)))
    cuts = (np.cumsum(p)[:-1] * idx.size).astype(np.int64)
    for i, piece in enumerate(np.split(idx, cuts)):
      parts[i].append(piece)
  clients = [np.concatenate(ps) for ps in parts]
  _top_up(clients, min_size, rng)
  return [np.sort(c).astype(np.int64) for c in clients]


def _top_up(clients: list[np.ndarray], min_size: int, rng: np.random.Generator) -> None:
  """Move random examples from the largest client to each client below ``min_size``, in
  place. Feasible because ``num_clients * min_size <= n`` was checked."""
  sizes = np.array([c.size for c in clients])
  for i in np.flatnonzero(sizes < min_size):
    while clients[i].size < min_size:
      donor = int(np.argmax([c.size for c in clients]))
      take = min(min_size - clients[i].size, clients[donor].size - min_size)
      perm = rng.permutation(clients[donor].size)
      clients[i] = np.concatenate([clients[i], clients[donor][perm[:take]]])
      clients[donor] = clients[donor][perm[take:]]


def label_counts(partition: Sequence[np.ndarray], labels: np.ndarray,
                 num_classes: int | None = None) -> np.ndarray:
  """How many examples of each class every client holds.

  Args:
    partition: one index array per client (e.g. :func:`dirichlet_partition`'s).
    labels: the integer labels the indices point into.
    num_classes: columns of the table; default ``labels.max() + 1``.

  Returns:
    int64 ``(num_clients, num_classes)``: entry ``[i, c]`` counts client i's examples of class c.
  """
  labels = np.asarray(labels)
  c = int(labels.max()) + 1 if num_classes is None else int(num_classes)
  return np.stack([np.bincount(labels[np.asarray(p, np.int64)], minlength=c)[:c]
                   for p in partition]).astype(np.int64)
