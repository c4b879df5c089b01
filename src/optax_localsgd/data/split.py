"""Partitions of a dataset's example indices among workers."""

from __future__ import annotations

import numpy as np


def split_homogeneous(n: int, k: int, seed: int) -> np.ndarray:
  """Cut a seeded random permutation of ``range(n)`` into ``k`` equal disjoint shards.

  The ``n % k`` indices left over at the end of the permutation are dropped. The result
  depends only on ``(n, k, seed)``.

  Args:
    n: number of examples.
    k: number of shards (workers), ``1 <= k <= n``.
    seed: seed of the permutation (``np.random.default_rng``).

  Returns:
    int32 indices of shape ``(k, n // k)``; row ``i`` is shard ``i``.
  """
  n, k = int(n), int(k)
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}.")
  if n < k:
    raise ValueError(f"Cannot split {n} examples into {k} non-empty shards (n < k).")
  if n > np.iinfo(np.int32).max:
    raise ValueError(f"n={n} does not fit int32 indices.")
  perm = np.random.default_rng(seed).permutation(n)
  per = n // k
  return perm[:per * k].reshape(k, per).astype(np.int32)
