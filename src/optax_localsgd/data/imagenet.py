"""Downsampled ImageNet (Chrabaszcz, Loshchilov & Hutter, 2017) in its npz release format.

Files, in one directory of ``search_paths(f"imagenet{resolution}", data_dir)``:

* train: ``train_data_batch_1.npz`` .. ``train_data_batch_10.npz`` (all present ones are read,
  in numeric order; at least one is required);
* val: ``val_data.npz``.

Each holds ``data``, uint8 ``(N, 3 * r * r)`` channel-planar rows (``r * r`` R values
row-major, then G, then B), and ``labels``, ``(N,)`` ints, 1-based. Other keys (``mean``) are
ignored. Files are opened with ``np.load(allow_pickle=False)``. The same format also fits
derived sets such as the shared 202-class Tiny-ImageNet copy; ``num_classes`` then comes from
the labels unless given.
"""

from __future__ import annotations

import os
import pathlib
import re
import zipfile

import numpy as np

from optax_localsgd.data.dataset import ArrayDataset
from optax_localsgd.data.errors import CorruptDatasetError, DatasetNotFoundError
from optax_localsgd.data.paths import DATA_ENV, search_paths

RESOLUTIONS = (8, 16, 32, 64)
SPLITS = ("train", "val")
VAL_FILE = "val_data.npz"
_MAX_LABEL = 1 << 24  # Far above any class count; keeps the int32 conversion exact.
_TRAIN_RE = re.compile(r"train_data_batch_(\d+)\.npz")


def _split_files(directory: pathlib.Path, split: str) -> list[pathlib.Path]:
  """The split's files present in ``directory``, train batches in numeric order."""
  if split == "val":
    return [directory / VAL_FILE] if (directory / VAL_FILE).is_file() else []
  if not directory.is_dir():
    return []
  batches = []
  for p in directory.iterdir():
    m = _TRAIN_RE.fullmatch(p.name)
    if m and p.is_file():
      batches.append((int(m.group(1)), p))
  return [p for _, p in sorted(batches)]


def _open(path: pathlib.Path) -> np.lib.npyio.NpzFile:
  try:
    npz = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    if isinstance(e, (FileNotFoundError, PermissionError)):
      raise
    raise CorruptDatasetError(f"{path}: not a readable npz file ({type(e).__name__}: "
                              f"{e}).") from e
  if not isinstance(npz, np.lib.npyio.NpzFile):
    raise CorruptDatasetError(f"{path}: expected an npz archive, found a single .npy array.")
  return npz


def _member(npz: np.lib.npyio.NpzFile, key: str, path: pathlib.Path) -> np.ndarray:
  if key not in npz.files:
    raise CorruptDatasetError(f"{path}: missing key '{key}' (keys: {sorted(npz.files)}).")
  try:
    return npz[key]
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise CorruptDatasetError(f"{path}: cannot read '{key}' ({type(e).__name__}: {e}); "
                              f"object arrays needing pickle are refused.") from e


def _read_labels(path: pathlib.Path) -> np.ndarray:
  with _open(path) as npz:
    labels = _member(npz, "labels", path)
  if labels.ndim != 1 or labels.dtype.kind not in "iu":
    raise CorruptDatasetError(f"{path}: 'labels' must be 1-D integers, got {labels.dtype} "
                              f"{labels.shape}.")
  if labels.size and (labels.min() < 1 or labels.max() > _MAX_LABEL):
    raise CorruptDatasetError(f"{path}: labels span [{labels.min()}, {labels.max()}], out of "
                              f"range; labels are 1-based class indices.")
  return labels


def _read_data(path: pathlib.Path, n: int, resolution: int) -> np.ndarray:
  """The ``data`` rows as uint8 (n, r, r, 3)."""
  row = 3 * resolution * resolution
  with _open(path) as npz:
    data = _member(npz, "data", path)
  if data.dtype != np.uint8 or data.ndim != 2:
    raise CorruptDatasetError(f"{path}: 'data' must be 2-D uint8, got {data.dtype} "
                              f"{data.shape}.")
  if data.shape[1] != row:
    raise CorruptDatasetError(f"{path}: rows of 'data' have {data.shape[1]} values, expected "
                              f"3*{resolution}*{resolution}={row} for resolution {resolution}.")
  if data.shape[0] != n:
    raise CorruptDatasetError(f"{path}: {data.shape[0]} rows of 'data' but {n} labels.")
  return data.reshape(n, 3, resolution, resolution).transpose(0, 2, 3, 1)


def load_imagenet_downsampled(split: str = "train",
                              data_dir: str | os.PathLike[str] | None = None,
                              resolution: int = 32,
                              num_classes: int | None = None) -> ArrayDataset:
  """Load a split of Imagenet8/16/32/64 (or a set in the same npz format).

  Args:
    split: ``"train"`` or ``"val"``.
    data_dir: if given, the only directory searched; else ``imagenet<resolution>`` under the
      standard places (see :mod:`optax_localsgd.data.paths`).
    resolution: image side ``r`` in pixels, one of 8, 16, 32, 64.
    num_classes: the number of classes (1000 for ImageNet); ``None`` infers it as the largest
      label in the loaded files.

  Returns:
    ``x`` uint8 ``(N, r, r, 3)`` RGB pixel values 0..255, ``y`` int32 ``(N,)`` 0-based.

  Raises:
    ValueError: unknown ``split`` or ``resolution``, or ``num_classes < 1``.
    DatasetNotFoundError: no searched directory holds a file of the split.
    CorruptDatasetError: unreadable file, missing key, wrong row length, labels below 1 or
      above ``num_classes``, or data and labels of different lengths.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}.")
  if resolution not in RESOLUTIONS:
    raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution!r}.")
  if num_classes is not None and num_classes < 1:
    raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}.")
  subdir = f"imagenet{resolution}"
  dirs = search_paths(subdir, data_dir)
  files = next((f for f in (_split_files(d, split) for d in dirs) if f), [])
  if not files:
    searched = "\n".join(f"  {d}" for d in dirs)
    expected = (VAL_FILE if split == "val" else
                "train_data_batch_1.npz .. train_data_batch_10.npz (at least one)")
    raise DatasetNotFoundError(
        f"Downsampled ImageNet {resolution}x{resolution} '{split}' split not found.\n"
        f"Searched, in order:\n{searched}\nExpected in one of them: {expected}.\n"
        f"Get the npz files of 'Imagenet{resolution}' from https://image-net.org/download-images"
        f" (Downsampled ImageNet) into ${DATA_ENV}/{subdir}, or pass data_dir=<directory>.")
  labels = [_read_labels(p) for p in files]
  top = max((int(l.max()) for l in labels if l.size), default=0)
  for p, l in zip(files, labels):
    if num_classes is not None and l.size and l.max() > num_classes:
      raise CorruptDatasetError(f"{p}: label {l.max()} out of range 1..{num_classes}.")
  n_classes = num_classes if num_classes is not None else max(top, 1)
  total = sum(len(l) for l in labels)
  x = np.empty((total, resolution, resolution, 3), np.uint8)
  start = 0
  for p, l in zip(files, labels):
    x[start:start + len(l)] = _read_data(p, len(l), resolution)
    start += len(l)
  y = np.concatenate(labels).astype(np.int32) - 1
  return ArrayDataset(x=x, y=y, num_classes=n_classes, name=f"{subdir}/{split}")
