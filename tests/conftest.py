"""Shared test fixtures and helpers."""

import os

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


def cpu_devices_env(devices: int) -> dict[str, str]:
  """``os.environ`` for a child JAX process with ``devices`` CPU devices. The parent's other XLA
  flags (CI's backend optimisation level, see .ci/run) are kept, so a child compiles like the
  parent does."""
  return dict(os.environ, XLA_FLAGS=with_cpu_devices(os.environ.get("XLA_FLAGS", ""), devices),
              JAX_PLATFORMS="cpu")


# Every simulated device runs its program on a thread of XLA's CPU pool, and a device waiting in
# a collective (an all-gather) holds its thread. On two cores, with the default multi-threaded
# Eigen, a device's intra-op work can then wait for a pool thread that the waiting devices
# hold, and the process deadlocks: CI saw "only 7 of them arrived" (an abort after 40 s), and
# with a longer collective timeout a hang until the test's timeout. Single-threaded Eigen
# inside each device program removes that wait (the devices still run in parallel).
MULTI_DEVICE_FLAGS = ("--xla_cpu_multi_thread_eigen=false",)


def with_cpu_devices(xla_flags: str, devices: int) -> str:
  """``xla_flags`` with ``devices`` host CPU devices and the flags that keep collectives among
  them from deadlocking on a small machine (the other flags kept)."""
  ours = ("--xla_force_host_platform_device_count", "--xla_cpu_multi_thread_eigen")
  flags = [f for f in xla_flags.split() if not f.startswith(ours)]
  return " ".join([*flags, f"--xla_force_host_platform_device_count={devices}",
                   *MULTI_DEVICE_FLAGS])


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
