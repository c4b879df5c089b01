"""The learned server optimizers LOpt-A and LAgg-A, in five parts.

* :mod:`~optax_localsgd.transforms.learned.transform`: the Optax transforms ``lopt_a`` and
  ``lagg_a``;
* :mod:`~optax_localsgd.transforms.learned.features`: the Ada features they feed the MLP;
* :mod:`~optax_localsgd.transforms.learned.mlp`: the per-parameter MLP step;
* :mod:`~optax_localsgd.transforms.learned.blocked`: the same step over blocks of a tensor, in
  bounded memory (the default);
* :mod:`~optax_localsgd.transforms.learned.params`: the meta-parameters (``MetaParams``,
  ``LearnedOptimizerConfig``, ``init_lopt_a``, ``init_lagg_a``).
"""

from optax_localsgd.transforms.learned.transform import LearnedOptState, lagg_a, lopt_a

__all__ = ["LearnedOptState", "lagg_a", "lopt_a"]
