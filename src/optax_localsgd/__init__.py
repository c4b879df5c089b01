"""optax-localsgd: learned and hand-designed server optimizers for local SGD, as Optax transforms.

Convention: the input of every server transform is the worker delta
``Delta = W_old - W_new`` (the sign of a gradient), averaged over workers, or for ``lagg_a``
stacked over workers on a new leading axis. The output is added with ``optax.apply_updates``.
"""

from optax_localsgd._version import __version__
from optax_localsgd.errors import UsageError
from optax_localsgd.transforms.learned.features import AdaAccumulators
from optax_localsgd.transforms.learned.params import (LearnedOptimizerConfig, MetaParams,
                                                      init_lagg_a, init_lopt_a)
from optax_localsgd import pretrained
from optax_localsgd.transforms import (LearnedOptState, LocalSGDState, SlowMoState, lagg_a,
                                       local_sgd, lopt_a, slowmo)

__all__ = [
    "AdaAccumulators", "LearnedOptState", "LearnedOptimizerConfig", "LocalSGDState",
    "MetaParams", "SlowMoState", "UsageError", "__version__", "init_lagg_a", "init_lopt_a",
    "lagg_a", "local_sgd", "lopt_a", "pretrained", "slowmo",
]
