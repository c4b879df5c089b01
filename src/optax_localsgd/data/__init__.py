"""Loaders for the published on-disk formats of the datasets used in the experiments.

Every loader searches the places given by :func:`search_paths` (or only ``data_dir``), returns
host NumPy arrays, and fails with :class:`DatasetNotFoundError` (listing what was searched and
how to get the files) or :class:`CorruptDatasetError` (naming the file and the problem).
:func:`split_homogeneous` and :func:`dirichlet_partition` cut a dataset among workers or
federated clients.
"""

from optax_localsgd.data.cifar10 import load_cifar10
from optax_localsgd.data.dataset import ArrayDataset
from optax_localsgd.data.errors import CorruptDatasetError, DatasetNotFoundError
from optax_localsgd.data.fashion_mnist import load_fashion_mnist
from optax_localsgd.data.idx import read_idx
from optax_localsgd.data.imagenet import load_imagenet_downsampled
from optax_localsgd.data.partition import dirichlet_partition, label_counts
from optax_localsgd.data.paths import search_paths
from optax_localsgd.data.split import split_homogeneous
from optax_localsgd.data.text import load_text_bytes

__all__ = [
    "ArrayDataset", "CorruptDatasetError", "DatasetNotFoundError", "dirichlet_partition",
    "label_counts", "load_cifar10",
    "load_fashion_mnist", "load_imagenet_downsampled", "load_text_bytes", "read_idx",
    "search_paths", "split_homogeneous",
]
