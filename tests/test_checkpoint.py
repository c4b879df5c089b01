"""Checkpoints of arbitrary pytrees (io.checkpoint): bit-exact, verified, atomic, no pickles."""

import os
import zipfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ArmedPickle, bits, read_npz

from optax_localsgd.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

_bits, _read_all = bits, read_npz


def _rewrite(path, arrays):
  """Writes an npz with NumPy's own writer (independent of the code under test)."""
  with open(path, "wb") as f:
    np.savez(f, **arrays)

class Inner(NamedTuple):
  count: jax.Array
  acc: dict


def _state():
  special = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45, 3.4e38], np.float32)
  special_bits = special.view(np.uint32).copy()
  special_bits[0] = 0x7FC01234  # NaN with a payload
  return {
      "theta": {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32),
                "special": jnp.asarray(special_bits.view(np.float32))},
      "inner": (Inner(count=jnp.int32(-7), acc={"m": jnp.arange(5, dtype=jnp.uint32) * 2**30,
                                                 "v": [np.float32([1.5, 2.5])]}),
                jnp.zeros((0, 3), jnp.float32)),
      "step": jnp.int32(123),
      "key": jax.random.PRNGKey(42),
      "typed_key": jax.random.split(jax.random.key(3), 2),
      "half": jnp.asarray([1.0, -2.5, 3e-3], jnp.bfloat16),
      "np_scalar": np.int32(5),
      "py_int": 3,
      "py_float": 0.1,
  }


def _tree_bits(tree, with_types=True):
  def one(x):
    if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
      return ("key", str(jax.random.key_impl(x)), _bits(jax.random.key_data(x)))
    return (type(x).__name__ if with_types else None, _bits(x))
  return jax.tree.map(one, tree)


META = {"config": {"optimizer": "lopt_a", "workers": 8, "tasks": ["a", "b"]},
        "log": {"meta_loss": [1.0, float("nan")], "step": [1, 2]}}


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
  path = tmp_path / "checkpoint.npz"
  state = _state()
  save_checkpoint(path, state, META)
  template = jax.tree.map(lambda x: x, _state())
  restored, meta = load_checkpoint(path, template, {"config": META["config"]})
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert _tree_bits(restored) == _tree_bits(state)
  assert isinstance(restored["inner"][0], Inner)
  assert restored["py_int"] == 3 and type(restored["py_int"]) is int
  assert type(restored["py_float"]) is float and restored["py_float"] == 0.1
  assert isinstance(restored["np_scalar"], np.int32)
  assert isinstance(restored["inner"][0].acc["v"][0], np.ndarray)
  assert isinstance(restored["step"], jax.Array) and restored["step"].dtype == jnp.int32
  assert meta["config"] == META["config"] and np.isnan(meta["log"]["meta_loss"][1])
  assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"]


def test_checkpoint_restores_into_abstract_template(tmp_path):
  path = tmp_path / "c.npz"
  state = {k: v for k, v in _state().items() if k not in ("np_scalar", "py_int", "py_float")}
  save_checkpoint(path, state, {})
  abstract = jax.eval_shape(lambda: state)
  restored, _ = load_checkpoint(path, abstract)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))
  assert _tree_bits(restored, with_types=False) == _tree_bits(state, with_types=False)


def test_checkpoint_configuration_mismatch(tmp_path):
  path = tmp_path / "c.npz"
  save_checkpoint(path, _state(), META)

  def expect(template, message, expected_meta=None):
    with pytest.raises(CheckpointError, match=message) as e:
      load_checkpoint(path, template, expected_meta)
    assert str(path) in str(e.value)
    assert "different configuration" in str(e.value)

  s = _state()
  s["theta"]["w"] = jnp.zeros((4, 4), jnp.float32)
  expect(s, r"leaf \d+ \(\['theta'\]\['w'\]\) has shape \(4, 3\) in the checkpoint but "
            r"\(4, 4\) here")
  s = _state()
  s["step"] = jnp.float32(123)
  expect(s, r"\['step'\]\) has dtype int32 in the checkpoint but float32 here")
  s = _state()
  s["extra"] = jnp.zeros(2)
  expect(s, "it has 13 leaves, the template here has 14")
  s = _state()
  s["theta"] = {"w2": s["theta"]["w"], "special": s["theta"]["special"]}
  expect(s, r"is \['theta'\]\['w'\] in the checkpoint but \['theta'\]\['w2'\] here")
  s = _state()
  s["inner"] = list(s["inner"])  # same paths and leaves, different node type
  expect(s, "tree structure")
  expect(_state(), "'config' is different.*'workers': stored 8, expected 16",
         {"config": {**META["config"], "workers": 16}})
  expect(_state(), "'seed' .*expected 0", {"seed": 0})
  expect(_state(), r"'log' is .* in the checkpoint, expected 'x'", {"log": "x"})
  # Tuples in expected_meta equal the JSON lists stored.
  load_checkpoint(path, _state(), {"config": {**META["config"], "tasks": ("a", "b")}})


def test_checkpoint_corruption(tmp_path):
  path = tmp_path / "c.npz"
  save_checkpoint(path, _state(), META)
  data = path.read_bytes()
  for n in (0, 100, len(data) // 2, len(data) - 1):
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match=f"corrupt checkpoint {path}"):
      load_checkpoint(path, _state())

  path.write_bytes(data)
  arrays = _read_all(path)
  arrays["leaf_00000"] = arrays["leaf_00000"].copy()
  arrays["leaf_00000"].flat[0] ^= 1
  _rewrite(path, arrays)
  with pytest.raises(CheckpointError, match=f"corrupt checkpoint {path}: .*sha256"):
    load_checkpoint(path, _state())

  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("leaf_00000.npy", b"junk")
  with pytest.raises(CheckpointError, match="no '__metadata__'"):
    load_checkpoint(path, _state())

  with pytest.raises(FileNotFoundError):
    load_checkpoint(tmp_path / "none.npz", _state())
  assert issubclass(CheckpointError, ValueError)


def test_checkpoint_refuses_pickles(tmp_path):
  path = tmp_path / "c.npz"
  save_checkpoint(path, {"a": jnp.zeros(2)}, {})
  arrays = _read_all(path)
  armed = tmp_path / "armed"
  evil = np.empty(1, dtype=object)
  evil[0] = ArmedPickle(armed)
  arrays["leaf_00000"] = evil
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  with pytest.raises(CheckpointError, match="corrupt checkpoint"):
    load_checkpoint(path, {"a": jnp.zeros(2)})
  assert not armed.exists()


def test_checkpoint_overwrite_is_atomic(tmp_path, monkeypatch):
  path = tmp_path / "c.npz"
  save_checkpoint(path, {"a": jnp.zeros(2)}, {"step": 1})
  before = path.read_bytes()

  def boom(*args):
    raise KeyboardInterrupt

  monkeypatch.setattr(os, "replace", boom)
  with pytest.raises(KeyboardInterrupt):
    save_checkpoint(path, {"a": jnp.ones(2)}, {"step": 2})
  monkeypatch.undo()
  assert path.read_bytes() == before
  assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]
  save_checkpoint(path, {"a": jnp.ones(2)}, {"step": 2})
  tree, meta = load_checkpoint(path, {"a": jnp.zeros(2)}, {"step": 2})
  assert meta == {"step": 2} and np.array_equal(tree["a"], np.ones(2))


