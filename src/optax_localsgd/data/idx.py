"""Reader for the IDX format of (Fashion-)MNIST, plain or gzip-compressed.

An IDX file is a 4-byte magic number ``00 00 <dtype code> <ndim>``, then ``ndim`` big-endian
uint32 dimension sizes, then the values in row-major order, big-endian. Gzip compression is
detected from the first two bytes (``1f 8b``), not from the file name. The payload must have
exactly the length the header declares: trailing bytes are an error, as is a short payload.
Decompression reads only as many bytes as the header declares (plus one, to detect extra
data), so a damaged or hostile archive cannot make the reader allocate more than that.
"""

from __future__ import annotations

import gzip
import math
import os
import pathlib
import struct
import zlib
from typing import BinaryIO

import numpy as np

from optax_localsgd.data.errors import CorruptDatasetError

GZIP_MAGIC = b"\x1f\x8b"
# IDX dtype code -> big-endian NumPy dtype.
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# Refuse headers declaring more than this many payload bytes (the largest real IDX file,
# MNIST-style 60000x28x28, is 47 MB; EMNIST-by-class is ~550 MB).
MAX_PAYLOAD_BYTES = 4 << 30


def _read_exact(f: BinaryIO, n: int, path: pathlib.Path, what: str) -> bytes:
  data = f.read(n)
  if len(data) != n:
    raise CorruptDatasetError(f"{path}: truncated IDX file, {what} is {len(data)} bytes, "
                              f"expected {n}.")
  return data


def _read_into(f: BinaryIO, out: memoryview) -> int:
  """Fill ``out`` from ``f``; returns how many bytes were read (less at end of stream)."""
  got = 0
  while got < len(out):
    n = f.readinto(out[got:])
    if not n:
      break
    got += n
  return got


def _parse(f: BinaryIO, path: pathlib.Path) -> np.ndarray:
  magic = _read_exact(f, 4, path, "the magic number")
  if magic[:2] != b"\x00\x00":
    raise CorruptDatasetError(f"{path}: not an IDX file, magic number {magic.hex()} does not "
                              f"start with 0000.")
  code, ndim = magic[2], magic[3]
  if code not in IDX_DTYPES:
    raise CorruptDatasetError(f"{path}: unknown IDX dtype code 0x{code:02x} (known: "
                              f"{', '.join(f'0x{c:02x}' for c in IDX_DTYPES)}).")
  if ndim == 0:
    raise CorruptDatasetError(f"{path}: IDX header declares 0 dimensions.")
  dims = struct.unpack(f">{ndim}I", _read_exact(f, 4 * ndim, path, "the dimension list"))
  dtype = IDX_DTYPES[code]
  nbytes = math.prod(dims) * dtype.itemsize
  if nbytes > MAX_PAYLOAD_BYTES:
    raise CorruptDatasetError(f"{path}: IDX header declares dims {dims} ({nbytes} bytes), "
                              f"more than the {MAX_PAYLOAD_BYTES}-byte limit.")
  out = np.empty(dims, dtype)
  got = _read_into(f, memoryview(out.reshape(-1).view(np.uint8)))
  if got != nbytes:
    raise CorruptDatasetError(f"{path}: truncated IDX file, header declares dims {dims} "
                              f"({nbytes} payload bytes) but only {got} follow.")
  if f.read(1):
    raise CorruptDatasetError(f"{path}: IDX file has bytes after the {nbytes}-byte payload "
                              f"declared by dims {dims}.")
  return out.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
  """Read an IDX file (optionally gzip-compressed) into an array of the declared shape.

  Args:
    path: the file.

  Returns:
    A new writable array with the header's dimensions and dtype, in native byte order.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    CorruptDatasetError: bad magic number or dtype code, truncated header or payload, extra
      bytes, or a damaged gzip stream; the message names the file.
  """
  path = pathlib.Path(path)
  with open(path, "rb") as raw:
    compressed = raw.read(2) == GZIP_MAGIC
    raw.seek(0)
    if not compressed:
      return _parse(raw, path)
    try:
      with gzip.GzipFile(fileobj=raw, mode="rb") as f:
        return _parse(f, path)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
      raise CorruptDatasetError(f"{path}: damaged or truncated gzip stream "
                                f"({type(e).__name__}: {e}).") from e
