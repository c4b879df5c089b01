"""Server-side transforms: they map worker deltas to the update of the global weights."""

from optax_localsgd.transforms.averaging import (LocalSGDState, SlowMoState, local_sgd,
                                                 slowmo)
from optax_localsgd.transforms.learned import LearnedOptState, lagg_a, lopt_a

__all__ = [
    "LearnedOptState", "LocalSGDState", "SlowMoState", "lagg_a", "local_sgd", "lopt_a",
    "slowmo",
]
