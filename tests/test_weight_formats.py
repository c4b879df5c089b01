"""The weight-file containers: safetensors (written) and the legacy .npz (still read).

Every check that does not depend on the container runs on both: a damaged or edited file of
either kind is refused with a message naming the file and the problem.
"""

import json
import pathlib
import pickle
import re

import jax
import numpy as np
import pytest
import safetensors.numpy
from conftest import ArmedPickle, bits, random_meta, read_npz, write_legacy_npz

from optax_localsgd import init_lagg_a, init_lopt_a, pretrained
from optax_localsgd.io import weights

INFO = {"optimizer": "lopt_a", "K": 8, "H": 4, "tasks": ["fmnist_mlp"], "outer_steps": 3}
FORMATS = ["safetensors", "npz"]
# A copy of the bundled lopt_a/fmnist_mlp_k8_h4.npz as it shipped before safetensors, and of
# the safetensors file that replaced it (bundled until the round-4 weights of docs/meta.md).
LEGACY = pathlib.Path(__file__).resolve().parent / "data"
LEGACY_FILE = "legacy_lopt_a_fmnist_mlp_k8_h4.npz"
LEGACY_SHA256 = "38294e9d6a8cb21867368912959fe7c54eecbd9ec8fb1751fdc2f835c7d1249e"
SUCCESSOR_FILE = "legacy_lopt_a_fmnist_mlp_k8_h4.safetensors"
SUCCESSOR_SHA256 = "31a6aa2a1e0b4935ec61b68f5672da3a1607c6e7adca2aa69ed92987156c8a7a"


def _meta(kind="lopt_a"):
  key = jax.random.PRNGKey(0)
  return random_meta(init_lopt_a(key) if kind == "lopt_a" else init_lagg_a(key, 8), seed=1)


def _save(fmt, folder, meta, info=INFO):
  """(path, sha256) of a weight file of ``fmt`` in ``folder``."""
  if fmt == "npz":
    path = folder / "w.npz"
    return path, write_legacy_npz(path, meta, info)
  path = folder / "w.safetensors"
  return path, pretrained.save(path, meta, info)


def _read_raw(fmt, path):
  """(arrays, JSON metadata or None) with the container's own reader, not the code under test."""
  if fmt == "npz":
    arrays = read_npz(path)
    raw = arrays.pop("__metadata__", None)
    return arrays, None if raw is None else json.loads(raw.tobytes().decode())
  with safetensors.safe_open(str(path), framework="np") as f:
    header = f.metadata() or {}
  text = header.get(weights.HEADER_KEY)
  return safetensors.numpy.load_file(str(path)), None if text is None else json.loads(text)


def _rewrite(fmt, path, arrays, meta=None, raw_meta=None):
  """Writes ``arrays`` and ``meta`` (or the raw metadata text / array) with the container's own
  writer: checksums and framing are fresh, so only the checks under test can object."""
  if fmt == "npz":
    arrays = dict(arrays)
    if meta is not None:
      raw_meta = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    if raw_meta is not None:
      arrays["__metadata__"] = raw_meta
    with open(path, "wb") as f:
      np.savez(f, **arrays)
    return
  if meta is not None:
    raw_meta = json.dumps(meta)
  header = None if raw_meta is None else {weights.HEADER_KEY: raw_meta}
  safetensors.numpy.save_file(dict(arrays), str(path), metadata=header)


@pytest.fixture(params=FORMATS)
def fmt(request):
  return request.param


@pytest.fixture
def saved(fmt, tmp_path):
  meta = _meta()
  path, digest = _save(fmt, tmp_path, meta)
  return fmt, path, digest, meta


@pytest.mark.parametrize("kind", ["lopt_a", "lagg_a"])
def test_both_formats_load_bit_identical(fmt, tmp_path, kind):
  meta = _meta(kind)
  path, digest = _save(fmt, tmp_path, meta)
  loaded = pretrained.load(path, expected_sha256=digest, num_workers=8)
  assert loaded.config == meta.config
  for k in meta.mlp:
    assert bits(loaded.mlp[k]) == bits(meta.mlp[k]), k
  assert bits(loaded.decay_offsets) == bits(meta.decay_offsets)
  assert pretrained.metadata(str(path))["info"] == INFO


def test_a_legacy_bundled_file_loads_with_the_numbers_of_its_safetensors_successor(tmp_path):
  legacy = LEGACY / LEGACY_FILE
  successor = LEGACY / SUCCESSOR_FILE
  assert pretrained.file_sha256(legacy) == LEGACY_SHA256  # the files that shipped
  assert pretrained.file_sha256(successor) == SUCCESSOR_SHA256
  old, new = pretrained.load(legacy), pretrained.load(successor)
  assert old.config == new.config
  assert all(bits(old.mlp[k]) == bits(new.mlp[k]) for k in old.mlp)
  assert bits(old.decay_offsets) == bits(new.decay_offsets)
  for key in ("config", "info", "arrays_sha256"):
    assert pretrained.metadata(legacy)[key] == pretrained.metadata(successor)[key]
  # The tests' legacy writer is the old writer: it gives the shipped file byte for byte.
  info = pretrained.metadata(legacy)["info"]
  assert write_legacy_npz(tmp_path / "again.npz", old, info) == LEGACY_SHA256


def test_a_run_directory_of_an_older_run_loads_its_npz(tmp_path):
  meta = _meta()
  write_legacy_npz(tmp_path / "weights.npz", meta, INFO)
  assert pretrained.resolve(tmp_path) == tmp_path / "weights.npz"
  assert bits(pretrained.load(str(tmp_path)).mlp["w0"]) == bits(meta.mlp["w0"])
  pretrained.save(tmp_path / "weights.safetensors", meta, INFO)  # a resumed run's newer file
  assert pretrained.resolve(tmp_path) == tmp_path / "weights.safetensors"


def test_saving_npz_says_to_use_safetensors(tmp_path):
  with pytest.raises(ValueError, match=re.escape(str(tmp_path / "w.safetensors"))):
    pretrained.save(tmp_path / "w.npz", _meta(), INFO)
  assert not list(tmp_path.iterdir())


def test_a_weight_file_is_plain_safetensors(tmp_path):
  meta = _meta()
  path, _ = _save("safetensors", tmp_path, meta)
  arrays, header = _read_raw("safetensors", path)
  assert sorted(arrays) == sorted(pretrained.ARRAY_NAMES)
  assert all(a.dtype == np.float32 for a in arrays.values())
  assert bits(arrays["mlp/w1"]) == bits(meta.mlp["w1"])
  assert header["format"] == pretrained.FORMAT and header["info"] == INFO


def test_truncated_file_is_refused(saved):
  _, path, _, _ = saved
  data = path.read_bytes()
  for n in (0, 10, len(data) // 2, len(data) - 5):
    path.write_bytes(data[:n])
    with pytest.raises(ValueError, match=f"{path.name}.*(not a readable|corrupt)"):
      pretrained.load(path)


def test_flipped_byte_in_array_is_refused(saved):
  _, path, _, meta = saved
  data = bytearray(path.read_bytes())
  at = data.find(np.asarray(meta.mlp["w1"]).tobytes()[:64])
  assert at > 0
  data[at + 100] ^= 0x01
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=f"{path.name}.*corrupt"):
    pretrained.load(path)


def test_modified_arrays_fail_the_arrays_hash(saved):
  fmt, path, _, _ = saved
  arrays, meta = _read_raw(fmt, path)
  arrays["decay_offsets"] = arrays["decay_offsets"] + np.float32(1e-3)
  _rewrite(fmt, path, arrays, meta)
  with pytest.raises(ValueError, match=f"{path.name} is corrupt or modified"):
    pretrained.load(path)
  pretrained.metadata(path)  # the metadata alone is still readable


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
  fmt, path, _, _ = saved
  arrays, meta = _read_raw(fmt, path)
  edit(meta)
  _rewrite(fmt, path, arrays, meta)
  with pytest.raises(ValueError, match=message) as e:
    pretrained.load(path)
  assert path.name in str(e.value)


def test_info_is_descriptive_and_not_covered_by_the_arrays_hash(saved):
  fmt, path, digest, _ = saved
  arrays, meta = _read_raw(fmt, path)
  meta["info"]["K"] = 16
  _rewrite(fmt, path, arrays, meta)
  assert pretrained.load(path).config.kind == "lopt_a"
  assert pretrained.metadata(path)["info"]["K"] == 16
  with pytest.raises(ValueError, match="expected"):  # only the published file hash catches it
    pretrained.load(path, expected_sha256=digest)


def test_missing_extra_and_misshaped_arrays(saved):
  fmt, path, _, _ = saved
  good, meta = _read_raw(fmt, path)
  cases = [
      ({k: v for k, v in good.items() if k != "mlp/b1"}, r"missing \['mlp/b1'\]"),
      ({**good, "mlp/w3": np.zeros(2, np.float32)}, r"unexpected \['mlp/w3'\]"),
      ({**good, "mlp/b2": np.zeros(3, np.float32)}, r"mlp/b2 has shape \(3,\)"),
      ({**good, "mlp/b2": good["mlp/b2"].astype(np.float64)}, "dtype float64"),
  ]
  for arrays, message in cases:
    _rewrite(fmt, path, arrays, meta)
    with pytest.raises(ValueError, match=message):
      pretrained.load(path)


@pytest.mark.parametrize("fmt, raw_meta, message", [
    ("safetensors", None, "no 'optax_localsgd' metadata entry"),
    ("safetensors", "{not json", "not valid JSON"),
    ("safetensors", "[1, 2]", "must be a JSON object"),
    ("npz", None, "no '__metadata__'"),
    ("npz", np.frombuffer(b"{not json", np.uint8), "not valid UTF-8 JSON"),
    ("npz", np.frombuffer(b"[1, 2]", np.uint8), "JSON object"),
    ("npz", np.zeros(3, np.float32), "uint8"),
])
def test_missing_or_broken_metadata(tmp_path, fmt, raw_meta, message):
  path, _ = _save(fmt, tmp_path, _meta())
  arrays, _ = _read_raw(fmt, path)
  _rewrite(fmt, path, arrays, raw_meta=raw_meta)
  for read in (pretrained.load, pretrained.metadata):
    with pytest.raises(ValueError, match=f"{path.name}.*{message}"):
      read(path)


def test_files_of_another_kind_are_refused(tmp_path):
  npy = tmp_path / "a.npz"
  with open(npy, "wb") as f:
    np.save(f, np.zeros(3))
  with pytest.raises(ValueError, match="single .npy array"):
    pretrained.load(npy)
  text = tmp_path / "b.npz"
  text.write_text("hello")
  with pytest.raises(ValueError, match="b.npz is not a readable .npz"):
    pretrained.metadata(text)
  for name, content in (("c.safetensors", b"hello"), ("d.safetensors", b""),
                        ("e.safetensors", (LEGACY / LEGACY_FILE).read_bytes())):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=f"{name} is not a readable safetensors file"):
      pretrained.load(tmp_path / name)
  for missing in ("missing.npz", "missing.safetensors"):
    with pytest.raises(ValueError, match="does not exist"):
      pretrained.load(tmp_path / missing)


def test_pickled_npz_content_is_refused_without_running_it(tmp_path):
  path, _ = _save("npz", tmp_path, _meta())
  arrays = read_npz(path)
  evil = np.empty(1, dtype=object)
  armed = tmp_path / "armed"
  evil[0] = ArmedPickle(armed)
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
  for raw in (tmp_path / "raw.npz", tmp_path / "raw.safetensors"):  # a bare pickle
    raw.write_bytes(pickle.dumps(ArmedPickle(armed)))
    with pytest.raises(ValueError, match=f"{raw.name} is not a readable"):
      pretrained.load(raw)
    assert not armed.exists()
