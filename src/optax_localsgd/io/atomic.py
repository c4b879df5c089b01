"""Atomic file writes: a reader sees the old file or the complete new one, never a part.

Shared by the weight files (:mod:`optax_localsgd.io.weights`) and the ``.npz`` archives
(:mod:`optax_localsgd.io.npz`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import tempfile
from collections.abc import Callable
from typing import BinaryIO, Union

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> str:
  """Calls ``write(f)`` on a temporary file next to ``path``, then moves it over ``path``.

  The temporary file is in the destination folder (so the move is a rename, not a copy), is
  fsync'ed before ``os.replace`` and removed if anything fails, including Ctrl-C.

  Returns:
    The hex sha256 of the written file.
  """
  path = pathlib.Path(path)
  directory = path.parent if str(path.parent) else pathlib.Path(".")
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "w+b") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
      f.seek(0)
      digest = sha256_of_stream(f)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  fsync_dir(directory)
  return digest


def fsync_dir(directory: pathlib.Path) -> None:
  """Best-effort fsync of a folder so the rename itself survives a crash (POSIX only)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def sha256_of_stream(f: BinaryIO) -> str:
  """Hex sha256 of what is left to read in the binary file ``f``, read in 1 MiB chunks."""
  h = hashlib.sha256()
  for chunk in iter(lambda: f.read(1 << 20), b""):
    h.update(chunk)
  return h.hexdigest()
