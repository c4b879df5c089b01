"""The weight-file format of the learned server optimizers (:mod:`optax_localsgd.pretrained` is
the API on top).

A weight file is one ``.npz`` archive (a ZIP of ``.npy`` arrays, no compression) with

* ``mlp/w0, mlp/b0, mlp/w1, mlp/b1, mlp/w2, mlp/b2`` and ``decay_offsets``: float32,
  little-endian, with the shapes that the stored config implies;
* ``__metadata__``: a 1-D uint8 array holding UTF-8 JSON::

    {"format": "optax-localsgd-weights", "format_version": 1,
     "config": LearnedOptimizerConfig.to_dict(), "info": {...free-form, from the trainer...},
     "arrays_sha256": "<hex>"}

``arrays_sha256`` covers every array (not the metadata), in name order; see
:func:`optax_localsgd.io.npz.arrays_sha256`. Files are read with
``np.load(..., allow_pickle=False)``, so a downloaded file can at worst be rejected, never
execute code. Writes are atomic (temporary file in the same folder, fsync, ``os.replace``)
and byte-for-byte reproducible: the same weights, config and info always give the same file
and the same :func:`file_sha256`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from optax_localsgd.errors import UsageError
from optax_localsgd.io.npz import (METADATA_KEY, PathLike, arrays_sha256, little_endian,
                                   metadata_array, open_npz, read_member, sha256_of_stream,
                                   write_npz_atomic)
from optax_localsgd.io.npz import read_metadata as read_metadata_member
from optax_localsgd.transforms.learned import features
from optax_localsgd.transforms.learned.params import (SIGN_CONVENTION, LearnedOptimizerConfig,
                                                      MetaParams, mlp_shapes)

FORMAT = "optax-localsgd-weights"
FORMAT_VERSION = 1
MLP_NAMES = ("w0", "b0", "w1", "b1", "w2", "b2")
ARRAY_NAMES = tuple(f"mlp/{n}" for n in MLP_NAMES) + ("decay_offsets",)


def file_sha256(path: PathLike) -> str:
  """Hex sha256 of the bytes of the file at ``path`` (what :func:`write` returns)."""
  with open(path, "rb") as f:
    return sha256_of_stream(f)


def write(path: PathLike, meta: MetaParams, info: Mapping[str, Any]) -> str:
  """Writes ``meta`` and ``info`` to the weight file ``path`` atomically; returns its sha256.

  The checks and errors are those of :func:`optax_localsgd.pretrained.save`.
  """
  path = pathlib.Path(path)
  if path.suffix != ".npz":
    raise ValueError(f"Weight files must end in '.npz', got {path}.")
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
    arrays[METADATA_KEY] = metadata_array(metadata)
  except (TypeError, ValueError) as e:
    raise ValueError(f"info must be strict JSON (str keys; no NaN/inf; lists, dicts, str, "
                     f"numbers, bools, None): {e}") from e
  return write_npz_atomic(path, arrays)


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


def read_metadata(path: pathlib.Path) -> dict:
  """The checked JSON metadata of the weight file at ``path``; the arrays are not read."""
  with open_npz(path, "Weight file", UsageError) as npz:
    meta = read_metadata_member(npz, path, "Weight file", UsageError)
  _check_header(meta, path)
  return meta


def read(path: pathlib.Path, num_workers: int | None = None) -> MetaParams:
  """Reads and verifies the weight file at ``path`` (format, config, arrays, their hash and,
  for LAgg-A, ``num_workers``); :class:`UsageError` naming the file and the problem."""
  with open_npz(path, "Weight file", UsageError) as npz:
    meta = read_metadata_member(npz, path, "Weight file", UsageError)
    _check_header(meta, path)
    cfg = _config_from_json(meta.get("config"), path)
    names = set(npz.files) - {METADATA_KEY}
    missing = sorted(set(ARRAY_NAMES) - names)
    extra = sorted(names - set(ARRAY_NAMES))
    if missing or extra:
      raise UsageError(f"Weight file {path} has the wrong arrays: missing {missing}, "
                       f"unexpected {extra}.")
    arrays = {n: read_member(npz, n, path, "Weight file", UsageError) for n in ARRAY_NAMES}
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
