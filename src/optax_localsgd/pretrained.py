"""Weight files of the learned server optimizers: save, verify and load :class:`MetaParams`.

A weight file is one ``.npz`` archive (a ZIP of ``.npy`` arrays, no compression) with

* ``mlp/w0, mlp/b0, mlp/w1, mlp/b1, mlp/w2, mlp/b2`` and ``decay_offsets``: float32,
  little-endian, with the shapes that the stored config implies;
* ``__metadata__``: a 1-D uint8 array holding UTF-8 JSON::

    {"format": "optax-localsgd-weights", "format_version": 1,
     "config": LearnedOptimizerConfig.to_dict(), "info": {...free-form, from the trainer...},
     "arrays_sha256": "<hex>"}

``arrays_sha256`` covers every array (not the metadata), in name order; see
:func:`optax_localsgd._npz._arrays_sha256`. Files are read with
``np.load(..., allow_pickle=False)``, so a downloaded file can at worst be rejected, never
execute code. Writes are atomic (temporary file in the same folder, fsync, ``os.replace``)
and byte-for-byte reproducible: the same weights, config and info always give the same file
and the same :func:`file_sha256`.

Bundled weights live in the top-level ``pretrained/`` folder of a source checkout, or in
``optax_localsgd/_pretrained`` inside an installed wheel, and are named by their relative path
without ``.npz``, e.g. ``"lopt_a/fmnist_mlp_k8_h4"`` (see :func:`available`). :func:`load`
also takes the output directory of ``optax-localsgd meta-train --out DIR`` and reads
``DIR/weights.npz``.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from optax_localsgd.transforms.learned import features
# The npz file layer (shared with meta.checkpoint).
from optax_localsgd._npz import (METADATA_KEY, PathLike, _arrays_sha256, _little_endian,
                                 _metadata_array, _open_npz, _read_member, _read_metadata,
                                 _sha256_of_stream, _write_npz_atomic)
from optax_localsgd.errors import UsageError
from optax_localsgd.transforms.learned.params import (SIGN_CONVENTION,
                                        LearnedOptimizerConfig, MetaParams, mlp_shapes)

FORMAT = "optax-localsgd-weights"
FORMAT_VERSION = 1
RUN_WEIGHTS = "weights.npz"  # what `optax-localsgd meta-train --out DIR` writes in DIR
MLP_NAMES = ("w0", "b0", "w1", "b1", "w2", "b2")
ARRAY_NAMES = tuple(f"mlp/{n}" for n in MLP_NAMES) + ("decay_offsets",)

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


# --------------------------------------------------------------------------------------------
# Locating files.


def _bundled_dirs() -> list[pathlib.Path]:
  """Folders that may hold bundled weights, in lookup order (existing ones only)."""
  candidates = [pathlib.Path(__file__).resolve().parents[2] / "pretrained"]
  try:
    resource = importlib.resources.files("optax_localsgd") / "_pretrained"
  except (ModuleNotFoundError, TypeError):
    resource = None
  # Only a real folder on disk is usable (not a zipimport); that is how wheels install.
  if isinstance(resource, pathlib.Path):
    candidates.append(resource)
  return [d for d in candidates if d.is_dir()]


def available() -> list[str]:
  """Names of the bundled weight files, sorted, e.g. ``["lopt_a/fmnist_mlp_k8_h4"]``.

  A name is the file's path relative to the bundled folder, with ``/`` separators and without
  ``.npz``. Returns ``[]`` when no weights are bundled.
  """
  names = set()
  for d in _bundled_dirs():
    for f in d.rglob("*.npz"):
      if f.is_file():
        names.add(f.relative_to(d).with_suffix("").as_posix())
  return sorted(names)


def default_name(method: str, task: str, k: int, h: int) -> str | None:
  """The bundled weights for ``method`` (``"lopt_a"`` / ``"lagg_a"``) trained on ``task`` with
  ``k`` workers and ``h`` local steps, named ``METHOD/TASK_kK_hH``; ``None`` if none ship."""
  name = f"{method}/{task}_k{k}_h{h}"
  return name if method in ("lopt_a", "lagg_a") and name in available() else None


def _is_bundled_name(path_or_name: PathLike) -> bool:
  """A ``str`` not ending in ``.npz`` names bundled weights (or else a run directory)."""
  return isinstance(path_or_name, str) and not path_or_name.endswith(".npz")


def _run_weights(directory: pathlib.Path) -> pathlib.Path:
  """``directory/weights.npz``, the file ``meta-train --out directory`` ends with."""
  path = directory / RUN_WEIGHTS
  if not path.is_file():
    raise UsageError(
        f"{directory} is a directory without {RUN_WEIGHTS} (looked for {path}). meta-train "
        f"writes it when a run finishes; an unfinished run exports its checkpoint with "
        f"`optax-localsgd meta-train ... --resume --stop-after 0 --export-partial`.")
  return path


def _locate(path_or_name: PathLike) -> tuple[pathlib.Path, str | None]:
  """(the weight file, its bundled name or ``None``) for a path, a run directory or a name.

  A ``str`` not ending in ``.npz`` is first a bundled name and only then a directory, so a
  local folder cannot shadow bundled weights; pass a ``pathlib.Path`` to mean the folder.
  """
  if not isinstance(path_or_name, (str, os.PathLike)):
    raise TypeError(f"Expected a path or a bundled name, got {type(path_or_name).__name__}.")
  if not _is_bundled_name(path_or_name):
    path = pathlib.Path(path_or_name)
    if path.is_dir():
      return _run_weights(path), None
    if not path.is_file():
      raise UsageError(f"Weight file {path} does not exist (or is not a file).")
    return path, None
  name = path_or_name
  if _NAME_RE.match(name) and ".." not in name.split("/"):
    for d in _bundled_dirs():
      path = d / f"{name}.npz"
      if path.is_file():
        return path, name
  if name and pathlib.Path(name).is_dir():  # "" would be the current folder
    return _run_weights(pathlib.Path(name)), None
  raise UsageError(
      f"Unknown pretrained weights {name!r}. Bundled: {available() or 'none'}. To load your "
      f"own, pass a path ending in '.npz' or a run directory holding {RUN_WEIGHTS} "
      f"(meta-train --out DIR).")


def resolve(path_or_name: PathLike) -> pathlib.Path:
  """The weight file behind a bundled name (see :func:`available`), a path to a ``.npz``
  file, or a run directory holding ``weights.npz``; :class:`UsageError` if there is none."""
  return _locate(path_or_name)[0]


MANIFEST = "MANIFEST.json"


def bundled_sha256(name: str) -> str:
  """The published sha256 of bundled weights ``name``, from ``MANIFEST.json`` next to them.

  Raises:
    ValueError: ``name`` is not bundled, or the manifest has no entry for it.
  """
  path, bundled = _locate(name)
  if bundled is None:
    raise UsageError(f"{name!r} is not a bundled name; only bundled weights have a manifest.")
  root = path.parents[len(pathlib.PurePosixPath(name).parts) - 1]
  manifest = root / MANIFEST
  try:
    entries = json.loads(manifest.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"Bundled weights {name!r}: cannot read {manifest} ({e}); the package "
                     f"install is incomplete.") from None
  if name not in entries or "sha256" not in entries[name]:
    raise ValueError(f"Bundled weights {name!r} have no sha256 entry in {manifest}.")
  return entries[name]["sha256"]


def file_sha256(path: PathLike) -> str:
  """Hex sha256 of the bytes of the file at ``path`` (what :func:`save` returns)."""
  with open(path, "rb") as f:
    return _sha256_of_stream(f)


# --------------------------------------------------------------------------------------------
# Public API.


def save(path: PathLike, meta: MetaParams, info: Mapping[str, Any]) -> str:
  """Writes ``meta`` and ``info`` to one ``.npz`` weight file, atomically.

  Args:
    path: destination; must end in ``.npz``. The folder must exist; an existing file is
      replaced atomically.
    meta: LOpt-A or LAgg-A meta-parameters. Floating arrays are stored as float32 (exact for
      float32 inputs); their shapes must match ``meta.config``.
    info: free-form JSON object describing how the weights were made (optimizer, K, H, tasks,
      outer steps, final meta-loss, package version, exact command, ...). Must be strict JSON:
      no NaN/inf, string keys.

  Returns:
    The hex sha256 of the whole file, to publish next to it and pass to
    ``load(..., expected_sha256=...)``.

  Raises:
    ValueError: wrong suffix, a shape that does not match the config, a non-floating array,
      or ``info`` that is not JSON-serializable.

  Examples:
    A round trip through a temporary folder:

    >>> import pathlib, tempfile, jax
    >>> from optax_localsgd import init_lopt_a, pretrained
    >>> meta = init_lopt_a(jax.random.PRNGKey(0))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...   path = pathlib.Path(tmp) / "weights.npz"
    ...   sha = pretrained.save(path, meta, {"note": "fresh weights"})
    ...   loaded = pretrained.load(path, expected_sha256=sha)
    ...   info = pretrained.metadata(path)["info"]
    >>> len(sha), info
    (64, {'note': 'fresh weights'})
    >>> loaded.config == meta.config
    True
    >>> all(bool((loaded.mlp[n] == meta.mlp[n]).all()) for n in meta.mlp)
    True
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
    arrays[name] = _little_endian(arr.astype(np.float32))
  metadata = {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "config": cfg.to_dict(),
      "info": dict(info),
      "arrays_sha256": _arrays_sha256(arrays),
  }
  try:
    arrays[METADATA_KEY] = _metadata_array(metadata)
  except (TypeError, ValueError) as e:
    raise ValueError(f"info must be strict JSON (str keys; no NaN/inf; lists, dicts, str, "
                     f"numbers, bools, None): {e}") from e
  return _write_npz_atomic(path, arrays)


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


def metadata(path_or_name: PathLike) -> dict:
  """The JSON metadata of a weight file (format, config, info, arrays_sha256).

  Reads only the ``__metadata__`` entry and checks the format tag and version; the arrays are
  neither loaded nor verified (use :func:`load` for that).

  Args:
    path_or_name: as for :func:`load`.

  Raises:
    UsageError: unknown name, unreadable file, missing/invalid metadata, wrong format.
  """
  path = resolve(path_or_name)
  with _open_npz(path, "Weight file", UsageError) as npz:
    meta = _read_metadata(npz, path, "Weight file", UsageError)
  _check_header(meta, path)
  return meta


def load(path_or_name: PathLike, *, expected_sha256: str | None = None,
         num_workers: int | None = None) -> MetaParams:
  """Loads and verifies a weight file written by :func:`save`.

  Args:
    path_or_name: a bundled name such as ``"lopt_a/fmnist_mlp_k8_h4"`` (see
      :func:`available`); a weight file (``pathlib.Path``, or a ``str`` ending in ``.npz``);
      or a run directory holding ``weights.npz``, as ``meta-train --out DIR`` leaves it
      (a bundled name wins over a folder of the same name).
    expected_sha256: hex sha256 of the whole file as published; checked before anything in
      the file is parsed. Bundled names are always checked against ``MANIFEST.json``.
    num_workers: the K you will train with; LAgg-A weights built for another K are refused.

  Returns:
    :class:`MetaParams` with float32 arrays bit-identical to those saved and an equal config.

  Raises:
    UsageError: (a ``ValueError``) naming the file and the problem: unknown name, a
      directory without ``weights.npz``, unreadable / not an npz / pickled content, missing
      metadata, wrong format tag or version, missing or extra arrays, shapes or dtypes that
      do not match the config, ``arrays_sha256`` mismatch (corrupt or modified), whole-file
      sha256 different from ``expected_sha256`` or from the manifest, or LAgg-A weights for
      a K other than ``num_workers``.
    ValueError: a bundled name whose ``MANIFEST.json`` entry is missing (a broken install).
  """
  path, bundled = _locate(path_or_name)
  if expected_sha256 is None and bundled is not None:
    expected_sha256 = bundled_sha256(bundled)
  if expected_sha256 is not None:
    actual = file_sha256(path)
    if actual != expected_sha256.strip().lower():
      raise UsageError(f"Weight file {path} has sha256 {actual}, expected {expected_sha256}: "
                       f"the file is not the one published (corrupt, truncated or modified).")
  with _open_npz(path, "Weight file", UsageError) as npz:
    meta = _read_metadata(npz, path, "Weight file", UsageError)
    _check_header(meta, path)
    cfg = _config_from_json(meta.get("config"), path)
    names = set(npz.files) - {METADATA_KEY}
    missing = sorted(set(ARRAY_NAMES) - names)
    extra = sorted(names - set(ARRAY_NAMES))
    if missing or extra:
      raise UsageError(f"Weight file {path} has the wrong arrays: missing {missing}, "
                       f"unexpected {extra}.")
    arrays = {n: _read_member(npz, n, path, "Weight file", UsageError) for n in ARRAY_NAMES}
  for name, shape in _expected_shapes(cfg).items():
    arr = arrays[name]
    if arr.shape != shape:
      raise UsageError(f"Weight file {path}: {name} has shape {arr.shape}, but its config "
                       f"({cfg.kind}, {cfg.num_inputs} inputs, hidden {cfg.hidden_size}) "
                       f"implies {shape}.")
    if arr.dtype != np.float32:
      raise UsageError(f"Weight file {path}: {name} has dtype {arr.dtype}, expected float32.")
  stored = meta.get("arrays_sha256")
  actual = _arrays_sha256(arrays)
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
