"""Minibatches on the device: which examples a worker draws, and how they become a batch.

``batch_fn(arrays, idx) -> batch`` gathers the examples ``idx`` of a dataset's arrays; the
round function of :mod:`optax_localsgd.engine.round` calls it inside ``jit``.
:func:`batch_fn_for` picks it for a task, :func:`eval_batches` cuts the fixed evaluation
subset that the trainer and the meta-trainer measure a model on.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from optax_localsgd import tasks

BatchFn = Callable[[Any, jax.Array], Any]

# The global model's training loss is measured on this many training examples, the same
# ones for every run (drawn with a fixed seed, independent of the run's seed).
EVAL_SUBSET_SEED = 20240601


def sample_indices(key: jax.Array, shard: jax.Array, n: int) -> jax.Array:
  """``n`` entries of ``shard`` in a fresh random order, without repetition while ``n`` <= size.

  Longer requests concatenate independent permutations (epochs).
  """
  size = shard.shape[0]
  reps = math.ceil(n / size)
  perms = jax.vmap(lambda k: jax.random.permutation(k, size))(jax.random.split(key, reps))
  return shard[perms.reshape(-1)[:n]]


def classification_batch(arrays: dict, idx: jax.Array) -> dict:
  """Gather examples ``idx`` of ``{"x", "y"}`` arrays."""
  return {"x": arrays["x"][idx], "y": arrays["y"][idx]}


def make_lm_batch(seq_len: int) -> BatchFn:
  """Batches of byte windows ``x[o : o + seq_len + 1]`` starting at offsets ``idx``."""

  def batch(arrays: dict, idx: jax.Array) -> dict:
    return {"x": arrays["x"][idx[..., None] + jnp.arange(seq_len + 1)]}

  return batch


def batch_fn_for(task: tasks.Task) -> BatchFn:
  """How the engine turns sampled indices into batches for ``task``."""
  if task.kind == "language_model":
    return make_lm_batch(task.input_shape[0])
  return classification_batch


def eval_batches(task: tasks.Task, arrays: dict, n: int, chunk: int = 2000) -> list[dict]:
  """A fixed subset of ``n`` items in chunks, the same for every run."""
  total = tasks.num_items(task, arrays)
  idx = np.random.default_rng(EVAL_SUBSET_SEED).permutation(total)[:min(n, total)]
  fn = batch_fn_for(task)
  return [jax.tree.map(np.asarray, fn(arrays, idx[i:i + chunk]))
          for i in range(0, len(idx), chunk)]
