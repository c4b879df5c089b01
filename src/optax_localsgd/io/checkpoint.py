"""Atomic, verified checkpoints of arbitrary pytrees (meta-training state) as one ``.npz``.

Layout: every leaf of the tree, in ``jax.tree.leaves`` order, as ``leaf_00000``,
``leaf_00001``, ... and a ``__metadata__`` entry (1-D uint8 array of UTF-8 JSON)::

    {"format": "optax-localsgd-checkpoint", "format_version": 1,
     "meta": <caller's dict>, "treedef": str(jax.tree.structure(tree)), "jax_version": ...,
     "leaves": [{"path": "['a'].b[0]", "shape": [...], "dtype": "float32"}, ...],
     "leaves_sha256": "<hex>"}

Leaves are stored bit-exactly, little-endian. Leaves whose dtype NumPy cannot store natively
(``bfloat16``, float8, ... from ``ml_dtypes``) are stored as unsigned integers of the same width
and viewed back on load; typed PRNG key arrays (``jax.random.key``) are stored as their
``jax.random.key_data`` and re-wrapped with the stored implementation. Raw ``uint32`` keys
(``jax.random.PRNGKey``) are ordinary arrays.

Files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_localsgd.io.npz import (METADATA_KEY, arrays_sha256, little_endian, open_npz,
                                   read_member, read_metadata, write_npz_atomic)

FORMAT = "optax-localsgd-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
  """A checkpoint is corrupt, or does not fit the run it is being restored into."""


def _leaf_name(i: int) -> str:
  return f"leaf_{i:05d}"


def _is_key(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _leaf_spec(x: Any) -> tuple[tuple[int, ...], str]:
  """(shape, dtype name) of a leaf or template leaf (array, ShapeDtypeStruct or scalar)."""
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return tuple(int(d) for d in x.shape), str(x.dtype)
  arr = np.asarray(x)
  return arr.shape, str(arr.dtype)


def _to_storable(x: Any) -> tuple[np.ndarray, dict]:
  """A leaf as a little-endian NumPy array plus the per-leaf metadata needed to restore it."""
  extra = {}
  if _is_key(x):
    extra["key_impl"] = str(jax.random.key_impl(x))
    arr = np.asarray(jax.random.key_data(x))
  else:
    arr = np.asarray(x)
    if arr.dtype.kind == "V":  # ml_dtypes (bfloat16, float8, int4, ...): store the raw bits.
      arr = arr.view(np.dtype(f"u{arr.dtype.itemsize}"))
  if arr.dtype == object:
    raise TypeError(f"cannot checkpoint a leaf of type {type(x).__name__} (object array).")
  return little_endian(arr), extra


def save_checkpoint(path: str | os.PathLike, tree: Any, meta: Mapping[str, Any]) -> None:
  """Writes ``tree`` and ``meta`` to ``path`` (an ``.npz``) atomically.

  The file is written to a temporary file in the same folder, fsync'ed, then
  ``os.replace``'d over ``path``: an interruption leaves the previous checkpoint intact.

  Args:
    path: destination file (conventionally ending in ``.npz``); its folder must exist.
    tree: any pytree of arrays (JAX or NumPy, including typed PRNG keys) and Python/NumPy
      scalars. Leaves are fetched to host memory.
    meta: JSON-serializable dict (e.g. the run's configuration and its log so far). NaN/inf
      floats are allowed (written as Python's JSON extension).

  Raises:
    TypeError: a leaf or ``meta`` that cannot be stored.
  """
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  arrays, specs = {}, []
  for i, (kp, leaf) in enumerate(paths_leaves):
    arr, extra = _to_storable(leaf)
    shape, dtype = _leaf_spec(leaf)
    arrays[_leaf_name(i)] = arr
    specs.append({"path": jax.tree_util.keystr(kp), "shape": list(shape), "dtype": dtype,
                  **extra})
  header = {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "meta": dict(meta),
      "treedef": str(treedef),
      "jax_version": jax.__version__,
      "leaves": specs,
      "leaves_sha256": arrays_sha256(arrays),
  }
  text = json.dumps(header, sort_keys=True, allow_nan=True, ensure_ascii=False)
  arrays[METADATA_KEY] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
  write_npz_atomic(path, arrays)


def _restore_leaf(arr: np.ndarray, spec: dict, template: Any) -> Any:
  """The stored array converted to the kind of ``template``'s leaf (same dtype and shape)."""
  shape = tuple(spec["shape"])
  if _is_key(template):
    keys = jax.random.wrap_key_data(jnp.asarray(arr), impl=spec["key_impl"])
    if keys.shape != shape:
      raise ValueError(f"key data of shape {arr.shape} gives keys of shape {keys.shape}, "
                       f"recorded {shape}")
    return keys
  dtype = np.dtype(jnp.dtype(spec["dtype"]))
  stored_dtype = np.dtype(f"u{dtype.itemsize}") if dtype.kind == "V" else dtype
  if arr.dtype.newbyteorder("=") != stored_dtype.newbyteorder("=") or arr.shape != shape:
    raise ValueError(f"stored as {arr.dtype} {arr.shape}, recorded as {spec['dtype']} {shape}")
  arr = arr.astype(stored_dtype.newbyteorder("="), copy=False)
  if dtype.kind == "V":
    arr = arr.view(dtype)
  if isinstance(template, (jax.Array, jax.ShapeDtypeStruct)):
    return jnp.asarray(arr)
  if isinstance(template, np.ndarray):
    return arr
  if isinstance(template, np.generic):
    return arr[()]
  if isinstance(template, (bool, int, float, complex)):
    return arr.item()
  return jnp.asarray(arr)


def load_checkpoint(path: str | os.PathLike, like_tree: Any,
                    expected_meta: Mapping[str, Any] | None = None) -> tuple[Any, dict]:
  """Restores a checkpoint written by :func:`save_checkpoint` into ``like_tree``'s structure.

  Args:
    path: the checkpoint file.
    like_tree: a template with the same structure, shapes and dtypes (e.g. a freshly
      initialized state, or ``jax.eval_shape`` of its initializer). Each restored leaf has the
      template leaf's kind: ``jax.Array`` (also for ``ShapeDtypeStruct``), ``np.ndarray``,
      NumPy scalar or Python scalar.
    expected_meta: keys that must equal those stored in the checkpoint's ``meta`` (compared
      after a JSON round trip, so tuples equal lists).

  Returns:
    ``(tree, meta)``: the restored tree (bit-exact) and the stored ``meta`` dict.

  Raises:
    FileNotFoundError: there is no file at ``path``.
    CheckpointError: the file is unreadable, truncated or not a checkpoint ("corrupt
      checkpoint ..."), its leaves do not match their recorded sha256, its structure, shapes
      or dtypes differ from ``like_tree`` ("... written for a different configuration ..."),
      or a key of ``expected_meta`` differs from the stored value.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no checkpoint at {path}")
  corrupt = f"corrupt checkpoint {path}:"
  with open_npz(path, "corrupt checkpoint", CheckpointError) as npz:
    header = read_metadata(npz, path, "corrupt checkpoint", CheckpointError)
    if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
      raise CheckpointError(
          f"{path} is not an optax-localsgd checkpoint of format version {FORMAT_VERSION} "
          f"(format {header.get('format')!r}, version {header.get('format_version')!r}).")
    specs = header.get("leaves")
    if not isinstance(specs, list) or not all(isinstance(s, dict) for s in specs):
      raise CheckpointError(f"{corrupt} invalid 'leaves' metadata.")
    expected_names = {_leaf_name(i) for i in range(len(specs))}
    names = set(npz.files) - {METADATA_KEY}
    if names != expected_names:
      raise CheckpointError(
          f"{corrupt} expected {len(specs)} leaves, found entries "
          f"{sorted(names ^ expected_names)[:5]} missing or unexpected.")
    arrays = {n: read_member(npz, n, path, "corrupt checkpoint", CheckpointError)
              for n in sorted(names)}
  if arrays_sha256(arrays) != header.get("leaves_sha256"):
    raise CheckpointError(f"{corrupt} its leaves do not match their recorded sha256 "
                          f"(the file was modified or damaged).")
  meta = header.get("meta")
  if not isinstance(meta, dict):
    raise CheckpointError(f"{corrupt} 'meta' is not a JSON object.")

  if expected_meta:
    expected = json.loads(json.dumps(dict(expected_meta), allow_nan=True))
    for key, want in expected.items():
      if key not in meta:
        raise CheckpointError(
            f"checkpoint {path} was written for a different configuration: it has no "
            f"{key!r} (expected {want!r}).")
      if meta[key] != want:
        raise CheckpointError(
            f"checkpoint {path} was written for a different configuration: {key!r} is "
            f"{_describe_diff(meta[key], want)}.")

  different = f"checkpoint {path} was written for a different configuration:"
  tmpl_paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(like_tree)
  if len(tmpl_paths_leaves) != len(specs):
    raise CheckpointError(f"{different} it has {len(specs)} leaves, the template here has "
                          f"{len(tmpl_paths_leaves)}.")
  for i, ((kp, tmpl), spec) in enumerate(zip(tmpl_paths_leaves, specs)):
    where = jax.tree_util.keystr(kp)
    if spec.get("path") != where:
      raise CheckpointError(f"{different} leaf {i} is {spec.get('path')} in the checkpoint "
                            f"but {where} here.")
    shape, dtype = _leaf_spec(tmpl)
    if tuple(spec.get("shape", ())) != shape:
      raise CheckpointError(f"{different} leaf {i} ({where}) has shape "
                            f"{tuple(spec.get('shape', ()))} in the checkpoint but {shape} "
                            f"here.")
    if spec.get("dtype") != dtype:
      raise CheckpointError(f"{different} leaf {i} ({where}) has dtype {spec.get('dtype')} in "
                            f"the checkpoint but {dtype} here.")
  # Paths do not distinguish e.g. a tuple from a list or one NamedTuple from another; the
  # treedef string does. Its formatting may change between JAX versions, so only compare it
  # when the checkpoint was written by this JAX version.
  if header.get("jax_version") == jax.__version__ and header.get("treedef") != str(treedef):
    raise CheckpointError(f"{different} its tree structure is\n  {header.get('treedef')}\n"
                          f"but here it is\n  {treedef}")
  try:
    leaves = [_restore_leaf(arrays[_leaf_name(i)], spec, tmpl)
              for i, ((_, tmpl), spec) in enumerate(zip(tmpl_paths_leaves, specs))]
  except (TypeError, ValueError, KeyError) as e:
    raise CheckpointError(f"{corrupt} cannot restore a leaf: {e}") from e
  return jax.tree.unflatten(treedef, leaves), meta


def _describe_diff(stored: Any, expected: Any) -> str:
  """``stored X, expected Y``; for dicts, only the differing sub-keys."""
  if isinstance(stored, dict) and isinstance(expected, dict):
    keys = sorted(set(stored) | set(expected))
    parts = [f"{k!r}: stored {stored.get(k, '<missing>')!r}, expected "
             f"{expected.get(k, '<missing>')!r}" for k in keys
             if stored.get(k, object()) != expected.get(k, object())]
    return "different (" + "; ".join(parts) + ")"
  return f"{stored!r} in the checkpoint, expected {expected!r}"
