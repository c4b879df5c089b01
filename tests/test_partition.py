"""Dirichlet label-skew partitions (issue 16): a partition, seeded, skewed as alpha says."""

import numpy as np
import pytest

from optax_localsgd.data import dirichlet_partition, label_counts

# Fashion-MNIST's training labels have this shape: 10 balanced classes. A tenth of its size
# keeps the tests fast; 40 clients keeps the paper's 150 examples per client.
LABELS = np.repeat(np.arange(10), 600)


def _is_partition(parts, n):
  allidx = np.concatenate(parts)
  assert allidx.size == n and np.array_equal(np.sort(allidx), np.arange(n))


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
@pytest.mark.parametrize("min_size", [0, 1, 20])
def test_disjoint_and_complete(alpha, min_size):
  parts = dirichlet_partition(LABELS, 40, alpha, seed=3, min_size=min_size)
  assert len(parts) == 40
  _is_partition(parts, LABELS.size)
  assert min(p.size for p in parts) >= min_size
  assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)


def test_the_seed_decides():
  a = dirichlet_partition(LABELS, 40, 0.5, seed=1)
  b = dirichlet_partition(LABELS, 40, 0.5, seed=1)
  c = dirichlet_partition(LABELS, 40, 0.5, seed=2)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_alpha_100_is_close_to_uniform():
  counts = label_counts(dirichlet_partition(LABELS, 40, 100.0, seed=0), LABELS)
  sizes = counts.sum(1)
  assert np.all(np.abs(sizes - 150) <= 30)  # 150 +- 20%
  mix = counts / sizes[:, None]
  # Every client's label mix is within 0.08 (total variation) of the uniform 10% each.
  assert np.all(0.5 * np.abs(mix - 0.1).sum(1) < 0.08)
  assert np.all(counts > 0)


def test_alpha_01_is_dominated_by_a_few_labels():
  counts = label_counts(dirichlet_partition(LABELS, 40, 0.1, seed=0), LABELS)
  mix = counts / counts.sum(1, keepdims=True)
  top2 = np.sort(mix, axis=1)[:, -2:].sum(1)
  # On Dir(0.1), the two most common labels hold most of a client's data: here about 90% of them
  # on the median client (seeds 0-2: 0.90-0.92), against 20% for a uniform mix.
  assert np.median(top2) > 0.85
  assert np.mean(top2 > 0.75) > 0.7
  # and most clients miss most labels.
  assert np.median((counts > 0).sum(1)) <= 4


def test_top_up_moves_few_examples_and_keeps_the_skew():
  plain = label_counts(dirichlet_partition(LABELS, 40, 0.1, seed=0, min_size=0), LABELS)
  topped = label_counts(dirichlet_partition(LABELS, 40, 0.1, seed=0, min_size=20), LABELS)
  assert topped.sum(1).min() >= 20 and plain.sum(1).min() < 20
  moved = np.abs(topped - plain).sum() / 2
  assert moved <= 40 * 20


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_alpha_must_be_positive(alpha):
  with pytest.raises(ValueError, match="alpha must be a positive"):
    dirichlet_partition(LABELS, 4, alpha, seed=0)


def test_more_clients_than_examples():
  with pytest.raises(ValueError, match="more clients than examples"):
    dirichlet_partition(np.arange(5) % 2, 6, 1.0, seed=0)
  with pytest.raises(ValueError, match="min_size"):
    dirichlet_partition(np.arange(10) % 2, 4, 1.0, seed=0, min_size=3)


def test_bad_labels():
  with pytest.raises(ValueError, match="1-D integer"):
    dirichlet_partition(np.zeros((3, 2), np.int32), 2, 1.0, seed=0)
  with pytest.raises(ValueError, match="1-D integer"):
    dirichlet_partition(np.zeros(4), 2, 1.0, seed=0)


def test_partition_plot(tmp_path):
  # matplotlib comes with the test extra (CI installs it): a missing one fails, never skips.
  from optax_localsgd.util import plotting
  counts = label_counts(dirichlet_partition(LABELS, 40, 0.1, seed=0), LABELS)
  plotting.plot_partition(counts, tmp_path / "p.png", "alpha = 0.1")
  assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
