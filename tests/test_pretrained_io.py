"""Weight files (optax_localsgd.pretrained) and meta-training checkpoints (io.checkpoint)."""

import json
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_meta

from optax_localsgd import init_lagg_a, init_lopt_a, lopt_a, pretrained
from optax_localsgd.io import locate
from optax_localsgd.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

INFO = {"optimizer": "lopt_a", "K": 8, "H": 4, "tasks": ["fmnist_mlp"], "outer_steps": 3,
        "final_meta_loss": 0.25, "command": "optax-localsgd meta-train --k 8"}


def _bits(x):
  """The raw bytes of an array, so comparisons are bit-exact (NaN payloads, -0.0 included)."""
  x = np.asarray(x)
  return x.dtype.str, x.shape, x.tobytes()


def _meta(kind):
  key = jax.random.PRNGKey(0)
  base = init_lopt_a(key) if kind == "lopt_a" else init_lagg_a(key, 8)
  return random_meta(base, seed=1)


@pytest.fixture(scope="module")
def lopt_meta():
  return _meta("lopt_a")


@pytest.fixture
def saved(tmp_path, lopt_meta):
  path = tmp_path / "w.npz"
  digest = pretrained.save(path, lopt_meta, INFO)
  return path, digest


def _read_all(path):
  with np.load(path, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def _read_json(arrays):
  return json.loads(arrays["__metadata__"].tobytes().decode("utf-8"))


def _rewrite(path, arrays, meta=None):
  """Writes an npz with NumPy's own writer (independent of the code under test)."""
  arrays = dict(arrays)
  if meta is not None:
    arrays["__metadata__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  with open(path, "wb") as f:
    np.savez(f, **arrays)


# ---------------------------------------------------------------------------------------------
# Weight files.


@pytest.mark.parametrize("kind", ["lopt_a", "lagg_a"])
def test_round_trip_is_bit_identical(tmp_path, kind):
  meta = _meta(kind)
  path = tmp_path / f"{kind}.npz"
  digest = pretrained.save(path, meta, INFO)
  assert digest == pretrained.file_sha256(path)
  assert len(digest) == 64
  loaded = pretrained.load(path, expected_sha256=digest)
  assert loaded.config == meta.config
  assert isinstance(loaded.config.initial_decays, tuple)
  assert sorted(loaded.mlp) == sorted(meta.mlp)
  for k in meta.mlp:
    assert _bits(loaded.mlp[k]) == _bits(meta.mlp[k]), k
  assert _bits(loaded.decay_offsets) == _bits(meta.decay_offsets)
  if kind == "lagg_a":
    assert loaded.config.num_workers == 8 and loaded.mlp["w0"].shape == (46, 32)
  # A str path ending in .npz is a path too.
  assert _bits(pretrained.load(str(path)).mlp["w2"]) == _bits(meta.mlp["w2"])
  md = pretrained.metadata(path)
  assert md["format"] == "optax-localsgd-weights" and md["format_version"] == 1
  assert md["info"] == INFO and md["config"]["kind"] == kind
  assert set(_read_all(path)) == set(pretrained.ARRAY_NAMES) | {"__metadata__"}


def test_save_is_reproducible_and_atomic(tmp_path, lopt_meta):
  a = pretrained.save(tmp_path / "a.npz", lopt_meta, INFO)
  b = pretrained.save(tmp_path / "b.npz", lopt_meta, INFO)
  assert a == b
  c = pretrained.save(tmp_path / "a.npz", lopt_meta, {**INFO, "outer_steps": 4})  # overwrite
  assert c != a and c == pretrained.file_sha256(tmp_path / "a.npz")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz"]  # no temp files


def test_failed_save_keeps_old_file_and_leaves_no_temp(tmp_path, lopt_meta, monkeypatch):
  path = tmp_path / "w.npz"
  digest = pretrained.save(path, lopt_meta, INFO)

  def boom(*args):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", boom)
  with pytest.raises(OSError, match="disk full"):
    pretrained.save(path, lopt_meta, {**INFO, "K": 16})
  monkeypatch.undo()
  assert pretrained.file_sha256(path) == digest
  assert [p.name for p in tmp_path.iterdir()] == ["w.npz"]


def test_save_rejects_bad_input(tmp_path, lopt_meta):
  with pytest.raises(ValueError, match=r"\.npz"):
    pretrained.save(tmp_path / "w.bin", lopt_meta, INFO)
  with pytest.raises(ValueError, match="strict JSON"):
    pretrained.save(tmp_path / "w.npz", lopt_meta, {"final_meta_loss": float("nan")})
  with pytest.raises(ValueError, match="strict JSON"):
    pretrained.save(tmp_path / "w.npz", lopt_meta, {"x": object()})
  bad = type(lopt_meta)(mlp={**lopt_meta.mlp, "w1": jnp.zeros((3, 3))},
                        decay_offsets=lopt_meta.decay_offsets, config=lopt_meta.config)
  with pytest.raises(ValueError, match="w1 has shape"):
    pretrained.save(tmp_path / "w.npz", bad, INFO)
  assert not list(tmp_path.iterdir())


def test_loaded_weights_drive_lopt_a(saved, lopt_meta):
  path, _ = saved
  params = {"w": jnp.arange(6.0, dtype=jnp.float32).reshape(3, 2), "b": jnp.ones(2)}
  deltas = jax.tree.map(lambda p: 0.01 * p + 0.001, params)
  outs = []
  for meta in (pretrained.load(path), lopt_meta):
    tx = lopt_a(meta)
    updates, state = tx.update(deltas, tx.init(params), params)
    outs.append(updates)
  for k in params:
    assert outs[0][k].shape == params[k].shape
    assert np.all(np.isfinite(outs[0][k]))
    assert _bits(outs[0][k]) == _bits(outs[1][k])
  assert int(state.count) == 1


def test_truncated_file_is_refused(saved):
  path, _ = saved
  data = path.read_bytes()
  for n in (0, 10, len(data) // 2, len(data) - 5):
    path.write_bytes(data[:n])
    with pytest.raises(ValueError, match=f"{path.name}.*(not a readable|corrupt)"):
      pretrained.load(path)


def test_flipped_byte_in_array_is_refused(saved, lopt_meta):
  path, _ = saved
  data = bytearray(path.read_bytes())
  raw = np.asarray(lopt_meta.mlp["w1"]).tobytes()
  at = data.find(raw[:64])
  assert at > 0
  data[at + 100] ^= 0x01
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=f"{path.name}.*corrupt"):
    pretrained.load(path)


def test_modified_arrays_fail_the_arrays_hash(saved):
  path, _ = saved
  arrays = _read_all(path)
  arrays["decay_offsets"] = arrays["decay_offsets"] + np.float32(1e-3)
  _rewrite(path, arrays)  # zip CRCs are fresh; only arrays_sha256 can tell
  with pytest.raises(ValueError, match=f"{path.name} is corrupt or modified"):
    pretrained.load(path)
  pretrained.metadata(path)  # the metadata alone is still readable


def _edit_metadata(path, fn):
  arrays = _read_all(path)
  meta = _read_json(arrays)
  fn(meta)
  del arrays["__metadata__"]
  _rewrite(path, arrays, meta)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format="something-else"), "format tag 'something-else'"),
    (lambda m: m.update(format_version=2), "format_version 2.*upgrade"),
    (lambda m: m.update(format_version="1"), "invalid format_version"),
    (lambda m: m["config"].update(hidden_size=16), r"mlp/w0 has shape \(39, 32\).*\(39, 16\)"),
    (lambda m: m["config"].update(kind="lagg_a", num_workers=8), r"mlp/w0.*\(46, 32\)"),
    (lambda m: m["config"].update(initial_decays=[0.5] * 6), "invalid config"),
    (lambda m: m["config"].update(new_field=1), "unknown config fields"),
    (lambda m: m["config"].update(feature_set="ada-v9"), "feature set 'ada-v9'"),
    (lambda m: m.update(arrays_sha256="0" * 64), "corrupt or modified"),
])
def test_edited_metadata_is_refused(saved, edit, message):
  path, _ = saved
  _edit_metadata(path, edit)
  with pytest.raises(ValueError, match=message) as e:
    pretrained.load(path)
  assert path.name in str(e.value)


def test_info_is_descriptive_and_not_covered_by_the_arrays_hash(saved):
  path, digest = saved
  _edit_metadata(path, lambda m: m["info"].update(K=16))
  assert pretrained.load(path).config.kind == "lopt_a"
  assert pretrained.metadata(path)["info"]["K"] == 16
  with pytest.raises(ValueError, match="expected"):  # only the published file hash catches it
    pretrained.load(path, expected_sha256=digest)


def test_missing_extra_and_misshaped_arrays(saved):
  path, _ = saved
  good = _read_all(path)
  cases = [
      ({k: v for k, v in good.items() if k != "mlp/b1"}, r"missing \['mlp/b1'\]"),
      ({**good, "mlp/w3": np.zeros(2, np.float32)}, r"unexpected \['mlp/w3'\]"),
      ({**good, "mlp/b2": np.zeros(3, np.float32)}, r"mlp/b2 has shape \(3,\)"),
      ({**good, "mlp/b2": good["mlp/b2"].astype(np.float64)}, "dtype float64"),
      ({k: v for k, v in good.items() if k != "__metadata__"}, "no '__metadata__'"),
      ({**good, "__metadata__": np.frombuffer(b"{not json", np.uint8)}, "not valid UTF-8 JSON"),
      ({**good, "__metadata__": np.frombuffer(b"[1, 2]", np.uint8)}, "JSON object"),
      ({**good, "__metadata__": np.zeros(3, np.float32)}, "uint8"),
  ]
  for arrays, message in cases:
    _rewrite(path, arrays)
    with pytest.raises(ValueError, match=message):
      pretrained.load(path)


def test_not_an_npz(tmp_path):
  npy = tmp_path / "a.npz"
  with open(npy, "wb") as f:
    np.save(f, np.zeros(3))
  with pytest.raises(ValueError, match="single .npy array"):
    pretrained.load(npy)
  text = tmp_path / "b.npz"
  text.write_text("hello")
  with pytest.raises(ValueError, match="b.npz is not a readable .npz"):
    pretrained.metadata(text)
  with pytest.raises(ValueError, match="does not exist"):
    pretrained.load(tmp_path / "missing.npz")


def test_expected_sha256(saved):
  path, digest = saved
  assert pretrained.load(path, expected_sha256=digest.upper()).config.kind == "lopt_a"
  with pytest.raises(ValueError, match=f"{path.name} has sha256 {digest}, expected 00"):
    pretrained.load(path, expected_sha256="00" * 32)


class _Payload:
  """Unpickling this creates the file ``marker``: proof that code ran."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_pickled_content_is_refused_without_running_it(saved, tmp_path):
  path, _ = saved
  arrays = _read_all(path)
  evil = np.empty(1, dtype=object)
  armed = tmp_path / "armed"
  evil[0] = _Payload(armed)
  arrays["mlp/w0"] = evil
  with open(path, "wb") as f:
    np.savez(f, **arrays)  # NumPy pickles object arrays by default when writing
  # The payload is live: NumPy with allow_pickle=True would run it.
  with np.load(path, allow_pickle=True) as z:
    z["mlp/w0"]
  assert armed.exists()
  armed.unlink()
  with pytest.raises(ValueError, match=f"{path.name} is corrupt or unreadable.*mlp/w0"):
    pretrained.load(path)
  assert not armed.exists()

  raw = tmp_path / "raw.npz"  # a bare pickle with an .npz name
  raw.write_bytes(pickle.dumps(_Payload(armed)))
  with pytest.raises(ValueError, match="raw.npz is not a readable"):
    pretrained.load(raw)
  assert not armed.exists()


def test_unknown_and_unsafe_names(monkeypatch, tmp_path, lopt_meta):
  bundle = tmp_path / "bundle"
  bundle.mkdir()
  monkeypatch.setattr(locate, "bundled_dirs", lambda: [bundle])
  pretrained.save(tmp_path / "w.npz", lopt_meta, INFO)  # just outside the bundled folder
  for name in ("lopt_a/nope", "../w", str(tmp_path / "w"), "lopt_a//x", "", "w.npy"):
    with pytest.raises(ValueError, match="Unknown pretrained weights.*Bundled: none"):
      pretrained.load(name)


def test_available_and_bundled_names(monkeypatch, tmp_path, lopt_meta):
  names = pretrained.available()
  assert isinstance(names, list) and names == sorted(names)
  for name in names:  # whatever ships must be loadable by name
    assert not name.endswith(".npz") and pretrained.metadata(name)["format_version"] == 1

  monkeypatch.setattr(locate, "bundled_dirs", lambda: [tmp_path])
  assert pretrained.available() == []
  (tmp_path / "lopt_a").mkdir()
  digest = pretrained.save(tmp_path / "lopt_a" / "tiny_k8.npz", lopt_meta, INFO)
  (tmp_path / "lopt_a" / "README.md").write_text("not weights")
  assert pretrained.available() == ["lopt_a/tiny_k8"]
  loaded = pretrained.load("lopt_a/tiny_k8", expected_sha256=digest)
  assert _bits(loaded.mlp["w0"]) == _bits(lopt_meta.mlp["w0"])
  with pytest.raises(ValueError, match=r"Bundled: \['lopt_a/tiny_k8'\]"):
    pretrained.load("lopt_a/tiny_k9")


def test_an_installed_wheel_finds_the_weights_inside_the_package(tmp_path, lopt_meta):
  # A wheel installs the weights as the subpackage optax_localsgd._pretrained (pyproject.toml
  # maps the top-level pretrained/ onto it), with no pretrained/ beside the package. Lay that
  # out by hand, with weights of our own (not the installed package's, when it is a wheel
  # itself), and import it in a fresh interpreter, away from this checkout's pretrained/.
  import optax_localsgd._pretrained as bundled
  site = tmp_path / "site-packages"
  shutil.copytree(pathlib.Path(pretrained.__file__).parent, site / "optax_localsgd",
                  ignore=shutil.ignore_patterns("__pycache__", "_pretrained"))
  bundle = site / "optax_localsgd" / "_pretrained"
  (bundle / "lopt_a").mkdir(parents=True)
  shutil.copyfile(bundled.__file__, bundle / "__init__.py")
  digest = pretrained.save(bundle / "lopt_a" / "wheel_k8_h4.npz", lopt_meta, INFO)
  (bundle / "MANIFEST.json").write_text(json.dumps({"lopt_a/wheel_k8_h4": {"sha256": digest}}))
  script = ("import optax_localsgd as ol; print(ol.__file__); "
            "print(ol.pretrained.available()); "
            "print(ol.pretrained.load('lopt_a/wheel_k8_h4').config.kind)")
  r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                     text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(site)))
  assert r.returncode == 0, r.stderr[-2000:]
  where, names, kind = r.stdout.splitlines()
  assert pathlib.Path(where).is_relative_to(site)  # the copy, not this checkout
  assert names == "['lopt_a/wheel_k8_h4']" and kind == "lopt_a"


# ---------------------------------------------------------------------------------------------
# Checkpoints.


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
  evil[0] = _Payload(armed)
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


# ---------------------------------------------------------------------------------------------
# Bundled weights: the manifest, K checks, and what ships.


def _bundle(monkeypatch, tmp_path, meta, name="lopt_a/tiny_k8"):
  monkeypatch.setattr(locate, "bundled_dirs", lambda: [tmp_path])
  path = tmp_path / f"{name}.npz"
  path.parent.mkdir(parents=True, exist_ok=True)
  digest = pretrained.save(path, meta, INFO)
  return path, digest


def test_bundled_names_are_checked_against_the_manifest(monkeypatch, tmp_path, lopt_meta):
  path, digest = _bundle(monkeypatch, tmp_path, lopt_meta)
  with pytest.raises(ValueError, match="cannot read .*MANIFEST.json"):
    pretrained.load("lopt_a/tiny_k8")
  (tmp_path / "MANIFEST.json").write_text(json.dumps({"other": {"sha256": digest}}))
  with pytest.raises(ValueError, match="no sha256 entry"):
    pretrained.load("lopt_a/tiny_k8")
  (tmp_path / "MANIFEST.json").write_text(json.dumps({"lopt_a/tiny_k8": {"sha256": digest}}))
  assert pretrained.load("lopt_a/tiny_k8").config == lopt_meta.config
  # Re-saved with other info: still a valid file, but not the published one.
  pretrained.save(path, lopt_meta, {"note": "edited"})
  with pytest.raises(ValueError, match="not the one published"):
    pretrained.load("lopt_a/tiny_k8")
  # A path is the user's own file: no manifest involved.
  assert pretrained.load(path).config == lopt_meta.config


def test_lagg_a_weights_refuse_another_k(tmp_path):
  path = tmp_path / "lagg.npz"
  pretrained.save(path, init_lagg_a(jax.random.PRNGKey(0), 8), INFO)
  assert pretrained.load(path, num_workers=8).config.num_workers == 8
  with pytest.raises(ValueError, match="LAgg-A weights for K=8 workers, but you asked for K=4"):
    pretrained.load(path, num_workers=4)


def test_every_shipped_weight_file_loads_and_has_a_model_card():
  # CI installs the wheel, so this also checks that pretrained/ made it into the package.
  assert {"lopt_a/fmnist_mlp_k8_h4", "lagg_a/fmnist_mlp_k8_h4", "lagg_a/fmnist_mlp_k8_h16",
          "lopt_a/tiny_imagenet32_mlp_k8_h4", "lagg_a/tiny_imagenet32_mlp_k8_h4",
          } <= set(pretrained.available())
  for name in pretrained.available():
    meta = pretrained.load(name)  # checks the manifest sha256 and the arrays hash
    path = pretrained.resolve(name)
    card = path.with_suffix(".md")
    assert card.is_file(), f"{name} ships without a model card ({card})"
    text = card.read_text()
    assert pretrained.bundled_sha256(name) in text
    info = pretrained.metadata(name)["info"]
    assert info["command"] in text, "the card must give the exact meta-training command"
    k = meta.config.num_workers
    if k is not None:
      assert f"_k{k}_" in name
    assert name.endswith(f"_k{info['K']}_h{info['H']}"), "the name must say K and H"


def test_a_meta_train_run_directory_loads_its_weights(tmp_path, lopt_meta):
  run = tmp_path / "run"  # what `meta-train --out run` leaves: weights.npz among other files
  run.mkdir()
  (run / "log.json").write_text("{}")
  digest = pretrained.save(run / "weights.npz", lopt_meta, INFO)
  for spec in (run, str(run)):
    assert _bits(pretrained.load(spec).mlp["w0"]) == _bits(lopt_meta.mlp["w0"])
    assert pretrained.resolve(spec) == run / "weights.npz"
    assert pretrained.metadata(spec)["info"] == INFO
  assert pretrained.load(run, expected_sha256=digest).config == lopt_meta.config
  with pytest.raises(ValueError, match="is not a bundled name"):
    pretrained.bundled_sha256(str(run))

  empty = tmp_path / "empty"
  empty.mkdir()
  for spec in (empty, str(empty)):
    with pytest.raises(ValueError, match=re.escape(
        f"{empty} is a directory without weights.npz (looked for {empty / 'weights.npz'})")):
      pretrained.load(spec)


def test_a_bundled_name_wins_over_a_folder_of_the_same_name(monkeypatch, tmp_path, lopt_meta):
  path, digest = _bundle(monkeypatch, tmp_path / "bundle", lopt_meta)
  (tmp_path / "bundle" / "MANIFEST.json").write_text(
      json.dumps({"lopt_a/tiny_k8": {"sha256": digest}}))
  monkeypatch.chdir(tmp_path)
  (tmp_path / "lopt_a" / "tiny_k8").mkdir(parents=True)  # a local folder, no weights in it
  assert pretrained.resolve("lopt_a/tiny_k8") == path
