"""Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017) from its official IDX files.

Searched under ``search_paths("fashion-mnist", data_dir)``; Debian's ``dataset-fashion-mnist``
package installs the files in ``/usr/share/datasets/fashion-mnist``. If no searched directory
holds the split, the two files are downloaded from Zalando's S3 bucket into ``data_dir`` (when
given) or the user cache, and kept only if their SHA-256 matches the published one.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import pathlib
import tempfile
import urllib.request
import zlib

import numpy as np

from optax_localsgd.data.dataset import ArrayDataset
from optax_localsgd.data.errors import CorruptDatasetError, DatasetNotFoundError
from optax_localsgd.data.idx import read_idx
from optax_localsgd.data.paths import DATA_ENV, search_paths, user_cache_dir

SUBDIR = "fashion-mnist"
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)
BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# SHA-256 of the official .gz files as served at BASE_URL (and in the GitHub repo).
GZ_SHA256 = {
    "train-images-idx3-ubyte.gz":
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz":
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz":
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz":
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
# SHA-256 of the decompressed IDX payloads. A re-compressed copy (Debian's package stores the
# same payload with a gzip header lacking the original file name) is accepted by these.
RAW_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
DOWNLOAD_TIMEOUT_S = 20.0
MAX_DOWNLOAD_BYTES = 64 << 20


def _fetch(url: str, timeout_s: float) -> bytes:
  """GET ``url`` and return its body (at most ``MAX_DOWNLOAD_BYTES``); tests replace this."""
  with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 (fixed http URL)
    data = r.read(MAX_DOWNLOAD_BYTES + 1)
  if len(data) > MAX_DOWNLOAD_BYTES:
    raise OSError(f"{url}: response larger than {MAX_DOWNLOAD_BYTES} bytes")
  return data


def _check_sha256(name: str, data: bytes) -> None:
  """Raise unless ``data`` is the official ``name`` (.gz) or a gzip of its exact payload."""
  got = hashlib.sha256(data).hexdigest()
  if got == GZ_SHA256[name]:
    return
  try:
    raw = hashlib.sha256(gzip.decompress(data)).hexdigest()
  except (EOFError, OSError, zlib.error):
    raw = None
  if raw != RAW_SHA256[name.removesuffix(".gz")]:
    raise CorruptDatasetError(f"sha256 mismatch for {name}: got {got}, expected "
                              f"{GZ_SHA256[name]}.")


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
  """Write ``data`` to ``path`` through a temporary file in the same directory."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def _download(names: tuple[str, ...], dest: pathlib.Path) -> None:
  """Fetch ``<name>.gz`` for each name into ``dest``; nothing unverified is written."""
  for name in names:
    gz = f"{name}.gz"
    if (dest / gz).is_file():
      continue
    data = _fetch(BASE_URL + gz, DOWNLOAD_TIMEOUT_S)
    _check_sha256(gz, data)
    _write_atomic(dest / gz, data)


def _find(directory: pathlib.Path, name: str) -> pathlib.Path | None:
  for candidate in (directory / name, directory / f"{name}.gz"):
    if candidate.is_file():
      return candidate
  return None


def _locate(dirs: list[pathlib.Path], names: tuple[str, ...]
            ) -> tuple[pathlib.Path, ...] | None:
  for d in dirs:
    found = tuple(_find(d, n) for n in names)
    if all(found):
      return found  # type: ignore[return-value]
  return None


def _not_found_message(split: str, dirs: list[pathlib.Path], names: tuple[str, ...],
                       download_note: str) -> str:
  searched = "\n".join(f"  {d}" for d in dirs)
  expected = " and ".join(f"{n}.gz" for n in names)
  return (
      f"Fashion-MNIST '{split}' split not found.\n"
      f"Searched, in order:\n{searched}\n"
      f"Expected in one directory: {expected} (or the un-gzipped {' and '.join(names)}).\n"
      f"{download_note}\n"
      f"To get the files:\n"
      f"  - on Debian/Ubuntu: apt-get install dataset-fashion-mnist "
      f"(installs /usr/share/datasets/fashion-mnist), or\n"
      f"  - download the 4 files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
      f"t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz from the official repository "
      f"https://github.com/zalandoresearch/fashion-mnist (data/fashion/) into "
      f"${DATA_ENV}/{SUBDIR}, or pass data_dir=<directory holding them>.")


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike[str] | None = None,
                       download: bool = True) -> ArrayDataset:
  """Load a Fashion-MNIST split.

  Args:
    split: ``"train"`` (60000 examples) or ``"test"`` (10000).
    data_dir: if given, the only directory searched, and where a download goes.
    download: whether to download the split's two files when no searched directory has them.

  Returns:
    ``x`` uint8 ``(N, 28, 28, 1)`` pixel values 0..255, ``y`` int32 ``(N,)`` in 0..9,
    ``num_classes=10``.

  Raises:
    ValueError: unknown ``split``.
    DatasetNotFoundError: the files are nowhere and could not be downloaded.
    CorruptDatasetError: a file is malformed, or images and labels disagree.
  """
  if split not in SPLIT_FILES:
    raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}.")
  names = SPLIT_FILES[split]
  dirs = search_paths(SUBDIR, data_dir)
  found = _locate(dirs, names)
  if found is None:
    if not download:
      raise DatasetNotFoundError(_not_found_message(split, dirs, names,
                                                    "Downloading was disabled."))
    dest = dirs[0] if data_dir is not None else user_cache_dir(SUBDIR)
    try:
      _download(names, dest)
    except (OSError, http.client.HTTPException, CorruptDatasetError) as e:
      # No network, timeouts, HTTP errors, sha256 mismatch, unwritable destination.
      note = f"Downloading from {BASE_URL} into {dest} failed: {e}"
      raise DatasetNotFoundError(_not_found_message(split, dirs, names, note)) from e
    found = tuple(dest / f"{n}.gz" for n in names)
  images_path, labels_path = found
  return _load_pair(images_path, labels_path, split)


def _load_pair(images_path: pathlib.Path, labels_path: pathlib.Path,
               split: str) -> ArrayDataset:
  images = read_idx(images_path)
  labels = read_idx(labels_path)
  if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
    raise CorruptDatasetError(f"{images_path}: expected uint8 images of shape (N, 28, 28), "
                              f"got {images.dtype} {images.shape}.")
  if labels.dtype != np.uint8 or labels.ndim != 1:
    raise CorruptDatasetError(f"{labels_path}: expected uint8 labels of shape (N,), "
                              f"got {labels.dtype} {labels.shape}.")
  if len(images) != len(labels):
    raise CorruptDatasetError(f"{images_path} holds {len(images)} images but {labels_path} "
                              f"holds {len(labels)} labels.")
  if labels.size and labels.max() >= NUM_CLASSES:
    raise CorruptDatasetError(f"{labels_path}: label {int(labels.max())} out of range "
                              f"0..{NUM_CLASSES - 1}.")
  return ArrayDataset(x=images[..., None], y=labels.astype(np.int32), num_classes=NUM_CLASSES,
                      name=f"fashion_mnist/{split}")
