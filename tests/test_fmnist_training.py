"""Local SGD and SlowMo on the real Fashion-MNIST (installed by .ci/run), paper settings."""

import pytest

from optax_localsgd.harness import trainer


@pytest.fixture(scope="module")
def local_sgd_200():
  cfg = trainer.TrainConfig(task="fmnist_mlp", server="local_sgd", workers=8, local_steps=4,
                            batch_size=128, local_lr=0.3, rounds=200, eval_every=100)
  return trainer.train(cfg, progress=False)


def test_local_sgd_reaches_half_within_100_rounds(local_sgd_200):
  h = local_sgd_200
  at_100 = h["global_train_loss"][h["eval_rounds"].index(100)]
  assert at_100 < 0.5, at_100
  assert h["global_train_loss"][0] > 2.0  # it started from scratch
  assert len(h["train_loss"]) == 200


def test_slowmo_beats_local_sgd_after_200_rounds(local_sgd_200):
  cfg = trainer.TrainConfig(task="fmnist_mlp", server="slowmo", workers=8, local_steps=4,
                            batch_size=128, local_lr=0.1, server_lr=1.0, momentum=0.95,
                            rounds=200, eval_every=200)
  h = trainer.train(cfg, progress=False)
  assert h["global_train_loss"][-1] < local_sgd_200["global_train_loss"][-1]
  assert h["test_accuracy"] > 0.8
