"""Shared test fixtures and helpers."""

import os

import jax
import numpy as np
from hypothesis import settings

# Deterministic, bounded property tests on CI; explore more locally with HYPOTHESIS_PROFILE=dev.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Shapes of rank 0, 1, 2 and 4 (a conv kernel), with ties between axis sizes.
SHAPES = {"scalar": (), "bias": (7,), "dense": (5, 6), "conv": (3, 3, 4, 4)}


def make_params(seed=0, shapes=SHAPES, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return {k: jax.numpy.asarray(rng.normal(size=s), dtype) for k, s in shapes.items()}


def random_meta(meta, seed=0, offset_scale=0.5):
  """Meta-params with non-zero decay offsets and biases, so every path is exercised."""
  rng = np.random.default_rng(seed)
  mlp = {k: v + (0.1 * rng.normal(size=v.shape)).astype(np.float32) if k.startswith("b")
         else v for k, v in meta.mlp.items()}
  offsets = (offset_scale * rng.normal(size=7)).astype(np.float32)
  return type(meta)(mlp=mlp, decay_offsets=jax.numpy.asarray(offsets), config=meta.config)
