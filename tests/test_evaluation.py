"""Evaluation harness, sweeps and the results report: metrics on hand-made histories, and one
tiny end-to-end run of `optax-localsgd sweep` + `evaluate` on real Fashion-MNIST."""

import json
import math
import pathlib
import re

import jax
import numpy as np
import pytest

import optax_localsgd as ol
from optax_localsgd import cli
from optax_localsgd.harness import evaluation, report, sweep


def _hist(seed, rounds, losses, acc=0.5):
  return {"config": {"seed": seed, "local_lr": 0.1}, "eval_rounds": list(rounds),
          "global_train_loss": list(losses), "test_accuracy": acc}


def test_speedup_is_ratio_of_rounds_to_local_sgds_best_loss():
  local = _hist(0, [0, 10, 20, 30, 40], [2.0, 1.0, 0.6, 0.5, 0.55])  # best 0.5 at round 30
  fast = _hist(0, [0, 5, 10, 15], [2.0, 0.7, 0.49, 0.3])              # reaches 0.5 at round 10
  never = _hist(0, [0, 10, 20], [2.0, 1.5, 1.0])
  assert evaluation.speedup(fast, local) == pytest.approx(3.0)
  assert evaluation.speedup(local, local) == pytest.approx(1.0)
  assert evaluation.speedup(never, local) is None


def test_mean_se_ignores_missing_and_uses_sample_std():
  mean, se, n = evaluation.mean_se([1.0, None, 3.0, float("nan")])
  assert (mean, n) == (2.0, 2)
  assert se == pytest.approx(np.std([1.0, 3.0], ddof=1) / math.sqrt(2))
  assert evaluation.mean_se([None])[2] == 0


def test_summarize_pairs_seeds_and_report_marks_partial_counts():
  cfg = evaluation.EvalConfig(rounds=40, seeds=(1, 2), methods=("local_sgd", "slowmo"),
                              target_loss=0.55)
  runs = {
      "local_sgd": [_hist(1, [0, 20, 40], [2, 0.6, 0.5]), _hist(2, [0, 20, 40], [2, 0.7, 0.4])],
      # seed 1 reaches 0.5 at round 10 (speedup 4); seed 2 never reaches 0.4.
      "slowmo": [_hist(1, [0, 10, 20], [2, 0.5, 0.45]), _hist(2, [0, 10, 20], [2, 0.5, 0.45])],
  }
  s = evaluation.summarize(cfg, runs)
  assert [p["speedup"] for p in s["slowmo"]["per_seed"]] == [4.0, None]
  assert s["slowmo"]["speedup"][:1] == (4.0,) and s["slowmo"]["speedup"][2] == 1
  assert s["slowmo"]["rounds_to_target"][0] == 10
  text = report.markdown(cfg, s, "optax-localsgd evaluate ...")
  assert "| SlowMo | 4.00 (1/2) | 10 ± 0 |" in text
  assert "global model" in text and "optax-localsgd evaluate ..." in text
  assert "no sweep was run" not in text
  for m in s:
    s[m]["hparams"] = {"local_lr": 0.3}
  text = report.markdown(cfg, s, "cmd", borrowed_hparams_key="fmnist_mlp/K8/H4/B128")
  assert "use the values tuned for `fmnist_mlp/K8/H4/B128`: no sweep was run" in text


def test_pages_say_which_input_preprocessing_they_used():
  # The default standardises; standardize=false is the authors' pixels / 255 (speedups differ).
  std = report.inputs_line("fmnist_mlp")
  assert std.startswith("*Inputs*: pixels / 255, then standardised") and "0.286" in std
  assert "0.353" in std and "the package's default" in std
  raw = report.inputs_line("fmnist_mlp:standardize=false")
  assert raw == "*Inputs*: pixels / 255, in [0, 1], and nothing else (the authors' preprocessing)."
  assert "0.4914/0.4822/0.4465" in report.inputs_line("cifar10_mlp")
  assert "raw bytes" in report.inputs_line("text_lm")
  cfg = evaluation.EvalConfig(task="fmnist_mlp:standardize=false", rounds=40, seeds=(1,),
                              methods=("local_sgd",), target_loss=0.55)
  s = evaluation.summarize(cfg, {"local_sgd": [_hist(1, [0, 20, 40], [2, 0.6, 0.5])]})
  assert raw in report.markdown(cfg, s, "cmd").split("\n")


def test_every_published_page_states_its_preprocessing():
  # The sentence is the one the page's own task spec (its title) gives today.
  pages = sorted((pathlib.Path(__file__).parents[1] / "docs" / "results").glob("*.md"))
  assert pages
  for page in pages:
    lines = page.read_text().split("\n")
    spec = re.match(r"# ([^, ]+)", lines[0]).group(1)
    assert report.inputs_line(spec) in lines, page.name


def test_eval_config_rejects_bad_input():
  with pytest.raises(ValueError, match="Unknown methods"):
    evaluation.EvalConfig(methods=("local_sgd", "nesterov"))
  with pytest.raises(ValueError, match="include 'local_sgd'"):
    evaluation.EvalConfig(methods=("slowmo",))
  with pytest.raises(ValueError, match="No weight file given for \\['lopt_a'\\]"):
    evaluation.EvalConfig(methods=("local_sgd", "lopt_a"))


def test_paper_grids_and_rungs():
  assert len(sweep.grid("slowmo")) == 4 * 11 * 11
  assert len(sweep.grid("sgd")) == len(sweep.grid("adam")) == 11
  assert len(sweep.grid("local_sgd")) == 4
  # alpha = c / gamma (appendix D): Table 5's FMNIST point (0.1, 1, 0.95) is on the grid.
  assert {"local_lr": 0.1, "server_lr": 1.0, "momentum": 0.95} in [
      {k: round(v, 12) for k, v in hp.items()} for hp in sweep.grid("slowmo")]
  assert sweep.SweepConfig(rounds=1000, min_rounds=37, eta=3).rungs() == [37, 111, 333, 1000]
  with pytest.raises(ValueError, match="No sweep grid"):
    sweep.grid("lopt_a")


def test_tuned_hparams_file_round_trip_and_missing_key(tmp_path):
  path = tmp_path / "hp.json"
  cfg = sweep.SweepConfig(workers=2, local_steps=1, batch_size=8)
  result = {"best": {"loss": 0.3, "server_lr": 0.1}, "rungs": []}
  sweep.update_file(path, cfg, "sgd", result, "optax-localsgd sweep ...")
  assert sweep.tuned_hparams(cfg.key(), path) == {"sgd": {"server_lr": 0.1}}
  with pytest.raises(ValueError, match="no tuned hyperparameters for fmnist_mlp/K8"):
    sweep.tuned_hparams("fmnist_mlp/K8/H4/B128", path)


def test_shipped_hparams_cover_the_fmnist_evaluation():
  hp = sweep.tuned_hparams("fmnist_mlp/K8/H4/B128")
  assert set(hp) >= set(evaluation.BASELINES)


def test_sweep_and_evaluate_end_to_end_resume_from_cache(tmp_path, capsys):
  """Tiny real run: sweep two baselines, evaluate them with a learned optimizer, then rerun
  and check every run comes from the cache (same numbers, no retraining)."""
  hp = tmp_path / "hp.json"
  weights = tmp_path / "lopt.safetensors"
  ol.pretrained.save(weights, ol.init_lopt_a(jax.random.PRNGKey(0)), {"local_lr": 0.2})
  common = ["-K", "2", "-H", "1", "-B", "8"]
  assert cli.main(["sweep", *common, "--rounds", "2", "--min-rounds", "1", "--eta", "2",
                   "--grid", "reduced", "--methods", "local_sgd,sgd", "--out", str(hp),
                   "--quiet"]) == 0
  stored = json.loads(hp.read_text())["fmnist_mlp/K2/H1/B8"]
  assert stored["local_sgd"]["sweep"]["rungs"][0]["rounds"] == 1
  args = ["evaluate", *common, "--rounds", "3", "--seeds", "100-101", "--methods",
          "local_sgd,sgd,lopt_a", "--weights", f"lopt_a={weights}", "--hparams", str(hp),
          "--eval-dense-until", "2", "--eval-every", "2", "--cache", str(tmp_path / "cache"),
          "--out", str(tmp_path / "out"), "--quiet"]
  assert cli.main(args) == 0
  first = json.loads((tmp_path / "out" / "fmnist_mlp_k2_h1.json").read_text())
  assert (tmp_path / "out" / "fmnist_mlp_k2_h1.png").stat().st_size > 1000
  per_seed = first["summary"]["lopt_a"]["per_seed"]
  assert [p["seed"] for p in per_seed] == [100, 101]
  # Evaluated after rounds 1, 2, then 3 (the end): dense until 2, every 2 after.
  cached = json.loads((tmp_path / "cache" / "fmnist_mlp_k2_h1" / "sgd_seed100.json").read_text())
  assert cached["eval_rounds"] == [0, 1, 2, 3]
  assert first["summary"]["lopt_a"]["hparams"]["local_lr"] == 0.2
  mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.json")}
  assert cli.main(args) == 0
  assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
  assert json.loads((tmp_path / "out" / "fmnist_mlp_k2_h1.json").read_text()) == first


def test_sweep_default_output_works_outside_a_checkout(tmp_path, monkeypatch, capsys):
  # From an installed package the current folder is anywhere; the default must not assume
  # the source tree (it used to be src/optax_localsgd/tuned_hparams.json).
  monkeypatch.chdir(tmp_path)
  assert cli.main(["sweep", "-K", "2", "-H", "1", "-B", "8", "--rounds", "1", "--min-rounds",
                   "1", "--eta", "2", "--grid", "reduced", "--methods", "local_sgd",
                   "--quiet"]) == 0
  written = json.loads((tmp_path / "runs" / "sweep" / "tuned_hparams.json").read_text())
  assert set(written["fmnist_mlp/K2/H1/B8"]) == {"local_sgd"}
  assert sweep.tuned_hparams("fmnist_mlp/K2/H1/B8", tmp_path / cli.SWEEP_OUT)["local_sgd"][
      "local_lr"] in sweep.GAMMA_GRID


def test_evaluate_without_tuned_hparams_is_a_clear_error(tmp_path, capsys):
  rc = cli.main(["evaluate", "-K", "3", "--methods", "local_sgd", "--hparams",
                 str(tmp_path / "none.json"), "--quiet"])
  assert rc == 2
  assert "No hyperparameter file" in capsys.readouterr().err


def test_vmapped_sweep_matches_the_trainer():
  """A sweep candidate's loss is the trainer's global training loss for the same run."""
  from optax_localsgd.harness import trainer
  cfg = sweep.SweepConfig(workers=2, local_steps=2, batch_size=16, eval_examples=2000)
  cands = [{"local_lr": 0.3, "server_lr": 1.0, "momentum": 0.9},
           {"local_lr": 0.1, "server_lr": 2.0, "momentum": 0.5}]
  losses = sweep.final_losses(cfg, "slowmo", cands, 3)
  for hp, loss in zip(cands, losses):
    h = trainer.train(trainer.TrainConfig(
        server="slowmo", workers=2, local_steps=2, batch_size=16, rounds=3,
        seed=sweep.SWEEP_SEED, eval_examples=2000, eval_every=3, **hp), progress=False)
    assert loss == pytest.approx(h["global_train_loss"][-1], rel=1e-5)
