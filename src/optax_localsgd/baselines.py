"""``from optax_localsgd import baselines`` as documented before the package had rooms: a thin
re-export of :mod:`optax_localsgd.transforms.baselines`, where the code lives."""

from optax_localsgd.transforms.baselines import (diloco, fedadagrad, fedadam, fedyogi,
                                                 scaffold, worker_sgd)

__all__ = ["diloco", "fedadagrad", "fedadam", "fedyogi", "scaffold", "worker_sgd"]
