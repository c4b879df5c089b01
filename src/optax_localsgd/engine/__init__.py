"""The engine: one communication round of local SGD as a pure, jittable function.

* :mod:`optax_localsgd.engine.round`: ``make_round_fn`` and friends (workers vmapped on one
  device or placed on a mesh), ``RoundConfig``, ``DeviceData``;
* :mod:`optax_localsgd.engine.batches`: how workers draw minibatches on the device;
* :mod:`optax_localsgd.engine.zero`: the server step sharded over the workers' devices
  (ZeRO-1), ``make_round_fn(..., shard_server=True)``;
* :mod:`optax_localsgd.engine.federated`: a federated round, K of N clients of different
  sizes sampled every round, with optional per-client state (SCAFFOLD).

Everything is re-exported here: ``from optax_localsgd import engine; engine.make_round_fn``.
"""

from optax_localsgd.engine.batches import (EVAL_SUBSET_SEED, BatchFn, batch_fn_for,
                                           classification_batch, eval_batches, make_lm_batch,
                                           sample_indices)
from optax_localsgd.engine.federated import (ClientData, ClientHook, FederatedConfig,
                                             FederatedState, client_data,
                                             dirichlet_client_data, federated_config,
                                             init_federated_state, make_federated_round_fn)
from optax_localsgd.engine.round import (WORKER_AXIS, CompressedState, DeviceData, LossFn,
                                         RoundConfig, init_round_state,
                                         make_data_parallel_round_fn, make_multi_round_fn,
                                         make_round_fn, replicate, worker_mesh)
from optax_localsgd.engine.zero import ShardedServerState

__all__ = [
    "BatchFn", "ClientData", "ClientHook", "CompressedState", "DeviceData", "EVAL_SUBSET_SEED",
    "FederatedConfig", "FederatedState", "LossFn", "RoundConfig", "ShardedServerState",
    "WORKER_AXIS", "batch_fn_for", "classification_batch", "client_data",
    "dirichlet_client_data", "eval_batches",
    "federated_config", "init_federated_state", "init_round_state", "make_data_parallel_round_fn",
    "make_federated_round_fn", "make_lm_batch", "make_multi_round_fn", "make_round_fn",
    "replicate", "sample_indices", "worker_mesh",
]
