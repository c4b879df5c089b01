"""Shared test fixtures and helpers."""

import os
from collections.abc import Mapping

import jax
import numpy as np
from hypothesis import settings

# Deterministic, bounded property tests on CI; explore more locally with HYPOTHESIS_PROFILE=dev.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# A 16-unit MLP (12.7k weights) on real Fashion-MNIST, for tests of meta-training mechanics
# (resume, guards, checkpoints, compressors, the GPU recipe) that do not depend on the
# optimizee's width: each PES step is several times cheaper than on the paper's 2 x 128 MLP.
SMALL_MLP = "fmnist_mlp:hidden=16"


def cpu_devices_env(devices: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
  """``base`` (default ``os.environ``) for a child JAX process with ``devices`` CPU devices. The
  other XLA flags (CI's backend optimisation level, see .ci/run) are kept, so a child compiles
  like its parent."""
  base = os.environ if base is None else base
  flags = [f for f in base.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices}")
  # XLA's CPU client runs every device's program on a thread of one pool of max(NPROC or the
  # core count, devices) threads: on two cores, exactly one per device. A device waiting in a
  # collective holds its thread, so any other task holding a pool thread meanwhile leaves the
  # last device without one, and XLA aborts after 40 s with "only 7 of them arrived" (CI; here
  # 3 in 16 runs of tests/sharded_step_script.py with a warm compilation cache). Spare threads
  # remove the wait: 0 in 48 runs with NPROC = 4 x devices.
  return dict(base, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", NPROC=str(4 * devices))


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


def write_legacy_npz(path, meta, info):
  """A weight file as optax-localsgd wrote them before safetensors: the code path of the old
  ``io.weights.write`` (float32 little-endian arrays, then the JSON as a uint8
  ``__metadata__`` member, through ``io.npz.write_npz_atomic``). tests/test_weight_formats.py
  checks that it reproduces an old bundled file byte for byte. Returns the file's sha256."""
  from optax_localsgd.io import npz, weights
  arrays = {n: npz.little_endian(np.asarray(meta.decay_offsets if n == "decay_offsets"
                                            else meta.mlp[n[4:]]).astype(np.float32))
            for n in weights.ARRAY_NAMES}
  header = {"format": weights.FORMAT, "format_version": weights.FORMAT_VERSION,
            "config": meta.config.to_dict(), "info": dict(info),
            "arrays_sha256": npz.arrays_sha256(arrays)}
  arrays[npz.METADATA_KEY] = npz.metadata_array(header)
  return npz.write_npz_atomic(path, arrays)


def bits(x):
  """The raw bytes of an array, so comparisons are bit-exact (NaN payloads, -0.0 included)."""
  x = np.asarray(x)
  return x.dtype.str, x.shape, x.tobytes()


def read_npz(path):
  """Every member of an ``.npz`` file, with NumPy's own reader (pickles refused)."""
  with np.load(path, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


class ArmedPickle:
  """Unpickling this creates the file ``marker``: proof that code ran."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (open, (self.marker, "w"))
