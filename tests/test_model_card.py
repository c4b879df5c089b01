"""`optax-localsgd publish`: weights, manifest and model card land together and load by name.

publish is maintainer tooling (tools/model_card.py, outside the wheel): it runs from the top
of the checkout, so every test here does too.
"""

import json
import pathlib

import jax
import pytest
from conftest import bits, write_legacy_npz

import optax_localsgd as ol
from optax_localsgd import cli, pretrained
from optax_localsgd.io import locate

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _at_the_top_of_the_checkout(monkeypatch):
  monkeypatch.chdir(ROOT)


@pytest.fixture
def model_card():
  return cli.maintainer_tool("model_card")

COMMAND = "optax-localsgd meta-train --optimizer lopt_a --task fmnist_mlp --out run"


def _run_dir(tmp_path, meta, **info):
  run = tmp_path / "run"
  run.mkdir()
  ol.pretrained.save(run / "weights.safetensors", meta, {
      "command": COMMAND, "K": 8, "H": 4, "batch_size": 128, "local_lr": 0.3,
      "tasks": ["fmnist_mlp"], "outer_steps": 120, "outer_steps_planned": 300,
      "tasks_per_estimate": 4, "pes": {"truncation": 10, "min_inner": 50, "max_inner": 500,
                                     "outer_steps": 300},  # the schedule, as meta-train writes it
      **info})
  return run


def test_publish_writes_loadable_weights_manifest_and_card(tmp_path, monkeypatch):
  meta = ol.init_lopt_a(jax.random.PRNGKey(3))
  run = _run_dir(tmp_path, meta)
  results = tmp_path / "res.md"
  results.write_text("# title\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\n![curves](x.png)\n")
  root = tmp_path / "pretrained"
  assert cli.main(["publish", str(run), "lopt_a/fmnist_mlp_k8_h4", "--root", str(root),
                   "--results", str(results)]) == 0
  monkeypatch.setattr(locate, "bundled_dirs", lambda: [root])
  assert pretrained.available() == ["lopt_a/fmnist_mlp_k8_h4"]
  loaded = pretrained.load("lopt_a/fmnist_mlp_k8_h4")
  assert bool((loaded.mlp["w0"] == meta.mlp["w0"]).all())
  card = (root / "lopt_a" / "fmnist_mlp_k8_h4.md").read_text()
  assert pretrained.bundled_sha256("lopt_a/fmnist_mlp_k8_h4") in card
  assert COMMAND in card and "Reduced recipe" in card
  assert "| outer_steps | 120 (of a 300-step schedule) | 5000 |" in card
  assert "| 1 | 2 |" in card and "# title" not in card and "x.png" not in card
  assert "Fine-tuned" not in card and "compressed deltas" not in card


def test_card_of_weights_for_a_compressor_names_it(tmp_path, model_card):
  run = _run_dir(tmp_path, ol.init_lopt_a(jax.random.PRNGKey(2)), compress="top_k:0.01")
  card = model_card.publish(run / "weights.safetensors", "lopt_a/x_top0.01",
                            tmp_path / "root").read_text()
  assert "**For compressed deltas.**" in card and "`--compress top_k:0.01`" in card


def test_card_of_federated_weights_describes_the_clients(tmp_path, model_card):
  run = _run_dir(tmp_path, ol.init_lopt_a(jax.random.PRNGKey(2)), K=10, H=None, batch_size=20,
                 local_lr=0.1, federated={"alpha": 0.1, "num_clients": 400, "local_epochs": 1.0})
  card = model_card.publish(run / "weights.safetensors", "lopt_a/fedx_k10_a0.1",
                            tmp_path / "root").read_text()
  assert ("K = 10 of N = 400 clients sampled per round (Dirichlet label skew alpha = 0.1), "
          "each running E = 1 local epoch(s) of SGD on batches of B = 20 at learning rate 0.1"
          ) in card, card
  assert "H = None" not in card


def test_card_of_fine_tuned_weights_names_its_starting_point(tmp_path, model_card):
  run = _run_dir(tmp_path, ol.init_lopt_a(jax.random.PRNGKey(1)),
                 init_from="lopt_a/fmnist_mlp_k8_h4", init_from_sha256="ab" * 32)
  card = model_card.publish(run / "weights.safetensors", "lopt_a/x",
                            tmp_path / "root").read_text()
  assert ("**Fine-tuned.** Meta-training started from `lopt_a/fmnist_mlp_k8_h4` (sha256 `"
          + "ab" * 32 + "`)") in card


def test_publish_rewrites_an_older_runs_npz_as_safetensors(tmp_path, model_card):
  meta = ol.init_lopt_a(jax.random.PRNGKey(4))
  run = tmp_path / "old_run"
  run.mkdir()
  write_legacy_npz(run / "weights.npz", meta, {"command": COMMAND, "K": 8, "H": 4})
  root = tmp_path / "root"
  assert cli.main(["publish", str(run), "lopt_a/old", "--root", str(root)]) == 0
  assert sorted(p.name for p in (root / "lopt_a").iterdir()) == ["old.md", "old.safetensors"]
  new = pretrained.load(root / "lopt_a" / "old.safetensors")
  assert all(bits(new.mlp[k]) == bits(meta.mlp[k]) for k in meta.mlp)
  assert pretrained.metadata(root / "lopt_a" / "old.safetensors")["info"]["command"] == COMMAND


def test_convert_legacy_moves_a_bundle_to_safetensors(tmp_path, model_card, monkeypatch):
  root = tmp_path / "pretrained"
  (root / "lopt_a").mkdir(parents=True)
  base, tuned = ol.init_lopt_a(jax.random.PRNGKey(5)), ol.init_lopt_a(jax.random.PRNGKey(6))
  base_sha = write_legacy_npz(root / "lopt_a" / "base.npz", base, {"K": 8, "H": 4})
  tuned_sha = write_legacy_npz(root / "lopt_a" / "tuned.npz", tuned,
                               {"K": 8, "H": 4, "init_from": "lopt_a/base",
                                "init_from_sha256": base_sha})
  (root / "MANIFEST.json").write_text(json.dumps(
      {"lopt_a/base": {"sha256": base_sha}, "lopt_a/tuned": {"sha256": tuned_sha}}))
  (root / "lopt_a" / "tuned.md").write_text(
      f"- file sha256: `{tuned_sha}`\nstarted from `lopt_a/base` (sha256 `{base_sha}`)\n")
  assert model_card.convert_legacy(root) == ["lopt_a/base", "lopt_a/tuned"]
  assert not list(root.rglob("*.npz"))
  monkeypatch.setattr(locate, "bundled_dirs", lambda: [root])
  for name, meta in (("lopt_a/base", base), ("lopt_a/tuned", tuned)):
    loaded = pretrained.load(name)  # the manifest has the new file's sha256
    assert all(bits(loaded.mlp[k]) == bits(meta.mlp[k]) for k in meta.mlp)
  card = (root / "lopt_a" / "tuned.md").read_text()
  assert f"file sha256: `{pretrained.bundled_sha256('lopt_a/tuned')}`" in card
  assert f"`{base_sha}` of its former `.npz` file" in card
  assert pretrained.bundled_sha256("lopt_a/base") in card


def test_publish_refuses_a_corrupt_file(tmp_path, model_card):
  run = _run_dir(tmp_path, ol.init_lopt_a(jax.random.PRNGKey(0)))
  raw = bytearray((run / "weights.safetensors").read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  (run / "weights.safetensors").write_bytes(bytes(raw))
  with pytest.raises(ValueError):
    model_card.publish(run / "weights.safetensors", "lopt_a/x", tmp_path / "root")
  assert not (tmp_path / "root").exists()


def test_publish_outside_a_checkout_says_it_is_maintainer_tooling(tmp_path, monkeypatch, capsys):
  run = _run_dir(tmp_path, ol.init_lopt_a(jax.random.PRNGKey(0)))
  monkeypatch.chdir(tmp_path)
  assert cli.main(["publish", str(run), "lopt_a/x", "--root", str(tmp_path / "root")]) != 0
  assert "maintainer tooling" in capsys.readouterr().err
  assert not (tmp_path / "root").exists()
