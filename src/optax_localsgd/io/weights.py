"""The weight-file format of the learned server optimizers (:mod:`optax_localsgd.pretrained` is
the API on top).

A weight file is one `safetensors <https://huggingface.co/docs/safetensors>`_ file (any
safetensors reader opens it) with

* the tensors ``mlp/w0, mlp/b0, mlp/w1, mlp/b1, mlp/w2, mlp/b2`` and ``decay_offsets``:
  float32, with the shapes that the stored config implies;
* one string-metadata entry, ``"optax_localsgd"``, holding UTF-8 JSON (safetensors metadata
  is a ``dict[str, str]``)::

    {"format": "optax-localsgd-weights", "format_version": 1,
     "config": LearnedOptimizerConfig.to_dict(), "info": {...free-form, from the trainer...},
     "arrays_sha256": "<hex>"}

``arrays_sha256`` covers every tensor (not the metadata), in name order; see
:func:`optax_localsgd.io.npz.arrays_sha256`. safetensors holds only raw numbers and a JSON
header, so a downloaded file can at worst be rejected, never execute code. Writes are atomic
(:func:`~optax_localsgd.io.atomic.atomic_write`) and byte-for-byte reproducible: the same
weights, config and info always give the same file and the same :func:`file_sha256`.

**Legacy ``.npz`` files.** Weight files written before the move to safetensors (during 0.1.0)
are ``.npz`` archives (uncompressed ZIP of ``.npy`` arrays) of the same arrays, with the same
JSON in a 1-D uint8 member ``__metadata__``. They are still read, with identical numbers and
the same checks (``np.load(..., allow_pickle=False)``: no pickles), but no longer written; the
JSON is the same, so ``format_version`` stays 1.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from optax_localsgd.errors import UsageError
from optax_localsgd.io.atomic import PathLike, atomic_write, sha256_of_stream
from optax_localsgd.io.npz import (METADATA_KEY, arrays_sha256, little_endian, open_npz,
                                   read_member)
from optax_localsgd.io.npz import read_metadata as read_metadata_member
from optax_localsgd.transforms.learned import features
from optax_localsgd.transforms.learned.params import (SIGN_CONVENTION, LearnedOptimizerConfig,
                                                      MetaParams, mlp_shapes)

FORMAT = "optax-localsgd-weights"
FORMAT_VERSION = 1
MLP_NAMES = ("w0", "b0", "w1", "b1", "w2", "b2")
ARRAY_NAMES = tuple(f"mlp/{n}" for n in MLP_NAMES) + ("decay_offsets",)
SUFFIX = ".safetensors"  # what is written
LEGACY_SUFFIX = ".npz"  # still read
# The one safetensors metadata key; one key also keeps the header's bytes in a fixed order.
HEADER_KEY = "optax_localsgd"


def file_sha256(path: PathLike) -> str:
  """Hex sha256 of the bytes of the file at ``path`` (what :func:`write` returns)."""
  with open(path, "rb") as f:
    return sha256_of_stream(f)


def write(path: PathLike, meta: MetaParams, info: Mapping[str, Any]) -> str:
  """Writes ``meta`` and ``info`` to the weight file ``path`` atomically; returns its sha256.

  The checks and errors are those of :func:`optax_localsgd.pretrained.save`.
  """
  path = pathlib.Path(path)
  if path.suffix == LEGACY_SUFFIX:
    raise ValueError(f"Weight files are written as safetensors now: use "
                     f"{path.with_suffix(SUFFIX)} instead of {path} (.npz weight files are "
                     f"still read).")
  if path.suffix != SUFFIX:
    raise ValueError(f"Weight files must end in {SUFFIX!r}, got {path}.")
  if not isinstance(meta, MetaParams):
    raise ValueError(f"save expects MetaParams, got {type(meta).__name__}.")
  if not isinstance(info, Mapping):
    raise ValueError(f"info must be a dict (JSON object), got {type(info).__name__}.")
  cfg = meta.config
  expected = _expected_shapes(cfg)
  if set(meta.mlp) != set(MLP_NAMES):
    raise ValueError(f"meta.mlp must have keys {list(MLP_NAMES)}, got {sorted(meta.mlp)}.")
  arrays = {}
  for name in ARRAY_NAMES:
    value = meta.decay_offsets if name == "decay_offsets" else meta.mlp[name[4:]]
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.floating) and arr.dtype != jnp.bfloat16:
      raise ValueError(f"{name} must be a floating array, got dtype {arr.dtype}.")
    if arr.shape != expected[name]:
      raise ValueError(f"{name} has shape {arr.shape} but the config ({cfg.kind}, "
                       f"{cfg.num_inputs} inputs, hidden {cfg.hidden_size}) implies "
                       f"{expected[name]}.")
    arrays[name] = little_endian(arr.astype(np.float32))
  metadata = {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "config": cfg.to_dict(),
      "info": dict(info),
      "arrays_sha256": arrays_sha256(arrays),
  }
  try:
    text = json.dumps(metadata, sort_keys=True, allow_nan=False, ensure_ascii=False)
  except (TypeError, ValueError) as e:
    raise ValueError(f"info must be strict JSON (str keys; no NaN/inf; lists, dicts, str, "
                     f"numbers, bools, None): {e}") from e
  data = safetensors.numpy.save(arrays, metadata={HEADER_KEY: text})
  return atomic_write(path, lambda f: f.write(data))


def _expected_shapes(cfg: LearnedOptimizerConfig) -> dict[str, tuple[int, ...]]:
  shapes = {f"mlp/{k}": v for k, v in mlp_shapes(cfg.num_inputs, cfg.hidden_size).items()}
  shapes["decay_offsets"] = (features.NUM_DECAYS,)
  return shapes


def _check_header(meta: dict, path: pathlib.Path) -> None:
  fmt = meta.get("format")
  if fmt != FORMAT:
    raise UsageError(f"Weight file {path} has format tag {fmt!r}, expected {FORMAT!r}.")
  version = meta.get("format_version")
  if isinstance(version, bool) or not isinstance(version, int):
    raise UsageError(f"Weight file {path} has an invalid format_version {version!r}.")
  if version != FORMAT_VERSION:
    raise UsageError(
        f"Weight file {path} has format_version {version}; this version of optax-localsgd "
        f"reads format_version {FORMAT_VERSION}"
        + (" (upgrade optax-localsgd)." if version > FORMAT_VERSION else "."))


def _config_from_json(config: Any, path: pathlib.Path) -> LearnedOptimizerConfig:
  """Rebuilds the config; JSON lists become tuples; incompatible feature sets are refused."""
  if not isinstance(config, dict):
    raise UsageError(f"Weight file {path}: metadata 'config' must be a JSON object, got "
                     f"{type(config).__name__}.")
  fields = {f.name for f in dataclasses.fields(LearnedOptimizerConfig)}
  unknown = sorted(set(config) - fields)
  if unknown:
    raise UsageError(f"Weight file {path}: unknown config fields {unknown} (written by a "
                     f"newer optax-localsgd?).")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
  # Files written before feature sets had versions were all ada-v1; never let them silently
  # pick up the newer default.
  kwargs.setdefault("feature_set", "ada-v1")
  try:
    cfg = LearnedOptimizerConfig(**kwargs)
  except (TypeError, ValueError) as e:
    raise UsageError(f"Weight file {path}: invalid config: {e}") from e
  if cfg.sign_convention != SIGN_CONVENTION:
    raise UsageError(f"Weight file {path} uses sign convention {cfg.sign_convention!r}; "
                     f"this version of optax-localsgd uses {SIGN_CONVENTION!r}.")
  return cfg


def _open_safetensors(path: pathlib.Path, with_arrays: bool) -> tuple[dict, set, dict]:
  """(the JSON metadata, the tensor names, {name: array} for the names of :data:`ARRAY_NAMES`
  present, read only if ``with_arrays``) of a safetensors weight file."""
  try:
    with safetensors.safe_open(str(path), framework="np") as f:
      header = f.metadata() or {}
      names = set(f.keys())
      arrays = ({n: f.get_tensor(n) for n in ARRAY_NAMES if n in names} if with_arrays
                else {})
  except FileNotFoundError:
    raise
  except (safetensors.SafetensorError, OSError, ValueError, TypeError) as e:
    raise UsageError(f"Weight file {path} is not a readable safetensors file (corrupt, "
                     f"truncated or another format): {e}") from e
  if HEADER_KEY not in header:
    raise UsageError(f"Weight file {path} has no {HEADER_KEY!r} metadata entry; it was not "
                     f"written by optax-localsgd (or was re-saved without it).")
  try:
    meta = json.loads(header[HEADER_KEY])
  except json.JSONDecodeError as e:
    raise UsageError(f"Weight file {path}: metadata {HEADER_KEY!r} is not valid JSON: "
                     f"{e}") from e
  if not isinstance(meta, dict):
    raise UsageError(f"Weight file {path}: metadata {HEADER_KEY!r} must be a JSON object, "
                     f"got {type(meta).__name__}.")
  return meta, names, arrays


def _open_npz_legacy(path: pathlib.Path, with_arrays: bool) -> tuple[dict, set, dict]:
  """The same for a legacy ``.npz`` weight file (members other than the weights not read)."""
  with open_npz(path, "Weight file", UsageError) as npz:
    meta = read_metadata_member(npz, path, "Weight file", UsageError)
    names = set(npz.files) - {METADATA_KEY}
    arrays = ({n: read_member(npz, n, path, "Weight file", UsageError)
               for n in ARRAY_NAMES if n in names} if with_arrays else {})
  return meta, names, arrays


def _open(path: pathlib.Path, with_arrays: bool) -> tuple[dict, dict]:
  """(checked metadata, the weight arrays) of a weight file; the container is told by suffix."""
  opener = _open_npz_legacy if path.suffix == LEGACY_SUFFIX else _open_safetensors
  meta, names, arrays = opener(path, with_arrays)
  _check_header(meta, path)
  if with_arrays:
    missing = sorted(set(ARRAY_NAMES) - names)
    extra = sorted(names - set(ARRAY_NAMES))
    if missing or extra:
      raise UsageError(f"Weight file {path} has the wrong arrays: missing {missing}, "
                       f"unexpected {extra}.")
  return meta, arrays


def read_metadata(path: pathlib.Path) -> dict:
  """The checked JSON metadata of the weight file at ``path``; the arrays are not read."""
  return _open(path, with_arrays=False)[0]


def read(path: pathlib.Path, num_workers: int | None = None) -> MetaParams:
  """Reads and verifies the weight file at ``path`` (format, config, arrays, their hash and,
  for LAgg-A, ``num_workers``); :class:`UsageError` naming the file and the problem.

  ``path`` is a safetensors file, or a legacy ``.npz`` one if its name ends in ``.npz``.
  """
  meta, arrays = _open(path, with_arrays=True)
  cfg = _config_from_json(meta.get("config"), path)
  for name, shape in _expected_shapes(cfg).items():
    arr = arrays[name]
    if arr.shape != shape:
      raise UsageError(f"Weight file {path}: {name} has shape {arr.shape}, but its config "
                       f"({cfg.kind}, {cfg.num_inputs} inputs, hidden {cfg.hidden_size}) "
                       f"implies {shape}.")
    if arr.dtype != np.float32:
      raise UsageError(f"Weight file {path}: {name} has dtype {arr.dtype}, expected float32.")
  stored = meta.get("arrays_sha256")
  actual = arrays_sha256(arrays)
  if stored != actual:
    raise UsageError(f"Weight file {path} is corrupt or modified: its arrays hash to "
                     f"{actual}, but its metadata records arrays_sha256={stored!r}.")
  if (num_workers is not None and cfg.kind == "lagg_a"
      and cfg.num_workers != num_workers):
    raise UsageError(f"Weight file {path} holds LAgg-A weights for K={cfg.num_workers} "
                     f"workers, but you asked for K={num_workers}: LAgg-A reads each worker's "
                     f"delta, so its weights work only for the K they were trained with.")
  return MetaParams(
      mlp={n: jnp.asarray(arrays[f"mlp/{n}"]) for n in MLP_NAMES},
      decay_offsets=jnp.asarray(arrays["decay_offsets"]),
      config=cfg)
