"""Dataset loaders: each on-disk format written here byte by byte, then read back exactly.

Nothing here touches the network: downloads go through a replaced ``_fetch``.
"""

import gzip
import hashlib
import io
import os
import pathlib
import pickle
import struct
import tarfile
import urllib.error

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from optax_localsgd import data
from optax_localsgd.data import fashion_mnist, paths
from optax_localsgd.data import ArrayDataset, CorruptDatasetError, DatasetNotFoundError

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck")
REAL_FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def places(monkeypatch, tmp_path):
  """Point all three search places into tmp_path; returns (env root, cache root, system root)."""
  env, cache, system = tmp_path / "env", tmp_path / "xdg", tmp_path / "system"
  monkeypatch.setenv("OPTAX_LOCALSGD_DATA", str(env))
  monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
  monkeypatch.setattr(paths, "SYSTEM_DATA_DIR", system)
  return env, cache / "optax_localsgd", system


# ---------------------------------------------------------------- writers of the formats


def idx_bytes(arr, code):
  """IDX encoding of ``arr``: magic 00 00 code ndim, big-endian dims, big-endian values."""
  big = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
  header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
  return header + np.asarray(arr, big).tobytes()


def write(path, payload, compress=False):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(gzip.compress(payload) if compress else payload)
  return path


def fashion_arrays(n, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
          rng.integers(0, 10, n, dtype=np.uint8))


def write_fashion(directory, split="train", n=5, seed=0, compress=True):
  images, labels = fashion_arrays(n, seed)
  stem = {"train": "train", "test": "t10k"}[split]
  gz = ".gz" if compress else ""
  write(directory / f"{stem}-images-idx3-ubyte{gz}", idx_bytes(images, 0x08), compress)
  write(directory / f"{stem}-labels-idx1-ubyte{gz}", idx_bytes(labels, 0x08), compress)
  return images, labels


def py2_pickle(batch):
  """A dict of bytes keys pickled the way Python 2 + NumPy 1 wrote the official CIFAR files.

  Protocol 2 with 8-bit strings (SHORT_BINSTRING / BINSTRING), which Python 3 cannot emit,
  and ndarrays as numpy.core.multiarray._reconstruct + BUILD.
  """
  def string(b):
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<I", len(b)) + b)

  def integer(i):
    return b"K" + bytes([i]) if 0 <= i < 256 else b"J" + struct.pack("<i", i)

  def array(a):
    dtype = (b"cnumpy\ndtype\n" + string(b"u1") + integer(0) + integer(1) + b"\x87R"
             + b"(" + integer(3) + string(b"|") + b"NNN" + integer(-1) + integer(-1)
             + integer(0) + b"tb")
    shape = b"(" + b"".join(integer(s) for s in a.shape) + b"t"
    return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + integer(0)
            + b"\x85" + string(b"b") + b"\x87R"
            + b"(" + integer(1) + shape + dtype + b"\x89" + string(a.tobytes()) + b"tb")

  def value(v):
    if isinstance(v, np.ndarray):
      return array(v)
    if isinstance(v, bytes):
      return string(v)
    if isinstance(v, list):
      return b"](" + b"".join(value(e) for e in v) + b"e"
    return integer(v)

  items = b"".join(string(k) + value(v) for k, v in batch.items())
  return b"\x80\x02}(" + items + b"u."


def cifar_batch(n, seed):
  rng = np.random.default_rng(seed)
  rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
  labels = [int(v) for v in rng.integers(0, 10, n)]
  return {b"batch_label": b"testing batch", b"labels": labels, b"data": rows,
          b"filenames": [b"img_%d.png" % i for i in range(n)]}


def png_bytes(pixels):
  buf = io.BytesIO()
  Image.fromarray(pixels, "RGB").save(buf, format="PNG")
  return buf.getvalue()


def image_tree(n_per_class=2, seed=0, classes=CIFAR_CLASSES, size=32):
  """{(class, file name): pixels} for a small ImageFolder split."""
  rng = np.random.default_rng(seed)
  return {(c, f"{i:04d}.png"): rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
          for c in classes for i in range(n_per_class)}


def write_tree(root, tree):
  for (c, name), pixels in tree.items():
    write(root / c / name, png_bytes(pixels))


def write_tar(path, tree, prefix):
  path.parent.mkdir(parents=True, exist_ok=True)
  with tarfile.open(path, "w:gz") as tar:
    for (c, name), pixels in sorted(tree.items(), reverse=True):  # Not in sorted order.
      blob = png_bytes(pixels)
      info = tarfile.TarInfo(f"{prefix}{c}/{name}")
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))


def expected_from_tree(tree):
  keys = sorted(tree)
  return (np.stack([tree[k] for k in keys]),
          np.asarray([CIFAR_CLASSES.index(c) for c, _ in keys], np.int32))


def planar_rows(n, r, seed):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, 3 * r * r), dtype=np.uint8)


def hwc(rows, r):
  """Reference channel-planar -> HWC, element by element."""
  out = np.zeros((len(rows), r, r, 3), np.uint8)
  for i in range(len(rows)):
    for c in range(3):
      for h in range(r):
        for w in range(r):
          out[i, h, w, c] = rows[i, c * r * r + h * r + w]
  return out


# ---------------------------------------------------------------- paths


def test_search_paths_order(monkeypatch, tmp_path):
  monkeypatch.setenv("OPTAX_LOCALSGD_DATA", str(tmp_path / "env"))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert data.search_paths("fashion-mnist") == [
      tmp_path / "env" / "fashion-mnist",
      tmp_path / "xdg" / "optax_localsgd" / "fashion-mnist",
      pathlib.Path("/usr/share/datasets/fashion-mnist")]
  monkeypatch.delenv("OPTAX_LOCALSGD_DATA")
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert data.search_paths("cifar10") == [
      tmp_path / "home" / ".cache" / "optax_localsgd" / "cifar10",
      pathlib.Path("/usr/share/datasets/cifar10")]
  assert data.search_paths("cifar10", tmp_path / "mine") == [tmp_path / "mine"]


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("code,dtype", [(0x08, np.uint8), (0x09, np.int8), (0x0B, np.int16),
                                        (0x0C, np.int32), (0x0D, np.float32),
                                        (0x0E, np.float64)])
def test_idx_roundtrip(tmp_path, code, dtype, compress):
  rng = np.random.default_rng(code)
  arr = (rng.normal(size=(3, 4, 5)) * 100).astype(dtype)
  p = write(tmp_path / "a.idx", idx_bytes(arr, code), compress)
  got = data.read_idx(p)
  assert got.dtype == dtype and got.dtype.isnative and got.shape == (3, 4, 5)
  np.testing.assert_array_equal(got, arr)
  got[0, 0, 0] = 1  # Writable.


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("mangle,message", [
    (lambda b: b"\x01" + b[1:], "magic number"),
    (lambda b: b[:2] + b"\x07" + b[3:], "dtype code 0x07"),
    (lambda b: b[:6], "dimension list"),
    (lambda b: b[:-1], "only 59 follow"),
    (lambda b: b + b"\x00", "bytes after"),
    (lambda b: b[:3], "truncated"),
])
def test_idx_corrupt(tmp_path, mangle, message, compress):
  good = idx_bytes(np.arange(60, dtype=np.uint8).reshape(3, 4, 5), 0x08)
  p = write(tmp_path / "bad-idx3-ubyte", mangle(good), compress)
  with pytest.raises(CorruptDatasetError, match=message) as e:
    data.read_idx(p)
  assert str(p) in str(e.value)


@pytest.mark.parametrize("cut", ["truncated", "crc"])
def test_idx_damaged_gzip(tmp_path, cut):
  blob = gzip.compress(idx_bytes(np.arange(4000, dtype=np.uint8), 0x08))
  blob = blob[:len(blob) // 2] if cut == "truncated" else blob[:-8] + b"\0\0\0\0" + blob[-4:]
  p = write(tmp_path / "x.gz", blob)
  with pytest.raises(CorruptDatasetError, match="gzip") as e:
    data.read_idx(p)
  assert str(p) in str(e.value)


# ---------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_roundtrip(tmp_path, compress):
  images, labels = write_fashion(tmp_path, "test", n=7, compress=compress)
  ds = data.load_fashion_mnist("test", data_dir=tmp_path, download=False)
  assert isinstance(ds, ArrayDataset) and len(ds) == 7 and ds.num_classes == 10
  assert ds.x.dtype == np.uint8 and ds.x.shape == (7, 28, 28, 1)
  assert ds.y.dtype == np.int32
  np.testing.assert_array_equal(ds.x[..., 0], images)
  np.testing.assert_array_equal(ds.y, labels)


def test_fashion_search_order(places):
  env, cache, system = places
  write_fashion(system / "fashion-mnist", seed=3)
  _, labels_cache = write_fashion(cache / "fashion-mnist", seed=2)
  _, labels_env = write_fashion(env / "fashion-mnist", seed=1)
  # Only the test split in env: the train split there is incomplete, so it is skipped.
  (env / "fashion-mnist" / "train-labels-idx1-ubyte.gz").unlink()
  np.testing.assert_array_equal(data.load_fashion_mnist(download=False).y, labels_cache)
  write_fashion(env / "fashion-mnist", seed=1)
  np.testing.assert_array_equal(data.load_fashion_mnist(download=False).y, labels_env)


def test_fashion_not_found_message(places):
  with pytest.raises(DatasetNotFoundError) as e:
    data.load_fashion_mnist("test", download=False)
  msg = str(e.value)
  for d in data.search_paths("fashion-mnist"):
    assert str(d) in msg
  assert len(data.search_paths("fashion-mnist")) == 3
  assert "t10k-images-idx3-ubyte.gz" in msg and "t10k-labels-idx1-ubyte.gz" in msg
  assert "apt-get install dataset-fashion-mnist" in msg
  assert "zalandoresearch/fashion-mnist" in msg and "$OPTAX_LOCALSGD_DATA" in msg
  assert isinstance(e.value, FileNotFoundError)


def test_fashion_checksum_mismatch_writes_nothing(places, monkeypatch):
  _, cache, _ = places
  urls = []

  def fake_fetch(url, timeout_s):
    urls.append(url)
    return gzip.compress(idx_bytes(fashion_arrays(3)[1], 0x08))  # Valid IDX, wrong bytes.

  monkeypatch.setattr(fashion_mnist, "_fetch", fake_fetch)
  with pytest.raises(DatasetNotFoundError, match="sha256 mismatch") as e:
    data.load_fashion_mnist("test")
  assert urls == [fashion_mnist.BASE_URL + "t10k-images-idx3-ubyte.gz"]
  assert "apt-get install" in str(e.value) and str(cache / "fashion-mnist") in str(e.value)
  assert not (cache / "fashion-mnist").exists() or not any((cache / "fashion-mnist").iterdir())


def test_fashion_network_failure(places, monkeypatch):
  def no_network(url, timeout_s):
    raise urllib.error.URLError("name resolution failed")

  monkeypatch.setattr(fashion_mnist, "_fetch", no_network)
  with pytest.raises(DatasetNotFoundError, match="name resolution failed") as e:
    data.load_fashion_mnist("train")
  for d in data.search_paths("fashion-mnist"):
    assert str(d) in str(e.value)


def test_fashion_download_verified_and_atomic(places, monkeypatch):
  _, cache, _ = places
  images, labels = fashion_arrays(4, seed=9)
  served = {"t10k-images-idx3-ubyte.gz": gzip.compress(idx_bytes(images, 0x08)),
            "t10k-labels-idx1-ubyte.gz": gzip.compress(idx_bytes(labels, 0x08))}
  monkeypatch.setattr(fashion_mnist, "GZ_SHA256", {
      **fashion_mnist.GZ_SHA256, **{k: hashlib.sha256(v).hexdigest() for k, v in served.items()}})
  monkeypatch.setattr(fashion_mnist, "_fetch",
                      lambda url, timeout_s: served[url.rsplit("/", 1)[1]])
  ds = data.load_fashion_mnist("test")
  np.testing.assert_array_equal(ds.x[..., 0], images)
  np.testing.assert_array_equal(ds.y, labels)
  assert sorted(p.name for p in (cache / "fashion-mnist").iterdir()) == sorted(served)


def test_fashion_count_mismatch_and_bad_labels(tmp_path):
  images, labels = write_fashion(tmp_path, n=5)
  write(tmp_path / "train-labels-idx1-ubyte.gz", idx_bytes(labels[:4], 0x08), True)
  with pytest.raises(CorruptDatasetError, match="5 images but .* 4 labels"):
    data.load_fashion_mnist(data_dir=tmp_path, download=False)
  write(tmp_path / "train-labels-idx1-ubyte.gz",
        idx_bytes(np.array([0, 1, 2, 10, 3], np.uint8), 0x08), True)
  with pytest.raises(CorruptDatasetError, match="label 10 out of range"):
    data.load_fashion_mnist(data_dir=tmp_path, download=False)


def test_fashion_truncated_file_named(tmp_path):
  write_fashion(tmp_path, n=5)
  p = tmp_path / "train-images-idx3-ubyte.gz"
  p.write_bytes(p.read_bytes()[:-20])
  with pytest.raises(CorruptDatasetError) as e:
    data.load_fashion_mnist(data_dir=tmp_path, download=False)
  assert str(p) in str(e.value)


def test_fashion_real_installed_copy():
  """The Debian-packaged dataset (CI installs dataset-fashion-mnist)."""
  assert REAL_FASHION.is_dir(), "install it: apt-get install dataset-fashion-mnist"
  for split, n in (("train", 60000), ("test", 10000)):
    ds = data.load_fashion_mnist(split, data_dir=REAL_FASHION, download=False)
    assert ds.x.shape == (n, 28, 28, 1) and ds.x.dtype == np.uint8
    assert ds.y.min() == 0 and ds.y.max() == 9
    np.testing.assert_array_equal(np.bincount(ds.y), np.full(10, n // 10))


def test_fashion_installed_files_hold_official_payload():
  """The .gz files are verified either by the published sha256 or by the payload's."""
  for name in fashion_mnist.GZ_SHA256:
    fashion_mnist._check_sha256(name, (REAL_FASHION / name).read_bytes())
  with pytest.raises(CorruptDatasetError, match="sha256 mismatch"):
    fashion_mnist._check_sha256("t10k-labels-idx1-ubyte.gz",
                                (REAL_FASHION / "train-labels-idx1-ubyte.gz").read_bytes())


# ---------------------------------------------------------------- CIFAR-10


def write_python_cifar(directory, sizes=(2, 3, 1, 2, 2), test_size=3, dump=py2_pickle):
  batches = {}
  for i, n in enumerate(sizes, start=1):
    batches[f"data_batch_{i}"] = cifar_batch(n, seed=i)
  batches["test_batch"] = cifar_batch(test_size, seed=99)
  for name, batch in batches.items():
    write(directory / name, dump(batch))
  return batches


def test_cifar_python_py2_pickles_roundtrip(tmp_path):
  batches = write_python_cifar(tmp_path / "cifar-10-batches-py")
  train = data.load_cifar10("train", data_dir=tmp_path)
  rows = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
  labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
  assert train.x.shape == (10, 32, 32, 3) and train.x.dtype == np.uint8
  np.testing.assert_array_equal(train.x, hwc(rows, 32))
  np.testing.assert_array_equal(train.y, labels)
  assert train.y.dtype == np.int32 and train.num_classes == 10
  test = data.load_cifar10("test", data_dir=tmp_path / "cifar-10-batches-py")
  np.testing.assert_array_equal(test.x, hwc(batches["test_batch"][b"data"], 32))


def test_cifar_python_py3_pickle(tmp_path):
  batches = write_python_cifar(tmp_path, dump=lambda b: pickle.dumps(b, protocol=4))
  test = data.load_cifar10("test", data_dir=tmp_path)
  np.testing.assert_array_equal(test.y, batches["test_batch"][b"labels"])


class _RunsShell:
  def __init__(self, sentinel):
    self.sentinel = sentinel

  def __reduce__(self):
    return (os.system, (f"touch {self.sentinel}",))


class _RunsEval:
  def __reduce__(self):
    return (eval, ("__import__('os').system('false')",))


@pytest.mark.parametrize("payload", ["system", "eval"])
def test_cifar_restricted_unpickler_refuses_code(tmp_path, payload):
  sentinel = tmp_path / "pwned"
  if payload == "system":  # The payload is live: a plain unpickler runs it.
    pickle.loads(pickle.dumps(_RunsShell(tmp_path / "control")))
    assert (tmp_path / "control").exists()
  evil = _RunsShell(sentinel) if payload == "system" else _RunsEval()
  write(tmp_path / "test_batch", pickle.dumps({"data": evil, "labels": [0]}, protocol=4))
  with pytest.raises(CorruptDatasetError, match=f"{payload}' is not allowed") as e:
    data.load_cifar10("test", data_dir=tmp_path)
  assert str(tmp_path / "test_batch") in str(e.value)
  assert not sentinel.exists()


@pytest.mark.parametrize("problem,message", [
    ("truncated", "not a valid CIFAR-10 pickle"),
    ("shape", r"must be uint8 of shape \(N, 3072\)"),
    ("labels", "outside 0..9"),
    ("count", "2 images but 1 labels"),
    ("key", "no 'labels' entry"),
])
def test_cifar_python_corrupt_batch(tmp_path, problem, message):
  write_python_cifar(tmp_path)
  bad = cifar_batch(2, seed=5)
  if problem == "shape":
    bad[b"data"] = bad[b"data"][:, :3000].copy()
  elif problem == "labels":
    bad[b"labels"] = [3, 10]
  elif problem == "count":
    bad[b"labels"] = [3]
  elif problem == "key":
    del bad[b"labels"]
  blob = py2_pickle(bad)
  if problem == "truncated":
    blob = blob[:len(blob) // 2]
  p = write(tmp_path / "data_batch_3", blob)
  with pytest.raises(CorruptDatasetError, match=message) as e:
    data.load_cifar10("train", data_dir=tmp_path)
  assert str(p) in str(e.value)


def test_cifar_image_folder_roundtrip(tmp_path):
  tree = image_tree()
  write_tree(tmp_path / "test", tree)
  (tmp_path / "test" / "cat" / "notes.txt").write_text("not an image")
  ds = data.load_cifar10("test", data_dir=tmp_path)
  x, y = expected_from_tree(tree)
  np.testing.assert_array_equal(ds.x, x)
  np.testing.assert_array_equal(ds.y, y)


@pytest.mark.parametrize("prefix", ["test/", "./test/", ""])
def test_cifar_tar_roundtrip(tmp_path, prefix):
  tree = image_tree(seed=1)
  write_tar(tmp_path / "test.tar.gz", tree, prefix)
  ds = data.load_cifar10("test", data_dir=tmp_path)
  x, y = expected_from_tree(tree)
  np.testing.assert_array_equal(ds.x, x)
  np.testing.assert_array_equal(ds.y, y)
  assert not (tmp_path / "test").exists()  # Nothing extracted.


def test_cifar_jpeg_accepted(tmp_path):
  tree = image_tree(n_per_class=1)
  write_tree(tmp_path / "train", tree)
  flat = np.full((32, 32, 3), (200, 30, 90), np.uint8)
  Image.fromarray(flat).save(tmp_path / "train" / "dog" / "extra.JPG", format="JPEG",
                             quality=95)
  ds = data.load_cifar10("train", data_dir=tmp_path)
  assert len(ds) == 11
  i = int(np.flatnonzero(ds.y == CIFAR_CLASSES.index("dog"))[-1])  # "extra" sorts last.
  assert np.abs(ds.x[i].astype(int) - flat).max() <= 4  # Lossy.


def test_cifar_wrong_image_size_named(tmp_path):
  tree = image_tree(n_per_class=1)
  tree[("ship", "0000.png")] = np.zeros((31, 32, 3), np.uint8)
  write_tar(tmp_path / "test.tar.gz", tree, "test/")
  with pytest.raises(CorruptDatasetError, match=r"test/ship/0000.png: image is 32x31"):
    data.load_cifar10("test", data_dir=tmp_path)


def test_cifar_undecodable_image_named(tmp_path):
  write_tree(tmp_path / "test", image_tree(n_per_class=1))
  bad = write(tmp_path / "test" / "frog" / "0001.png", b"\x89PNG\r\n\x1a\n garbage")
  with pytest.raises(CorruptDatasetError, match="cannot decode image") as e:
    data.load_cifar10("test", data_dir=tmp_path)
  assert str(bad) in str(e.value)


def test_cifar_wrong_class_count(tmp_path):
  write_tree(tmp_path / "test", image_tree(n_per_class=1, classes=CIFAR_CLASSES[:9]))
  with pytest.raises(CorruptDatasetError, match="9 class directories"):
    data.load_cifar10("test", data_dir=tmp_path)


def test_cifar_truncated_archive(tmp_path):
  write_tar(tmp_path / "train.tar.gz", image_tree(), "train/")
  p = tmp_path / "train.tar.gz"
  p.write_bytes(p.read_bytes()[:-200])
  with pytest.raises(CorruptDatasetError, match="damaged or truncated archive") as e:
    data.load_cifar10("train", data_dir=tmp_path)
  assert str(p) in str(e.value)


def test_cifar_search_order_and_not_found(places):
  env, cache, _ = places
  with pytest.raises(DatasetNotFoundError) as e:
    data.load_cifar10("test")
  for d in data.search_paths("cifar10"):
    assert str(d) in str(e.value)
  assert "cifar-10-batches-py" in str(e.value) and "test.tar.gz" in str(e.value)
  write_tree(cache / "cifar10" / "test", image_tree(n_per_class=1, seed=0))
  write_python_cifar(env / "cifar10" / "cifar-10-batches-py", test_size=4)
  assert len(data.load_cifar10("test")) == 4  # env before cache.


# ---------------------------------------------------------------- downsampled ImageNet


def write_npz(path, **arrays):
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(path, **arrays)


def test_imagenet_roundtrip_numeric_batch_order(tmp_path):
  r = 8
  batches = {i: (planar_rows(n, r, seed=i), np.arange(1, n + 1) + i)
             for i, n in ((1, 3), (2, 2), (10, 4))}
  for i, (rows, labels) in batches.items():
    write_npz(tmp_path / f"train_data_batch_{i}.npz", data=rows, labels=labels,
              mean=rows.mean(0))
  ds = data.load_imagenet_downsampled("train", data_dir=tmp_path, resolution=r)
  order = (1, 2, 10)  # Not 1, 10, 2.
  np.testing.assert_array_equal(ds.x, hwc(np.concatenate([batches[i][0] for i in order]), r))
  np.testing.assert_array_equal(ds.y, np.concatenate([batches[i][1] for i in order]) - 1)
  assert ds.y.dtype == np.int32 and ds.x.dtype == np.uint8
  assert ds.num_classes == 14 and ds.name == "imagenet8/train"
  ds = data.load_imagenet_downsampled("train", data_dir=tmp_path, resolution=r,
                                      num_classes=1000)
  assert ds.num_classes == 1000
  with pytest.raises(CorruptDatasetError, match=r"label 14 out of range 1..13"):
    data.load_imagenet_downsampled("train", data_dir=tmp_path, resolution=r, num_classes=13)


def test_imagenet_val_search_and_not_found(places):
  env, _, _ = places
  with pytest.raises(DatasetNotFoundError, match="val_data.npz") as e:
    data.load_imagenet_downsampled("val", resolution=64)
  for d in data.search_paths("imagenet64"):
    assert str(d) in str(e.value)
  rows = planar_rows(2, 64, seed=0)
  write_npz(env / "imagenet64" / "val_data.npz", data=rows, labels=np.array([7, 1]))
  ds = data.load_imagenet_downsampled("val", resolution=64)
  np.testing.assert_array_equal(ds.x, rows.reshape(2, 3, 64, 64).transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(ds.y, [6, 0])


@pytest.mark.parametrize("problem,message", [
    ("row", r"rows of 'data' have 3072 values, expected 3\*8\*8=192"),
    ("zero", r"labels span \[0, 2\]"),
    ("key", "missing key 'labels'"),
    ("object", "pickle"),
    ("count", "3 rows of 'data' but 2 labels"),
    ("truncated", "not a readable npz file"),
])
def test_imagenet_corrupt(tmp_path, problem, message):
  rows, labels = planar_rows(3, 8, seed=0), np.array([1, 2, 2])
  arrays = {"data": rows, "labels": labels}
  if problem == "row":
    arrays["data"] = planar_rows(3, 32, seed=0)
  elif problem == "zero":
    arrays["labels"] = np.array([0, 1, 2])
  elif problem == "key":
    del arrays["labels"]
  elif problem == "object":
    arrays["labels"] = np.array([1, 2, 3], dtype=object)
  elif problem == "count":
    arrays["labels"] = labels[:2]
  p = tmp_path / "val_data.npz"
  write_npz(p, **arrays)
  if problem == "truncated":
    p.write_bytes(p.read_bytes()[:100])
  with pytest.raises(CorruptDatasetError, match=message) as e:
    data.load_imagenet_downsampled("val", data_dir=tmp_path, resolution=8)
  assert str(p) in str(e.value)


# ---------------------------------------------------------------- text


def test_text_file_and_splits(tmp_path):
  body = "héllo wörld\n" * 50  # 700 bytes of UTF-8.
  p = tmp_path / "input.txt"
  p.write_bytes(b"\xef\xbb\xbf" + body.encode())
  raw = np.frombuffer(body.encode(), np.uint8)
  train = data.load_text_bytes(p)
  val = data.load_text_bytes(p, "val", val_fraction=0.1)
  assert train.dtype == np.uint8 and val.dtype == np.uint8
  assert len(raw) == 700 and len(val) == 70 and len(train) == 693
  np.testing.assert_array_equal(data.load_text_bytes(p, "train", 0.1), raw[:630])
  np.testing.assert_array_equal(val, raw[630:])
  np.testing.assert_array_equal(train, raw[:693])


def test_text_directory_sorted_with_boms(tmp_path):
  (tmp_path / "valid.txt").write_bytes(b"\xef\xbb\xbf = B = \n")
  (tmp_path / "test.txt").write_bytes(b"\xef\xbb\xbf = A =")  # No final newline.
  (tmp_path / "readme.md").write_text("ignored")
  got = data.load_text_bytes(tmp_path, "train", val_fraction=0.5)
  val = data.load_text_bytes(tmp_path, "val", val_fraction=0.5)
  assert bytes(got) + bytes(val) == b" = A =\n = B = \n"


def test_text_errors(tmp_path):
  with pytest.raises(DatasetNotFoundError, match="does not exist"):
    data.load_text_bytes(tmp_path / "missing.txt")
  (tmp_path / "corpus").mkdir()
  (tmp_path / "corpus" / "a.txt").write_bytes(b"")
  with pytest.raises(CorruptDatasetError, match="is empty"):
    data.load_text_bytes(tmp_path / "corpus")
  with pytest.raises(DatasetNotFoundError, match="Directories below it that have some"):
    data.load_text_bytes(tmp_path)
  bad = tmp_path / "corpus" / "b.txt"
  bad.write_bytes(b"ok \xff\xfe")
  with pytest.raises(CorruptDatasetError, match="invalid byte at offset 3") as e:
    data.load_text_bytes(tmp_path / "corpus")
  assert str(bad) in str(e.value)
  with pytest.raises(ValueError, match="val_fraction"):
    data.load_text_bytes(bad, val_fraction=1.0)


# ---------------------------------------------------------------- split and dataset


@given(n=st.integers(1, 500), k=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_split_homogeneous_properties(n, k, seed):
  if n < k:
    with pytest.raises(ValueError, match="n < k"):
      data.split_homogeneous(n, k, seed)
    return
  shards = data.split_homogeneous(n, k, seed)
  assert shards.shape == (k, n // k) and shards.dtype == np.int32
  flat = shards.ravel()
  assert len(np.unique(flat)) == flat.size  # Disjoint.
  assert flat.min() >= 0 and flat.max() < n
  np.testing.assert_array_equal(shards, data.split_homogeneous(n, k, seed))


def test_split_homogeneous_seeded():
  a = data.split_homogeneous(1000, 8, seed=0)
  assert not np.array_equal(a, data.split_homogeneous(1000, 8, seed=1))
  assert not np.array_equal(a.ravel(), np.arange(1000)[:1000])  # Shuffled.
  with pytest.raises(ValueError):
    data.split_homogeneous(10, 0, seed=0)


def test_array_dataset_validates():
  x, y = np.zeros((3, 2, 2, 1), np.uint8), np.array([0, 1, 2], np.int32)
  assert len(ArrayDataset(x, y, 3, "ok")) == 3
  with pytest.raises(ValueError, match="3 examples but 2 labels"):
    ArrayDataset(x, y[:2], 3, "bad")
  with pytest.raises(ValueError, match="outside"):
    ArrayDataset(x, y, 2, "bad")
