"""CIFAR-10 (Krizhevsky, 2009) from any of three on-disk layouts.

Under each directory of ``search_paths("cifar10", data_dir)`` (or ``data_dir`` itself) the
first layout that holds the requested split is used, checked in this order:

(a) the official "python version", ``cifar-10-batches-py/`` (or the directory itself) with
    ``data_batch_1`` .. ``data_batch_5`` (train) and ``test_batch`` (test): Python 2 pickles
    of a dict with ``b"data"``, uint8 ``(10000, 3072)`` channel-planar rows (1024 R, 1024 G,
    1024 B, each row-major 32x32), and ``b"labels"``, a list of ints 0..9. They are read with
    a restricted unpickler that can build NumPy arrays and nothing else;
(b) an ImageFolder tree ``<split>/<class>/*.{jpg,jpeg,png}``;
(c) the same tree packed as ``<split>.tar.gz`` (or ``.tar``), read member by member without
    extracting anything to disk. Archive members may be ``<split>/<class>/<file>`` or
    ``<class>/<file>``.

In (b) and (c) the 10 class directories, sorted by name, give the labels 0..9 (the official
names ``airplane automobile bird cat deer dog frog horse ship truck`` sort into the standard
order); examples are ordered by class, then file name. Images are decoded with Pillow and must
be 32x32; JPEG copies are lossy, so their pixels differ from the official release.
"""

from __future__ import annotations

import gzip
import io
import os
import pathlib
import pickle
import tarfile
import zlib
from typing import Any, Callable, Iterator

import numpy as np

from optax_localsgd.data.dataset import ArrayDataset
from optax_localsgd.data.errors import CorruptDatasetError, DatasetNotFoundError
from optax_localsgd.data.paths import DATA_ENV, search_paths

SUBDIR = "cifar10"
NUM_CLASSES = 10
SIDE = 32
PYTHON_DIR = "cifar-10-batches-py"
PYTHON_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MAX_IMAGE_FILE_BYTES = 1 << 20  # A 32x32 image file is a few KB; refuse anything huge.


def _numpy_globals() -> dict[tuple[str, str], Any]:
  """The only globals the official pickles reference, under their NumPy 1 and 2 names."""
  try:
    from numpy._core.multiarray import _reconstruct  # NumPy >= 2.
  except ImportError:  # pragma: no cover (NumPy 1.x)
    from numpy.core.multiarray import _reconstruct
  return {
      ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
      ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
      ("numpy", "ndarray"): np.ndarray,
      ("numpy", "dtype"): np.dtype,
  }


class _ArrayOnlyUnpickler(pickle.Unpickler):
  """Unpickler that resolves only NumPy array reconstruction; any other global is refused.

  Refusal happens when the global is looked up, before anything could be called, so a pickle
  that names ``os.system`` or ``builtins.eval`` fails without running it.
  """
  _allowed = _numpy_globals()

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._allowed[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed") from None

  def persistent_load(self, pid: Any) -> Any:
    raise pickle.UnpicklingError("persistent ids are not allowed")


def _get(d: dict, key: str, path: pathlib.Path) -> Any:
  for k in (key.encode(), key):
    if k in d:
      return d[k]
  raise CorruptDatasetError(f"{path}: CIFAR-10 batch has no '{key}' entry "
                            f"(keys: {sorted(map(repr, d))}).")


def _load_python_batch(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """One ``data_batch_*``/``test_batch`` file -> (uint8 (N, 32, 32, 3), int32 (N,))."""
  try:
    with open(path, "rb") as f:
      batch = _ArrayOnlyUnpickler(f, encoding="bytes").load()
  except OSError:
    raise
  except Exception as e:  # UnpicklingError, EOFError, ValueError, MemoryError, ...
    raise CorruptDatasetError(f"{path}: not a valid CIFAR-10 pickle "
                              f"({type(e).__name__}: {e}).") from e
  if not isinstance(batch, dict):
    raise CorruptDatasetError(f"{path}: expected a pickled dict, got {type(batch).__name__}.")
  data = _get(batch, "data", path)
  labels = _get(batch, "labels", path)
  if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
      or data.shape[1] != 3 * SIDE * SIDE:
    desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
    raise CorruptDatasetError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {desc}.")
  try:
    labels = np.asarray(labels)
  except Exception as e:
    raise CorruptDatasetError(f"{path}: 'labels' is not a list of ints ({e}).") from e
  if labels.ndim != 1 or labels.dtype.kind not in "iu":
    raise CorruptDatasetError(f"{path}: 'labels' must be a flat list of ints, got "
                              f"{labels.dtype} {labels.shape}.")
  if len(labels) != len(data):
    raise CorruptDatasetError(f"{path}: {len(data)} images but {len(labels)} labels.")
  if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
    raise CorruptDatasetError(f"{path}: labels span [{labels.min()}, {labels.max()}], "
                              f"outside 0..{NUM_CLASSES - 1}.")
  x = data.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(x), labels.astype(np.int32)


def _decode_image(data: bytes, where: str) -> np.ndarray:
  """Decode one image file's bytes to uint8 (32, 32, 3) RGB; ``where`` names it in errors."""
  try:
    from PIL import Image, UnidentifiedImageError
  except ImportError as e:  # pragma: no cover
    raise ImportError("Loading CIFAR-10 image files needs Pillow: pip install pillow") from e
  if len(data) > MAX_IMAGE_FILE_BYTES:
    raise CorruptDatasetError(f"{where}: {len(data)} bytes, too large for a 32x32 image.")
  try:
    with Image.open(io.BytesIO(data)) as im:
      size = im.size
      if size == (SIDE, SIDE):
        pixels = np.asarray(im.convert("RGB"), dtype=np.uint8)
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
    raise CorruptDatasetError(f"{where}: cannot decode image ({type(e).__name__}: {e}).") from e
  if size != (SIDE, SIDE):
    raise CorruptDatasetError(f"{where}: image is {size[0]}x{size[1]}, expected "
                              f"{SIDE}x{SIDE}.")
  return pixels


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_SUFFIXES)


def _assemble(records: list[tuple[str, str, np.ndarray]], source: str,
              split: str) -> ArrayDataset:
  """(class name, file name, pixels) records -> dataset, labels from sorted class names."""
  classes = sorted({c for c, _, _ in records})
  if len(classes) != NUM_CLASSES:
    raise CorruptDatasetError(f"{source}: found images in {len(classes)} class directories "
                              f"{classes}, expected {NUM_CLASSES}.")
  records.sort(key=lambda r: (r[0], r[1]))
  index = {c: i for i, c in enumerate(classes)}
  x = np.stack([r[2] for r in records])
  y = np.asarray([index[r[0]] for r in records], np.int32)
  return ArrayDataset(x=x, y=y, num_classes=NUM_CLASSES, name=f"cifar10/{split}")


def _load_image_folder(root: pathlib.Path, split: str) -> ArrayDataset:
  records = []
  for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
    for f in sorted(class_dir.iterdir()):
      if f.is_file() and _is_image(f.name):
        records.append((class_dir.name, f.name, _decode_image(f.read_bytes(), str(f))))
  return _assemble(records, str(root), split)


def _tar_images(path: pathlib.Path, split: str) -> Iterator[tuple[str, str, bytes]]:
  """Yield (class name, member name, file bytes) for each image member, in archive order."""
  with tarfile.open(path, "r|*") as tar:
    for member in tar:
      if not member.isfile() or not _is_image(member.name):
        continue
      parts = [p for p in member.name.split("/") if p not in ("", ".")]
      if len(parts) == 3 and parts[0] == split:
        parts = parts[1:]
      if len(parts) != 2:
        raise CorruptDatasetError(f"{path}: member {member.name!r} is not "
                                  f"'{split}/<class>/<file>' or '<class>/<file>'.")
      if member.size > MAX_IMAGE_FILE_BYTES:
        raise CorruptDatasetError(f"{path}:{member.name}: {member.size} bytes, too large for "
                                  f"a 32x32 image.")
      f = tar.extractfile(member)
      assert f is not None  # A regular file.
      yield parts[0], member.name, f.read()


def _load_tar(path: pathlib.Path, split: str) -> ArrayDataset:
  records = []
  try:
    for cls, name, data in _tar_images(path, split):
      records.append((cls, name, _decode_image(data, f"{path}:{name}")))
  except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
    raise CorruptDatasetError(f"{path}: damaged or truncated archive "
                              f"({type(e).__name__}: {e}).") from e
  return _assemble(records, str(path), split)


def _load_python(directory: pathlib.Path, split: str) -> ArrayDataset:
  parts = [_load_python_batch(directory / name) for name in PYTHON_FILES[split]]
  x = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
  y = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
  return ArrayDataset(x=x, y=y, num_classes=NUM_CLASSES, name=f"cifar10/{split}")


def _find_layout(root: pathlib.Path, split: str
                 ) -> tuple[Callable[[pathlib.Path, str], ArrayDataset], pathlib.Path] | None:
  """The loader and location of the first layout under ``root`` holding ``split``."""
  for d in (root / PYTHON_DIR, root):
    if all((d / name).is_file() for name in PYTHON_FILES[split]):
      return _load_python, d
  if (root / split).is_dir():
    return _load_image_folder, root / split
  for suffix in (".tar.gz", ".tar"):
    if (root / f"{split}{suffix}").is_file():
      return _load_tar, root / f"{split}{suffix}"
  return None


def load_cifar10(split: str = "train",
                 data_dir: str | os.PathLike[str] | None = None) -> ArrayDataset:
  """Load a CIFAR-10 split from the first searched directory that holds it.

  Args:
    split: ``"train"`` (50000 examples) or ``"test"`` (10000).
    data_dir: if given, the only directory searched.

  Returns:
    ``x`` uint8 ``(N, 32, 32, 3)`` RGB pixel values 0..255, ``y`` int32 ``(N,)`` in 0..9,
    ``num_classes=10``.

  Raises:
    ValueError: unknown ``split``.
    DatasetNotFoundError: no searched directory holds the split in any layout.
    CorruptDatasetError: a file is malformed, an image is not 32x32, there are not exactly 10
      classes, or a pickle references anything but NumPy arrays.
  """
  if split not in PYTHON_FILES:
    raise ValueError(f"split must be one of {sorted(PYTHON_FILES)}, got {split!r}.")
  dirs = search_paths(SUBDIR, data_dir)
  for root in dirs:
    found = _find_layout(root, split)
    if found is not None:
      loader, where = found
      return loader(where, split)
  searched = "\n".join(f"  {d}" for d in dirs)
  batch_files = ", ".join(PYTHON_FILES[split])
  raise DatasetNotFoundError(
      f"CIFAR-10 '{split}' split not found.\nSearched, in order:\n{searched}\n"
      f"Expected in one of them, any of:\n"
      f"  {PYTHON_DIR}/ with {batch_files} (the official python version, "
      f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extracted);\n"
      f"  {split}/<class>/*.jpg|*.png (an ImageFolder tree of 32x32 images, 10 classes);\n"
      f"  {split}.tar.gz (that tree, archived).\n"
      f"Put one in ${DATA_ENV}/{SUBDIR} or pass data_dir=<directory>.")
