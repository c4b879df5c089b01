"""Weight files of the learned server optimizers: save, verify and load :class:`MetaParams`.

This module is the API; the file format is :mod:`optax_localsgd.io.weights` and finding
files is :mod:`optax_localsgd.io.locate`. A weight file is one safetensors file of float32
arrays and a JSON header (format, config, info, arrays_sha256); weight files written before
safetensors, ``.npz`` archives of the same arrays, still load with identical numbers. Neither
format can hold code, so a downloaded file can at worst be rejected, never execute any. Writes
are atomic (temporary file in the same folder, fsync, ``os.replace``) and byte-for-byte
reproducible: the same weights, config and info always give the same file and the same
:func:`file_sha256`.

Bundled weights are package data (the top-level ``pretrained/`` folder of the source tree,
installed as ``optax_localsgd/_pretrained``) and are named by their relative path
without the suffix, e.g. ``"lopt_a/fmnist_mlp_k8_h4"`` (see :func:`available`). :func:`load`
also takes the output directory of ``optax-localsgd meta-train --out DIR`` and reads
``DIR/weights.safetensors`` (or, from an older run, ``DIR/weights.npz``).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

from optax_localsgd.errors import UsageError
from optax_localsgd.io import locate, weights
from optax_localsgd.io.locate import LEGACY_RUN_WEIGHTS, MANIFEST, RUN_WEIGHTS
from optax_localsgd.io.atomic import PathLike
from optax_localsgd.io.weights import (ARRAY_NAMES, FORMAT, FORMAT_VERSION, LEGACY_SUFFIX,
                                       MLP_NAMES, SUFFIX)
from optax_localsgd.transforms.learned.params import MetaParams

__all__ = [
    "ARRAY_NAMES", "FORMAT", "FORMAT_VERSION", "LEGACY_RUN_WEIGHTS", "LEGACY_SUFFIX",
    "MANIFEST", "MLP_NAMES", "RUN_WEIGHTS", "SUFFIX",
    "available", "bundled_sha256", "default_name", "file_sha256", "load", "metadata",
    "resolve", "save",
]


def available() -> list[str]:
  """Names of the bundled weight files, sorted, e.g. ``["lopt_a/fmnist_mlp_k8_h4"]``.

  A name is the file's path relative to the bundled folder, with ``/`` separators and without
  the suffix. Returns ``[]`` when no weights are bundled.
  """
  return locate.available()


def default_name(method: str, task: str, k: int, h: int,
                 tag: str | None = None) -> str | None:
  """The bundled weights for ``method`` (``"lopt_a"`` / ``"lagg_a"``) trained on ``task`` with
  ``k`` workers and ``h`` local steps, named ``METHOD/TASK_kK_hH``; ``None`` if none ship.

  ``tag`` names a compressor (:meth:`optax_localsgd.compression.Compression.weights_tag`, e.g.
  ``"top0.01"``): weights meta-trained for it, ``METHOD/TASK_kK_hH_TAG``, are preferred, and
  if none ship the uncompressed ones are returned.
  """
  if method not in ("lopt_a", "lagg_a"):
    return None
  name = f"{method}/{task}_k{k}_h{h}"
  names = available()
  if tag and f"{name}_{tag}" in names:
    return f"{name}_{tag}"
  return name if name in names else None


def resolve(path_or_name: PathLike) -> pathlib.Path:
  """The weight file behind a bundled name (see :func:`available`), a path to a
  ``.safetensors`` (or legacy ``.npz``) file, or a run directory holding
  ``weights.safetensors`` (or ``weights.npz``); :class:`UsageError` if there is none."""
  return locate.locate(path_or_name)[0]


def bundled_sha256(name: str) -> str:
  """The published sha256 of bundled weights ``name``, from ``MANIFEST.json`` next to them.

  Raises:
    ValueError: ``name`` is not bundled, or the manifest has no entry for it.
  """
  return locate.bundled_sha256(name)


def file_sha256(path: PathLike) -> str:
  """Hex sha256 of the bytes of the file at ``path`` (what :func:`save` returns)."""
  return weights.file_sha256(path)


def save(path: PathLike, meta: MetaParams, info: Mapping[str, Any]) -> str:
  """Writes ``meta`` and ``info`` to one safetensors weight file, atomically.

  Args:
    path: destination; must end in ``.safetensors`` (``.npz`` weight files are read, no
      longer written). The folder must exist; an existing file is
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
    ...   path = pathlib.Path(tmp) / "weights.safetensors"
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
  return weights.write(path, meta, info)


def metadata(path_or_name: PathLike) -> dict:
  """The JSON metadata of a weight file (format, config, info, arrays_sha256).

  Reads only the file's JSON header and checks the format tag and version; the arrays are
  neither loaded nor verified (use :func:`load` for that).

  Args:
    path_or_name: as for :func:`load`.

  Raises:
    UsageError: unknown name, unreadable file, missing/invalid metadata, wrong format.
  """
  return weights.read_metadata(resolve(path_or_name))


def load(path_or_name: PathLike, *, expected_sha256: str | None = None,
         num_workers: int | None = None) -> MetaParams:
  """Loads and verifies a weight file written by :func:`save`.

  Args:
    path_or_name: a bundled name such as ``"lopt_a/fmnist_mlp_k8_h4"`` (see
      :func:`available`); a weight file (``pathlib.Path``, or a ``str`` ending in
      ``.safetensors`` or, for a legacy file, ``.npz``); or a run directory holding
      ``weights.safetensors`` (or ``weights.npz``), as ``meta-train --out DIR`` leaves it
      (a bundled name wins over a folder of the same name).
    expected_sha256: hex sha256 of the whole file as published; checked before anything in
      the file is parsed. Bundled names are always checked against ``MANIFEST.json``.
    num_workers: the K you will train with; LAgg-A weights built for another K are refused.

  Returns:
    :class:`MetaParams` with float32 arrays bit-identical to those saved and an equal config.

  Raises:
    UsageError: (a ``ValueError``) naming the file and the problem: unknown name, a
      directory without weights, unreadable / not safetensors (or npz) / pickled content, missing
      metadata, wrong format tag or version, missing or extra arrays, shapes or dtypes that
      do not match the config, ``arrays_sha256`` mismatch (corrupt or modified), whole-file
      sha256 different from ``expected_sha256`` or from the manifest, or LAgg-A weights for
      a K other than ``num_workers``.
    ValueError: a bundled name whose ``MANIFEST.json`` entry is missing (a broken install).
  """
  path, bundled = locate.locate(path_or_name)
  if expected_sha256 is None and bundled is not None:
    expected_sha256 = bundled_sha256(bundled)
  if expected_sha256 is not None:
    actual = file_sha256(path)
    if actual != expected_sha256.strip().lower():
      raise UsageError(f"Weight file {path} has sha256 {actual}, expected {expected_sha256}: "
                       f"the file is not the one published (corrupt, truncated or modified).")
  return weights.read(path, num_workers)
