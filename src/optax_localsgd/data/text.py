"""Byte-level text corpora: one UTF-8 file, or a directory of ``*.txt`` files.

Fits the layout of the shared corpora, ``tinyshakespeare/input.txt`` (one file) and
``wikitext-2/{test,valid}.txt`` (a directory; its files start with a UTF-8 byte-order mark,
which is dropped so it does not become data).
"""

from __future__ import annotations

import codecs
import os
import pathlib

import numpy as np

from optax_localsgd.data.errors import CorruptDatasetError, DatasetNotFoundError

SPLITS = ("train", "val")


def _read_utf8(path: pathlib.Path) -> bytes:
  """The file's bytes without a leading byte-order mark; raises unless valid UTF-8."""
  data = path.read_bytes()
  if data.startswith(codecs.BOM_UTF8):
    data = data[len(codecs.BOM_UTF8):]
  try:
    data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise CorruptDatasetError(f"{path}: not UTF-8 text, invalid byte at offset {e.start} "
                              f"({e.reason}).") from e
  return data


def _corpus_files(path: pathlib.Path) -> list[pathlib.Path]:
  if path.is_file():
    return [path]
  if not path.is_dir():
    raise DatasetNotFoundError(f"Text corpus {path} does not exist (expected a UTF-8 text "
                               f"file or a directory of *.txt files).")
  files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
  if not files:
    nested = sorted(str(d) for d in path.iterdir()
                    if d.is_dir() and any(d.glob("*.txt")))
    hint = f" Directories below it that have some: {', '.join(nested)}." if nested else ""
    raise DatasetNotFoundError(f"Text corpus directory {path} has no *.txt files.{hint}")
  return files


def load_text_bytes(path: str | os.PathLike[str], split: str = "train",
                    val_fraction: float = 0.01) -> np.ndarray:
  """The UTF-8 bytes of a corpus, split into a leading train part and a trailing val part.

  The corpus is the file at ``path``, or all ``*.txt`` files directly in the directory
  ``path``, sorted by name and concatenated (a newline is inserted after a file that does not
  end with one). A leading UTF-8 byte-order mark of each file is dropped.

  Args:
    path: a text file or a directory of ``*.txt`` files.
    split: ``"train"``, the first ``n - n_val`` bytes, or ``"val"``, the last ``n_val``
      bytes, where ``n_val = max(1, floor(n * val_fraction))``.
    val_fraction: the share of bytes for ``"val"``, in (0, 1).

  Returns:
    A new uint8 array of byte values, shape ``(n - n_val,)`` or ``(n_val,)``.

  Raises:
    ValueError: unknown ``split`` or ``val_fraction`` outside (0, 1).
    DatasetNotFoundError: ``path`` does not exist, or is a directory without ``*.txt`` files.
    CorruptDatasetError: a file is not valid UTF-8, or the corpus is empty or too short to
      give both splits a byte.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}.")
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
  path = pathlib.Path(path)
  chunks = []
  for f in _corpus_files(path):
    data = _read_utf8(f)
    if chunks and not chunks[-1].endswith(b"\n"):
      chunks.append(b"\n")
    chunks.append(data)
  corpus = b"".join(chunks)
  n = len(corpus)
  n_val = max(1, int(n * val_fraction))
  if n == 0:
    raise CorruptDatasetError(f"Text corpus {path} is empty.")
  if n_val >= n:
    raise CorruptDatasetError(f"Text corpus {path} has {n} bytes, too few for a train and a "
                              f"val part with val_fraction={val_fraction}.")
  part = corpus[:n - n_val] if split == "train" else corpus[n - n_val:]
  return np.frombuffer(part, np.uint8).copy()
