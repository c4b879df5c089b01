"""Server-side transforms: they map worker deltas to the update of the global weights.

* :mod:`~optax_localsgd.transforms.averaging`: ``local_sgd`` (model averaging) and ``slowmo``;
* :mod:`~optax_localsgd.transforms.baselines`: the workers' SGD, DiLoCo and the adaptive
  federated optimizers, as Optax compositions;
* :mod:`~optax_localsgd.transforms.scaffold`: SCAFFOLD's client control variates, a hook of
  the federated round;
* :mod:`~optax_localsgd.transforms.learned`: the learned optimizers ``lopt_a`` and ``lagg_a``.
"""

from optax_localsgd.transforms.averaging import (LocalSGDState, SlowMoState, local_sgd,
                                                 slowmo)
from optax_localsgd.transforms.learned.transform import LearnedOptState, lagg_a, lopt_a
from optax_localsgd.transforms.scaffold import ScaffoldClient

__all__ = [
    "LearnedOptState", "LocalSGDState", "ScaffoldClient", "SlowMoState", "lagg_a", "local_sgd",
    "lopt_a", "slowmo",
]
