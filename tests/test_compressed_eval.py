"""`optax-localsgd evaluate` with compressed deltas (paper appendix E.5): the baselines'
hyperparameters per compressor (paper Table 6), weights meta-trained for a compressor, and the
page comparing several compressors with loss against bits (Figure 13)."""

import json

import jax
import pytest

import optax_localsgd as ol
from optax_localsgd import cli, compression, pretrained, tasks
from optax_localsgd.harness import compressed, sweep


def test_shipped_hyperparameters_are_the_papers_table_6():
  # Table 6: (gamma, alpha, beta) for SlowMo, gamma for local SGD, per top-k fraction.
  for spec, slowmo, local in (("top_k:0.1", (0.3, 1.66, 0.8), 0.3),
                              ("top_k:0.01", (0.1, 5.0, 0.3), 0.5)):
    hp = sweep.tuned_hparams(f"fmnist_mlp/K8/H4/B128/{spec}")
    assert (hp["slowmo"]["local_lr"], hp["slowmo"]["server_lr"],
            hp["slowmo"]["momentum"]) == slowmo
    assert hp["local_sgd"] == {"local_lr": local, "server_lr": 1.0}
    assert hp["diloco"] == sweep.tuned_hparams("fmnist_mlp/K8/H4/B128")["diloco"]


def test_weights_tag_names_the_compressor():
  assert compression.TopK(0.01).weights_tag() == "top0.01"
  assert compression.TopK(0.1, error_feedback=True).weights_tag() == "top0.1ef"
  assert compression.Quantize(4).weights_tag() == "quantize_4"
  assert compression.Quantize(2, stochastic=False).weights_tag() == "quantize_2_nearest"


def test_default_name_prefers_weights_meta_trained_for_the_compressor(monkeypatch):
  monkeypatch.setattr(pretrained, "available",
                      lambda: ["lopt_a/t_k8_h4", "lopt_a/t_k8_h4_top0.01", "lagg_a/t_k8_h4"])
  name = pretrained.default_name
  assert name("lopt_a", "t", 8, 4, "top0.01") == "lopt_a/t_k8_h4_top0.01"
  assert name("lopt_a", "t", 8, 4) == "lopt_a/t_k8_h4"
  # None ship for these compressors: the uncompressed weights.
  assert name("lopt_a", "t", 8, 4, "top0.1") == "lopt_a/t_k8_h4"
  assert name("lopt_a", "t", 8, 4, "top0.01ef") == "lopt_a/t_k8_h4"
  assert name("lagg_a", "t", 8, 4, "top0.01") == "lagg_a/t_k8_h4"
  assert name("lagg_a", "t", 8, 2, "top0.01") is None
  assert name("diloco", "t", 8, 4, "top0.01") is None


def _hparams_file(path):
  base = {"local_sgd": {"local_lr": 0.2, "server_lr": 1.0},
          "slowmo": {"local_lr": 0.2, "server_lr": 1.0, "momentum": 0.5}}
  top = {"local_sgd": {"local_lr": 0.4, "server_lr": 1.0},
         "slowmo": {"local_lr": 0.1, "server_lr": 3.0, "momentum": 0.3}}
  path.write_text(json.dumps({
      "fmnist_mlp/K2/H1/B8": {m: {"hparams": v} for m, v in base.items()},
      "fmnist_mlp/K2/H1/B8/top_k:0.5": {m: {"hparams": v} for m, v in top.items()}}))


def test_evaluate_several_compressors_writes_one_page_with_bits(tmp_path, capsys):
  hp = tmp_path / "hp.json"
  _hparams_file(hp)
  weights = tmp_path / "lopt.safetensors"
  ol.pretrained.save(weights, ol.init_lopt_a(jax.random.PRNGKey(0)), {"local_lr": 0.3})
  out, cache = tmp_path / "out", tmp_path / "cache"
  assert cli.main(["evaluate", "-K", "2", "-H", "1", "-B", "8", "--rounds", "2", "--seeds",
                   "100", "--methods", "local_sgd,slowmo,lopt_a", "--weights",
                   f"lopt_a={weights}", "--hparams", str(hp), "--compress",
                   "none,top_k:0.5,quantize:4", "--cache", str(cache), "--out", str(out),
                   "--quiet"]) == 0
  page = (out / "fmnist_mlp_k2_h1_compressed.md").read_text()
  assert (out / "fmnist_mlp_k2_h1_compressed.png").stat().st_size > 1000
  settings = json.loads((out / "fmnist_mlp_k2_h1_compressed.json").read_text())["settings"]
  assert [s["compress"] for s in settings] == [None, "top_k:0.5", "quantize:4"]
  # top_k:0.5 has its own entry; quantize:4 has none and borrows the uncompressed one.
  assert [s["hparams_key"] for s in settings] == [
      "fmnist_mlp/K2/H1/B8", "fmnist_mlp/K2/H1/B8/top_k:0.5", "fmnist_mlp/K2/H1/B8"]
  assert settings[1]["summary"]["slowmo"]["hparams"]["server_lr"] == 3.0
  hist = json.loads((cache / "fmnist_mlp_k2_h1_compressed" / "top_k_0.5" /
                     "slowmo_seed100.json").read_text())
  assert (hist["config"]["local_lr"], hist["config"]["compress"]) == (0.1, "top_k:0.5")
  params = tasks.get_task("fmnist_mlp").init(jax.random.PRNGKey(0))
  for s, comp in zip(settings, (None, compression.TopK(0.5), compression.Quantize(4))):
    for m in ("local_sgd", "slowmo", "lopt_a"):
      assert s["summary"][m]["bits_per_round"] == compression.round_bits(comp, params, 2)
  for lbl in ("uncompressed", "top-0.5", "quantize:4"):
    assert sum(line.startswith(f"| {lbl} |") for line in page.splitlines()) == 3
  assert "--compress none,top_k:0.5,quantize:4" in page


def test_one_compressor_gets_its_own_page_name(tmp_path, capsys):
  hp = tmp_path / "hp.json"
  _hparams_file(hp)
  assert cli.main(["evaluate", "-K", "2", "-H", "1", "-B", "8", "--rounds", "1", "--seeds",
                   "100", "--methods", "local_sgd", "--hparams", str(hp), "--compress",
                   "top_k:0.5", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"),
                   "--quiet"]) == 0
  # Not fmnist_mlp_k2_h1.md, the uncompressed page (and cache) of the same setting.
  page = (tmp_path / "o" / "fmnist_mlp_k2_h1_top0.5.md").read_text()
  assert '"local_lr": 0.4' in page
  assert not (tmp_path / "o" / "fmnist_mlp_k2_h1.md").exists()


def test_a_bad_spec_in_the_list_fails_before_any_run(tmp_path, capsys):
  rc = cli.main(["evaluate", "-K", "2", "-H", "1", "-B", "8", "--methods", "local_sgd",
                 "--compress", "none,top_k:2", "--cache", str(tmp_path / "c"), "--quiet"])
  assert rc == 2
  assert "top_k:2" in capsys.readouterr().err
  assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("spec,text", [(None, "uncompressed"), ("top_k:0.01", "top-0.01"),
                                       ("top_k:0.1:ef", "top-0.1 + error feedback"),
                                       ("quantize:4", "quantize:4")])
def test_labels(spec, text):
  assert compressed.label(spec) == text
