"""``meta-train --federated`` (issue 16, FedLOpt): PES inner problems that are federated rounds,
K of N Dirichlet-skewed clients per round, on real Fashion-MNIST cut among 12 clients."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SMALL_MLP
from optax_localsgd import cli, data, engine, pretrained, tasks
from optax_localsgd.meta import problem
from optax_localsgd.meta.train import FederatedMeta, _setup, meta_train
from optax_localsgd.transforms import baselines, lopt_a
from test_meta_train import tiny

FED = FederatedMeta(alpha=0.5, num_clients=12, local_epochs=0.02)


def test_the_inner_problem_is_the_federated_round_on_the_dirichlet_partition():
  cfg = tiny(workers=3, batch_size=8, federated=FED)
  groups, datas, state = _setup(cfg)
  g, d = groups[0], datas[0]
  assert isinstance(g.round_cfg, engine.FederatedConfig) and isinstance(d, engine.ClientData)
  assert (g.round_cfg.num_clients, g.round_cfg.clients_per_round, g.round_cfg.batch_size,
          g.round_cfg.local_epochs, g.round_cfg.per_worker_deltas) == (12, 3, 8, 0.02, False)
  # The clients hold the Dirichlet partition drawn from the run's seed (plus the group index).
  labels = np.asarray(tasks.load_split(g.task, "train", None)["y"])
  parts = data.dirichlet_partition(labels, 12, 0.5, cfg.seed)
  np.testing.assert_array_equal(np.asarray(d.sizes), [len(p) for p in parts])
  assert len(set(np.asarray(d.sizes).tolist())) > 1  # skewed: the clients differ in size
  # The meta-loss of an unroll is the mean local loss of that many federated rounds, each drawn
  # from its own round key, from the same init.
  theta = state.theta
  rounds = 3
  got = float(jax.jit(lambda th: problem.evaluate_meta_loss(th, g, d, rounds, seeds=(0,)))(theta))
  key = jax.random.fold_in(jax.random.PRNGKey(0), 12345)
  params = g.task.init(problem._init_key(key))
  server = lopt_a(theta)
  round_fn = jax.jit(engine.make_federated_round_fn(
      g.task.loss, engine.batch_fn_for(g.task), baselines.worker_sgd(g.local_lr), server,
      g.round_cfg))
  fstate = engine.init_federated_state(server, g.round_cfg, params)
  losses = []
  for r in range(rounds):
    params, fstate, m = round_fn(params, fstate,
                                 jax.random.fold_in(problem._round_key_base(key), r), d)
    losses.append(float(m["train_loss"]))
  np.testing.assert_allclose(got, np.mean(losses), rtol=1e-5)
  # LAgg-A reads the stack of the K clients' deltas.
  lagg_groups, _, _ = _setup(tiny(optimizer="lagg_a", workers=3, batch_size=8, federated=FED))
  assert lagg_groups[0].round_cfg.per_worker_deltas


def test_meta_train_federated_from_the_command_line(tmp_path, capsys):
  args = ["meta-train", "--optimizer", "lopt_a", "--task", SMALL_MLP, "--federated", "--alpha",
          "0.5", "--clients", "12", "--clients-per-round", "3", "--local-epochs", "0.02",
          "--tasks-per-estimate", "2", "--truncation", "2", "--min-inner", "4", "--max-inner",
          "8", "--outer-steps", "2", "--warmup-steps", "1", "--quiet", "--out", str(tmp_path)]
  assert cli.main(args) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["step"] == 2 and np.isfinite(summary["last_meta_loss"])
  info = pretrained.metadata(summary["weights"])["info"]
  # K is the clients per round; B defaults to the paper's 20; no single H.
  assert (info["K"], info["batch_size"], info["H"]) == (3, 20, None)
  assert info["federated"] == {"alpha": 0.5, "num_clients": 12, "local_epochs": 0.02}
  log = json.loads((tmp_path / "log.json").read_text())
  assert log["config"]["federated"]["alpha"] == 0.5 and "local_steps" not in log["config"]


@pytest.mark.parametrize("extra, msg", [
    (["--federated"], "--federated needs --alpha A"),
    (["--alpha", "1"], "--alpha applies only with --federated"),
    (["--federated", "--alpha", "1", "-K", "4"], "--workers does not apply with --federated"),
    (["--federated", "--alpha", "1", "--compress", "top_k:0.1"],
     "--compress does not apply with --federated"),
    (["--federated", "--alpha", "0"], "--alpha must be a finite number > 0"),
    (["--federated", "--alpha", "1", "--clients", "5", "--clients-per-round", "6"],
     "cannot sample K=6 clients per round of N=5"),
    # An explicit 0 is an error, not the default.
    (["--federated", "--alpha", "1", "--local-epochs", "0"],
     "--local-epochs must be a finite number > 0"),
    (["--federated", "--alpha", "1", "--clients", "0"], "--clients must be >= 1"),
    (["-B", "0"], "--batch-size must be >= 1"),
])
def test_bad_federated_flags(extra, msg, tmp_path, capsys):
  args = ["meta-train", "--optimizer", "lopt_a", "--task", "fmnist_mlp", *extra,
          "--out", str(tmp_path / "o")]
  assert cli.main(args) == 2
  assert msg in capsys.readouterr().err
