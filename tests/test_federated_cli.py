"""``optax-localsgd train --federated`` and ``evaluate --federated`` (issue 16), on real
Fashion-MNIST cut among 20 clients; tiny runs: 4 clients a round, a few rounds, a twentieth of
an epoch per client (about 8 local steps)."""

import dataclasses
import json
import math

import pytest

from optax_localsgd import cli
from optax_localsgd.errors import UsageError
from optax_localsgd.harness import federated, report

TINY = ["--alpha", "0.5", "--clients", "20", "--clients-per-round", "4", "--local-epochs",
        "0.05", "--quiet"]


def _finite(xs):
  return all(math.isfinite(x) for x in xs)


@pytest.mark.parametrize("server", ["scaffold", "fedadam"])
def test_train_federated_writes_a_history_with_finite_losses(server, tmp_path, capsys):
  assert cli.main(["train", "--federated", "--server", server, "--rounds", "3",
                   "--eval-every", "3", "--out", str(tmp_path), *TINY]) == 0
  (hist,) = json.loads((tmp_path / "metrics.json").read_text())
  assert hist["label"] == server and hist["rounds"] == [1, 2, 3]
  assert hist["eval_rounds"] == [0, 3] and len(hist["train_loss"]) == 3
  assert _finite(hist["train_loss"]) and _finite(hist["global_train_loss"])
  assert hist["global_train_loss"][-1] < hist["global_train_loss"][0]  # it trains
  assert 0.0 <= hist["test_accuracy"] <= 1.0 and math.isfinite(hist["test_loss"])
  # The test-accuracy curve (Figure 17) is taken at the evaluation rounds; its last point is
  # the final model's.
  assert len(hist["eval_test_accuracy"]) == 2
  assert hist["eval_test_accuracy"][-1] == hist["test_accuracy"]
  assert hist["eval_test_accuracy"][0] != hist["eval_test_accuracy"][1]
  cfg = hist["config"]
  assert (cfg["server"], cfg["num_clients"], cfg["clients_per_round"], cfg["alpha"],
          cfg["batch_size"]) == (server, 20, 4, 0.5, 20)  # B defaults to the paper's 20
  assert hist["server_hparams"]["server_lr"] == (1.0 if server == "scaffold" else 1e-2)
  assert 1 <= hist["clients"]["sizes"][0] <= hist["clients"]["sizes"][2]
  assert json.loads(capsys.readouterr().out)["test_accuracy"] == hist["test_accuracy"]


def test_evaluate_federated_writes_a_table_with_every_method(tmp_path, capsys, monkeypatch):
  methods = "fedavg,fedadam,fedyogi,fedadagrad,scaffold,lopt_a"
  args = ["evaluate", "--federated", "--methods", methods, "--seeds", "1", "--rounds", "2",
          "--eval-every", "2", "--name", "tiny", "--out", str(tmp_path / "out"),
          "--cache", str(tmp_path / "cache"), *TINY]
  assert cli.main(args) == 0
  md = (tmp_path / "out" / "tiny.md").read_text()
  for label in ("FedAvg", "FedAdam", "FedYogi", "FedAdagrad", "SCAFFOLD", "LOpt-A"):
    assert f"| {label} | 0." in md, md  # a test accuracy for every method
  assert "N = 20 clients, K = 4 per round, Dirichlet alpha = 0.5" in md
  assert "](tiny.png)" in md
  assert (tmp_path / "out" / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  res = json.loads((tmp_path / "out" / "tiny.json").read_text())
  assert list(res["summary"]) == methods.split(",")
  for m, row in res["summary"].items():
    mean, _, n = row["test_accuracy"]
    assert n == 1 and 0.0 < mean <= 1.0 and row["per_seed"][0]["seed"] == 1, m
  # LOpt-A: the bundled weights, whose clients train at their meta-training local lr.
  assert res["summary"]["lopt_a"]["hparams"] == {"local_lr": 0.1,
                                                 "weights": "lopt_a/fmnist_mlp_k8_h4"}
  assert res["summary"]["fedavg"]["hparams"] == {"local_lr": 0.1, "server_lr": 1.0}
  # The same command again reads every run from the cache and trains nothing.
  monkeypatch.setattr(federated, "train_federated", lambda *a, **k: pytest.fail("retrained"))
  capsys.readouterr()
  assert cli.main(args) == 0
  assert json.loads((tmp_path / "out" / "tiny.json").read_text())["summary"] == res["summary"]


@pytest.mark.parametrize("args, msg", [
    (["train", "--federated", "--alpha", "0"], "alpha (the Dirichlet concentration) must be"),
    (["train", "--federated", "--alpha", "-1"], "must be a finite number > 0, got -1.0"),
    (["train", "--federated", "--alpha", "1", "--clients", "4", "--clients-per-round", "10"],
     "clients_per_round K=10 exceeds num_clients N=4"),
    (["train", "--federated"], "--federated needs --alpha A"),
    (["train", "--alpha", "1"], "--alpha applies only with --federated"),
    (["train", "--server", "scaffold"], "--server scaffold is a federated method"),
    (["train", "--federated", "--alpha", "1", "-K", "4"], "--workers does not apply"),
    (["train", "--federated", "--alpha", "1", "--server", "sgd"],
     "It is a data-parallel baseline"),
    (["train", "--federated", "--alpha", "1", "--local-epochs", "0"], "local_epochs must be"),
    (["train", "--federated", "--alpha", "1", "--clients-per-round", "0"],
     "--clients-per-round must be >= 1"),
    (["train", "--federated", "--alpha", "1", "--server", "fedavg", "--server-lr", "2"],
     "fedavg has no server learning rate"),
    (["train", "--federated", "--alpha", "1", "--task", "text_lm"], "not a classification"),
    (["evaluate", "--federated", "--alpha", "1", "--clients", "4", "--clients-per-round", "5"],
     "K=5 exceeds num_clients N=4"),
    (["evaluate", "--federated", "--alpha", "0.1", "--methods", "fedavg,adam"],
     "Unknown federated methods ['adam']"),
    (["evaluate", "--federated", "--alpha", "1", "--compress", "quantize:4"],
     "--compress does not apply"),
    (["evaluate", "--alpha", "1"], "--alpha applies only with --federated"),
])
def test_bad_input_is_a_clear_usage_error(args, msg, capsys):
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert err.startswith("optax-localsgd: error: ") and msg in err, err


def test_more_clients_than_examples_is_a_usage_error():
  cfg = federated.FederatedTrainConfig(num_clients=70_000, alpha=1.0, rounds=1)
  with pytest.raises(UsageError, match="Cannot partition fmnist_mlp's training split"):
    federated.train_federated(cfg, progress=False)


def test_the_same_seed_gives_the_same_history():
  cfg = federated.FederatedTrainConfig(server="fedadam", num_clients=20, clients_per_round=4,
                                       alpha=0.5, local_epochs=0.05, rounds=2, eval_every=2)
  runs = [federated.train_federated(c, progress=False)
          for c in (cfg, cfg, dataclasses.replace(cfg, seed=1))]
  for h in runs:
    h.pop("wall_s")
  assert runs[0] == runs[1]
  # Another seed: another partition and init, so other numbers.
  assert runs[2]["clients"] != runs[0]["clients"]
  assert runs[2]["train_loss"] != runs[0]["train_loss"]


def test_a_diverged_run_is_counted_apart_not_averaged_as_chance_accuracy():
  def hist(seed, losses, acc):
    return {"config": {"seed": seed, "local_lr": 0.1}, "server_hparams": {"server_lr": 1.0},
            "eval_rounds": [10, 20, 30][:len(losses)], "global_train_loss": losses,
            "test_accuracy": acc}
  runs = {"scaffold": [hist(1, [0.5, 0.4, 0.3], 0.8), hist(2, [0.5, 9.0, math.nan], 0.1),
                       hist(3, [0.5, math.inf], 0.1)],
          "fedavg": [hist(s, [0.5, 0.3, 0.2], 0.9) for s in (1, 2, 3)]}
  table = federated.summarize(runs)
  sc = table["scaffold"]
  assert [s["diverged_at_round"] for s in sc["per_seed"]] == [None, 30, 20]
  assert sc["test_accuracy"][0] == pytest.approx(0.8) and sc["test_accuracy"][2] == 1
  assert sc["final_train_loss"][0] == pytest.approx(0.3)
  setting = federated.FederatedTrainConfig(alpha=0.1, rounds=30)
  md = report.federated_markdown(setting, ["fedavg", "scaffold"], [1, 2, 3], table, "cmd")
  assert "| FedAvg | 0.9000 ± 0.0000 | 0.2000 ± 0.0000 | – |" in md, md
  assert "| SCAFFOLD | 0.8000 (1/3) | 0.3000 (1/3) | 2/3 (round 20–30) |" in md, md
  assert "untuned for this setting" in md
  md = report.federated_markdown(setting, ["fedavg"], [1, 2, 3], table, "cmd",
                                 hparams_key=setting.hparams_key())
  assert "the paper's Table 7, entry `fmnist_mlp/fed/N400/K10/B20/E1/a0.1`" in md, md
  runs["scaffold"] = runs["scaffold"][1:]
  md = report.federated_markdown(setting, ["scaffold"], [2, 3], federated.summarize(runs), "c")
  assert "| SCAFFOLD | – | – | 2/2 (round 20–30) |" in md, md


def test_table_7_golden_values():
  """The paper's Table 7 (gamma = clients' lr, eta = server lr), per task and alpha."""
  expect = {"fmnist_mlp": {"fedadam": (0.1, 1e-3), "fedyogi": (0.1, 1e-3),
                           "fedadagrad": (0.1, 1e-2), "fedavg": (0.1, None),
                           "scaffold": (0.01, 1.0)},
            "cifar10_cnn": {"fedadam": (0.1, 1e-2), "fedyogi": (0.1, 1e-2),
                            "fedadagrad": (0.1, 0.1), "scaffold": (0.05, 1.0)}}
  for task, rows in expect.items():
    for alpha in (100, 0.1):
      key, table = federated.table_hparams(federated.FederatedTrainConfig(task=task, alpha=alpha))
      assert key == f"{task}/fed/N400/K10/B20/E1/a{alpha:g}"
      for m, (gamma, eta) in rows.items():
        assert table[m] == ({"local_lr": gamma} if eta is None else
                            {"local_lr": gamma, "server_lr": eta}), (task, alpha, m)
  # FedAvg on CIFAR-10: gamma 1 at alpha 100, 0.1 at alpha 0.1.
  for alpha, gamma in ((100, 1.0), (0.1, 0.1)):
    _, table = federated.table_hparams(federated.FederatedTrainConfig(task="cifar10_cnn",
                                                                      alpha=alpha))
    assert table["fedavg"] == {"local_lr": gamma}
  # A setting the paper did not run has no entry.
  assert federated.table_hparams(federated.FederatedTrainConfig(alpha=0.5)) == (None, {})
  assert federated.table_hparams(federated.FederatedTrainConfig(alpha=0.1, num_clients=200)
                                 ) == (None, {})


class _Stop(Exception):
  pass


def _capture_configs(monkeypatch):
  """Make train_federated record the configs it is given instead of training."""
  seen = []

  def fake(cfg, meta_params=None, **_):
    seen.append(cfg)
    raise _Stop
  monkeypatch.setattr(federated, "train_federated", fake)
  return seen


@pytest.mark.parametrize("extra, local_lr, server_lr", [
    ([], 0.01, 1.0), (["--local-lr", "0.05"], 0.05, 1.0),
    (["--server-lr", "0.5"], 0.01, 0.5)])
def test_train_in_the_paper_setting_takes_table_7_unless_a_flag_sets_it(
    extra, local_lr, server_lr, monkeypatch, tmp_path, capsys):
  seen = _capture_configs(monkeypatch)
  with pytest.raises(_Stop):
    cli.main(["train", "--federated", "--alpha", "0.1", "--server", "scaffold", "--rounds", "1",
              "--out", str(tmp_path), *extra])
  (cfg,) = seen
  assert (cfg.local_lr, cfg.server_hparams()["server_lr"]) == (local_lr, server_lr)
  assert "Table 7 values for fmnist_mlp/fed/N400/K10/B20/E1/a0.1" in capsys.readouterr().err


def test_evaluate_in_the_paper_setting_runs_each_baseline_at_its_table_7_values(
    monkeypatch, tmp_path):
  seen = _capture_configs(monkeypatch)
  for method, lr, server_lr in (("fedyogi", 0.1, 1e-3), ("fedadagrad", 0.1, 1e-2),
                                ("scaffold", 0.01, 1.0), ("fedavg", 0.1, 1.0)):
    for extra, want_lr in (([], lr), (["--local-lr", "0.03"], 0.03)):
      with pytest.raises(_Stop):
        cli.main(["evaluate", "--federated", "--alpha", "100", "--methods", method, "--seeds",
                  "1", "--rounds", "1", "--cache", str(tmp_path), "--out", str(tmp_path),
                  "--quiet", *extra])
      cfg = seen.pop()
      assert (cfg.server, cfg.local_lr, cfg.server_hparams()["server_lr"]) == (
          method, want_lr, server_lr)


def test_fedlopt_weights_for_the_setting_are_preferred(monkeypatch):
  from optax_localsgd import pretrained
  names = ["lopt_a/fmnist_mlp_k8_h4", "lopt_a/fedfmnist_mlp_k10_a0.1", "lagg_a/fmnist_mlp_k10_h4"]
  monkeypatch.setattr(pretrained, "available", lambda: names)
  assert federated.default_weights("lopt_a", "fmnist_mlp", 10, 0.1) == "lopt_a/fedfmnist_mlp_k10_a0.1"
  # None for this alpha: LOpt-A's main-setting weights (it does not depend on K).
  assert federated.default_weights("lopt_a", "fmnist_mlp", 10, 100) == "lopt_a/fmnist_mlp_k8_h4"
  assert federated.default_weights("lagg_a", "fmnist_mlp", 10, 0.1) == "lagg_a/fmnist_mlp_k10_h4"
  assert federated.default_weights("fedavg", "fmnist_mlp", 10, 0.1) is None
