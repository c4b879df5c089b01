"""Reproducible, atomic, pickle-free ``.npz`` archives with a JSON metadata member.

The file layer under meta-training checkpoints (:mod:`optax_localsgd.io.checkpoint`) and
under the weight files written before they moved to safetensors (still read, see
:mod:`optax_localsgd.io.weights`): arrays stored little-endian and
uncompressed with a fixed timestamp (same input, same bytes), written through a temporary
file, fsync and ``os.replace``, read with ``allow_pickle=False``, and hashed per array.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pathlib
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from optax_localsgd.io.atomic import PathLike, atomic_write

METADATA_KEY = "__metadata__"

# Fixed ZIP member timestamp (the earliest ZIP can store), so files are reproducible.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def little_endian(arr: np.ndarray) -> np.ndarray:
  """``arr`` as a C-contiguous little-endian array (same values, same dtype kind)."""
  arr = np.asarray(arr)
  arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
  # Not np.ascontiguousarray: it turns 0-d arrays into shape (1,).
  return arr if arr.flags.c_contiguous else arr.copy(order="C")


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
  """Hex sha256 over ``arrays`` in sorted-name order.

  For each array the digest takes the line ``json.dumps([name, dtype.str, list(shape)])``
  (UTF-8, ``dtype.str`` of the little-endian dtype, e.g. ``"<f4"``), a ``"\\n"``, then the raw
  C-order little-endian bytes of the array.
  """
  h = hashlib.sha256()
  for name in sorted(arrays):
    arr = little_endian(arrays[name])
    h.update(json.dumps([name, arr.dtype.str, list(arr.shape)]).encode("utf-8"))
    h.update(b"\n")
    h.update(arr.tobytes(order="C"))
  return h.hexdigest()


def metadata_array(metadata: Mapping[str, Any]) -> np.ndarray:
  """``metadata`` as strict JSON (sorted keys, no NaN/inf) in a 1-D uint8 array."""
  text = json.dumps(metadata, sort_keys=True, allow_nan=False, ensure_ascii=False)
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def write_npz_atomic(path: PathLike, arrays: Mapping[str, np.ndarray]) -> str:
  """Writes ``arrays`` as an uncompressed ``.npz`` at ``path`` atomically
  (:func:`~optax_localsgd.io.atomic.atomic_write`).

  Members are written in the given order with a fixed timestamp (reproducible bytes).

  Returns:
    The hex sha256 of the written file.
  """
  def write(f):
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
      for name, arr in arrays.items():
        info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_EPOCH)
        info.external_attr = 0o644 << 16
        with zf.open(info, "w", force_zip64=True) as member:
          np.lib.format.write_array(member, np.asarray(arr), allow_pickle=False)

  return atomic_write(path, write)


@contextlib.contextmanager
def open_npz(path: pathlib.Path, what: str, error: type[ValueError]) -> Iterator[Any]:
  """Opens ``path`` with ``np.load(allow_pickle=False)``; errors become ``error`` naming it."""
  try:
    loaded = np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise error(f"{what} {path} is not a readable .npz archive: {e}") from e
  if not isinstance(loaded, np.lib.npyio.NpzFile):
    raise error(f"{what} {path} is a single .npy array, not an .npz archive.")
  with loaded:
    yield loaded


def read_member(npz, name: str, path: pathlib.Path, what: str,
                 error: type[ValueError]) -> np.ndarray:
  """One array of an open npz; pickled / non-.npy / CRC-failing members raise ``error``."""
  try:
    arr = npz[name]
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
    raise error(f"{what} {path} is corrupt or unreadable (member {name!r}): {e}") from e
  if not isinstance(arr, np.ndarray):
    raise error(f"{what} {path}: member {name!r} is not a .npy array.")
  return arr


def read_metadata(npz, path: pathlib.Path, what: str, error: type[ValueError]) -> dict:
  """Decodes the ``__metadata__`` member of an open npz into a dict."""
  if METADATA_KEY not in npz.files:
    raise error(f"{what} {path} has no {METADATA_KEY!r} entry; it was not written by "
                f"optax-localsgd (or was re-saved without it).")
  raw = read_member(npz, METADATA_KEY, path, what, error)
  if raw.dtype != np.uint8 or raw.ndim != 1:
    raise error(f"{what} {path}: {METADATA_KEY!r} must be a 1-D uint8 array of UTF-8 JSON, "
                f"got dtype {raw.dtype} shape {raw.shape}.")
  try:
    meta = json.loads(raw.tobytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise error(f"{what} {path}: {METADATA_KEY!r} is not valid UTF-8 JSON: {e}") from e
  if not isinstance(meta, dict):
    raise error(f"{what} {path}: {METADATA_KEY!r} must be a JSON object, got "
                f"{type(meta).__name__}.")
  return meta
