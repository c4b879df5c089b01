"""Weight files through optax_localsgd.pretrained: save, load, names, bundles, run directories.

The containers themselves (safetensors, the legacy .npz) and damaged files are
tests/test_weight_formats.py; checkpoints are tests/test_checkpoint.py."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from conftest import bits, random_meta

from optax_localsgd import compression, init_lagg_a, init_lopt_a, lopt_a, pretrained
from optax_localsgd.io import locate

_bits = bits

INFO = {"optimizer": "lopt_a", "K": 8, "H": 4, "tasks": ["fmnist_mlp"], "outer_steps": 3,
        "final_meta_loss": 0.25, "command": "optax-localsgd meta-train --k 8"}


def _meta(kind):
  key = jax.random.PRNGKey(0)
  base = init_lopt_a(key) if kind == "lopt_a" else init_lagg_a(key, 8)
  return random_meta(base, seed=1)


@pytest.fixture(scope="module")
def lopt_meta():
  return _meta("lopt_a")


@pytest.fixture
def saved(tmp_path, lopt_meta):
  path = tmp_path / "w.safetensors"
  digest = pretrained.save(path, lopt_meta, INFO)
  return path, digest


# ---------------------------------------------------------------------------------------------
# Weight files.


@pytest.mark.parametrize("kind", ["lopt_a", "lagg_a"])
def test_round_trip_is_bit_identical(tmp_path, kind):
  meta = _meta(kind)
  path = tmp_path / f"{kind}.safetensors"
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
  # A str path ending in .safetensors is a path too.
  assert _bits(pretrained.load(str(path)).mlp["w2"]) == _bits(meta.mlp["w2"])
  md = pretrained.metadata(path)
  assert md["format"] == "optax-localsgd-weights" and md["format_version"] == 1
  assert md["info"] == INFO and md["config"]["kind"] == kind
  assert set(safetensors.numpy.load_file(path)) == set(pretrained.ARRAY_NAMES)


def test_save_is_reproducible_and_atomic(tmp_path, lopt_meta):
  a = pretrained.save(tmp_path / "a.safetensors", lopt_meta, INFO)
  b = pretrained.save(tmp_path / "b.safetensors", lopt_meta, INFO)
  assert a == b
  c = pretrained.save(tmp_path / "a.safetensors", lopt_meta, {**INFO, "outer_steps": 4})
  assert c != a and c == pretrained.file_sha256(tmp_path / "a.safetensors")
  # Overwritten in place, and no temporary files left.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


def test_failed_save_keeps_old_file_and_leaves_no_temp(tmp_path, lopt_meta, monkeypatch):
  path = tmp_path / "w.safetensors"
  digest = pretrained.save(path, lopt_meta, INFO)

  def boom(*args):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", boom)
  with pytest.raises(OSError, match="disk full"):
    pretrained.save(path, lopt_meta, {**INFO, "K": 16})
  monkeypatch.undo()
  assert pretrained.file_sha256(path) == digest
  assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_save_rejects_bad_input(tmp_path, lopt_meta):
  with pytest.raises(ValueError, match=r"\.safetensors"):
    pretrained.save(tmp_path / "w.bin", lopt_meta, INFO)
  with pytest.raises(ValueError, match="strict JSON"):
    pretrained.save(tmp_path / "w.safetensors", lopt_meta, {"final_meta_loss": float("nan")})
  with pytest.raises(ValueError, match="strict JSON"):
    pretrained.save(tmp_path / "w.safetensors", lopt_meta, {"x": object()})
  bad = type(lopt_meta)(mlp={**lopt_meta.mlp, "w1": jnp.zeros((3, 3))},
                        decay_offsets=lopt_meta.decay_offsets, config=lopt_meta.config)
  with pytest.raises(ValueError, match="w1 has shape"):
    pretrained.save(tmp_path / "w.safetensors", bad, INFO)
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


def test_expected_sha256(saved):
  path, digest = saved
  assert pretrained.load(path, expected_sha256=digest.upper()).config.kind == "lopt_a"
  with pytest.raises(ValueError, match=f"{path.name} has sha256 {digest}, expected 00"):
    pretrained.load(path, expected_sha256="00" * 32)


def test_unknown_and_unsafe_names(monkeypatch, tmp_path, lopt_meta):
  bundle = tmp_path / "bundle"
  bundle.mkdir()
  monkeypatch.setattr(locate, "bundled_dirs", lambda: [bundle])
  pretrained.save(tmp_path / "w.safetensors", lopt_meta, INFO)  # just outside the bundled folder
  for name in ("lopt_a/nope", "../w", str(tmp_path / "w"), "lopt_a//x", "", "w.npy"):
    with pytest.raises(ValueError, match="Unknown pretrained weights.*Bundled: none"):
      pretrained.load(name)


def test_available_and_bundled_names(monkeypatch, tmp_path, lopt_meta):
  names = pretrained.available()
  assert isinstance(names, list) and names == sorted(names)
  for name in names:  # whatever ships must be loadable by name
    assert not name.endswith((".safetensors", ".npz"))
    assert pretrained.metadata(name)["format_version"] == 1

  monkeypatch.setattr(locate, "bundled_dirs", lambda: [tmp_path])
  assert pretrained.available() == []
  (tmp_path / "lopt_a").mkdir()
  digest = pretrained.save(tmp_path / "lopt_a" / "tiny_k8.safetensors", lopt_meta, INFO)
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
  digest = pretrained.save(bundle / "lopt_a" / "wheel_k8_h4.safetensors", lopt_meta, INFO)
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
# Bundled weights: the manifest, K checks, and what ships.


def _bundle(monkeypatch, tmp_path, meta, name="lopt_a/tiny_k8"):
  monkeypatch.setattr(locate, "bundled_dirs", lambda: [tmp_path])
  path = tmp_path / f"{name}.safetensors"
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
  path = tmp_path / "lagg.safetensors"
  pretrained.save(path, init_lagg_a(jax.random.PRNGKey(0), 8), INFO)
  assert pretrained.load(path, num_workers=8).config.num_workers == 8
  with pytest.raises(ValueError, match="LAgg-A weights for K=8 workers, but you asked for K=4"):
    pretrained.load(path, num_workers=4)


def test_every_shipped_weight_file_loads_and_has_a_model_card():
  # CI installs the wheel, so this also checks that pretrained/ made it into the package.
  assert {"lopt_a/fmnist_mlp_k8_h4", "lagg_a/fmnist_mlp_k8_h4", "lagg_a/fmnist_mlp_k8_h16",
          "lopt_a/tiny_imagenet32_mlp_k8_h4", "lagg_a/tiny_imagenet32_mlp_k8_h4",
          "lopt_a/fedfmnist_mlp_k10_a100", "lopt_a/fedfmnist_mlp_k10_a0.1",
          } <= set(pretrained.available())
  for name in pretrained.available():
    meta = pretrained.load(name)  # checks the manifest sha256 and the arrays hash
    path = pretrained.resolve(name)
    assert path.suffix == ".safetensors", f"{name} ships as {path.name}: convert it"
    card = path.with_suffix(".md")
    assert card.is_file(), f"{name} ships without a model card ({card})"
    text = card.read_text()
    assert pretrained.bundled_sha256(name) in text
    info = pretrained.metadata(name)["info"]
    assert info["command"] in text, "the card must give the exact meta-training command"
    k = meta.config.num_workers
    if k is not None:
      assert f"_k{k}_" in name
    fed = info.get("federated")
    if fed:  # FedLOpt: what harness.federated.default_weights seeks, METHOD/fedTASK_kK_aALPHA
      task, = set(info["tasks"])
      assert name == f"{info['optimizer']}/fed{task}_k{info['K']}_a{fed['alpha']:g}", name
      continue
    # K and H, then the compressor the weights were meta-trained for (what default_name seeks).
    comp = compression.from_spec(info.get("compress"))
    tag = "" if comp is None else f"_{comp.weights_tag()}"
    assert name.endswith(f"_k{info['K']}_h{info['H']}{tag}"), "the name must say K, H, compressor"


def test_a_meta_train_run_directory_loads_its_weights(tmp_path, lopt_meta):
  run = tmp_path / "run"  # what `meta-train --out run` leaves: weights among other files
  run.mkdir()
  (run / "log.json").write_text("{}")
  digest = pretrained.save(run / "weights.safetensors", lopt_meta, INFO)
  for spec in (run, str(run)):
    assert _bits(pretrained.load(spec).mlp["w0"]) == _bits(lopt_meta.mlp["w0"])
    assert pretrained.resolve(spec) == run / "weights.safetensors"
    assert pretrained.metadata(spec)["info"] == INFO
  assert pretrained.load(run, expected_sha256=digest).config == lopt_meta.config
  with pytest.raises(ValueError, match="is not a bundled name"):
    pretrained.bundled_sha256(str(run))

  empty = tmp_path / "empty"
  empty.mkdir()
  for spec in (empty, str(empty)):
    with pytest.raises(ValueError, match=re.escape(
        f"{empty} is a directory without weights.safetensors (looked for "
        f"{empty / 'weights.safetensors'} and the older weights.npz)")):
      pretrained.load(spec)


def test_a_bundled_name_wins_over_a_folder_of_the_same_name(monkeypatch, tmp_path, lopt_meta):
  path, digest = _bundle(monkeypatch, tmp_path / "bundle", lopt_meta)
  (tmp_path / "bundle" / "MANIFEST.json").write_text(
      json.dumps({"lopt_a/tiny_k8": {"sha256": digest}}))
  monkeypatch.chdir(tmp_path)
  (tmp_path / "lopt_a" / "tiny_k8").mkdir(parents=True)  # a local folder, no weights in it
  assert pretrained.resolve("lopt_a/tiny_k8") == path
