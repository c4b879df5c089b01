"""The experiment harness behind the CLI: named server optimizers, a training loop, sweeps,
evaluations and their reports.

* :mod:`~optax_localsgd.harness.servers`: server optimizers by name (``local_sgd``, ``diloco``,
  ``lopt_a``, ...) with their defaults;
* :mod:`~optax_localsgd.harness.trainer`: ``optax-localsgd train``: rounds scanned on device,
  periodic evaluation;
* :mod:`~optax_localsgd.harness.sweep`: ``optax-localsgd sweep``: tuning the baselines
  (``tuned_hparams.json`` ships next to it);
* :mod:`~optax_localsgd.harness.evaluation`, :mod:`~optax_localsgd.harness.report`:
  ``optax-localsgd evaluate``: learned against tuned optimizers, tables and curves;
* :mod:`~optax_localsgd.harness.demo`: ``optax-localsgd demo``;
* :mod:`~optax_localsgd.harness.federated`: ``optax-localsgd train --federated`` and
  ``evaluate --federated``: N Dirichlet-skewed clients, K sampled per round.

The library (``optax_localsgd.lopt_a`` and the rest) never imports it.
"""
