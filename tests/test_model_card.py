"""`optax-localsgd publish`: weights, manifest and model card land together and load by name.

publish is maintainer tooling (tools/model_card.py, outside the wheel): it runs from the top
of the checkout, so every test here does too.
"""

import pathlib

import jax
import pytest

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
  ol.pretrained.save(run / "weights.npz", meta, {
      "command": COMMAND, "K": 8, "H": 4, "batch_size": 128, "local_lr": 0.3,
      "tasks": ["fmnist_mlp"], "outer_steps": 120, "outer_steps_planned": 300,
      "tasks_per_estimate": 4, "pes": {"truncation": 10, "min_inner": 50, "max_inner": 500},
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
  assert "Fine-tuned" not in card


def test_card_of_fine_tuned_weights_names_its_starting_point(tmp_path, model_card):
  run = _run_dir(tmp_path, ol.init_lopt_a(jax.random.PRNGKey(1)),
                 init_from="lopt_a/fmnist_mlp_k8_h4", init_from_sha256="ab" * 32)
  card = model_card.publish(run / "weights.npz", "lopt_a/x", tmp_path / "root").read_text()
  assert ("**Fine-tuned.** Meta-training started from `lopt_a/fmnist_mlp_k8_h4` (sha256 `"
          + "ab" * 32 + "`)") in card


def test_publish_refuses_a_corrupt_file(tmp_path, model_card):
  run = _run_dir(tmp_path, ol.init_lopt_a(jax.random.PRNGKey(0)))
  raw = bytearray((run / "weights.npz").read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  (run / "weights.npz").write_bytes(bytes(raw))
  with pytest.raises(ValueError):
    model_card.publish(run / "weights.npz", "lopt_a/x", tmp_path / "root")
  assert not (tmp_path / "root").exists()


def test_publish_outside_a_checkout_says_it_is_maintainer_tooling(tmp_path, monkeypatch, capsys):
  run = _run_dir(tmp_path, ol.init_lopt_a(jax.random.PRNGKey(0)))
  monkeypatch.chdir(tmp_path)
  assert cli.main(["publish", str(run), "lopt_a/x", "--root", str(tmp_path / "root")]) != 0
  assert "maintainer tooling" in capsys.readouterr().err
  assert not (tmp_path / "root").exists()
