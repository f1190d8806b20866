"""CIFAR-10 as an ImageDataset, read from the standard python-pickle batches (spec §5.2).

No package ships CIFAR-10 (design §4), so the caller names a folder holding the files of
``cifar-10-python.tar.gz`` (``data_batch_1`` … ``data_batch_5`` and ``test_batch``), either
directly or in its ``cifar-10-batches-py`` subfolder. The batches are unpickled with an
allow-list unpickler: they are data, and must never be able to run code.
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import numpy as np
import torch

from ._common import ImageDataset, UnsafePickleError, check_labels, restricted_load

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
SUBFOLDER = "cifar-10-batches-py"
IMAGE_SHAPE = (3, 32, 32)
_EXPECTED = f"{', '.join(TRAIN_FILES)}, {TEST_FILE}"


def load_cifar10(data_dir: str | Path | None) -> ImageDataset:
    """Loads CIFAR-10 (cached per folder: repeated calls return the same object).

    Images become NCHW float32 ``x/255 − 0.5`` in [−0.5, 0.5] (spec §5.2, [TF] ``vgg.py``).
    Each pickle row is the 1024 red, then green, then blue bytes of a 32×32 image in row-major
    order, so a plain reshape to ``[3, 32, 32]`` is already NCHW.

    Args:
      data_dir (str | Path): the folder with the batches, or its parent holding
        ``cifar-10-batches-py``. Required: there is no bundled copy.

    Returns:
      An ``ImageDataset`` named ``"cifar10"`` (50,000 train and 10,000 test images for the
      official files).

    Raises:
      FileNotFoundError: ``data_dir`` is None or lacks some of the six files (the message lists
        them).
      ValueError: a batch is not the expected dict of ``b'data'`` uint8 ``[n, 3072]`` and ``n``
        ``b'labels'`` in 0..9.
      UnsafePickleError: a batch names a global outside the allow-list (nothing is run).
    """
    if data_dir is None:
        raise FileNotFoundError(
            "CIFAR-10 needs data_dir: no package ships it. Download cifar-10-python.tar.gz "
            f"(https://www.cs.toronto.edu/~kriz/cifar.html), extract it and pass the folder "
            f"holding {_EXPECTED} (or its parent)"
        )
    return _load_cifar10(Path(data_dir).expanduser().resolve())


@functools.lru_cache(maxsize=2)
def _load_cifar10(folder: Path) -> ImageDataset:
    batch_dir = _find_batch_dir(folder)
    train = [read_batch(batch_dir / name) for name in TRAIN_FILES]
    test_images, test_labels = read_batch(batch_dir / TEST_FILE)
    return ImageDataset(
        train_images=_pixels(np.concatenate([x for x, _ in train])),
        train_labels=torch.from_numpy(np.concatenate([y for _, y in train])),
        test_images=_pixels(test_images),
        test_labels=torch.from_numpy(test_labels),
        name="cifar10",
        image_shape=IMAGE_SHAPE,
    )


def _find_batch_dir(folder: Path) -> Path:
    candidates = (folder, folder / SUBFOLDER)
    for candidate in candidates:
        if all((candidate / name).is_file() for name in (*TRAIN_FILES, TEST_FILE)):
            return candidate
    missing = [n for n in (*TRAIN_FILES, TEST_FILE) if not (folder / n).is_file()]
    raise FileNotFoundError(
        f"CIFAR-10 batches missing in {folder} (and in {folder / SUBFOLDER}): "
        f"{', '.join(missing)}; expected the python-pickle files {_EXPECTED} "
        "from cifar-10-python.tar.gz"
    )


def read_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads one CIFAR-10 python batch with the restricted unpickler.

    Returns:
      ``(data, labels)``: uint8 ``[n, 3072]`` and int64 ``[n]``.

    Raises:
      ValueError: the file is not a dict with ``b'data'`` uint8 ``[n, 3072]`` and ``n``
        ``b'labels'`` in 0..9 (truncated files included).
      UnsafePickleError: the file names a global outside the allow-list (nothing is run).
    """
    path = Path(path)
    with path.open("rb") as f:
        try:
            batch = restricted_load(f, encoding="bytes")
        except UnsafePickleError:
            raise
        except (EOFError, ValueError, TypeError, pickle.UnpicklingError) as err:  # truncated
            raise ValueError(f"{path}: not a readable CIFAR-10 batch ({err!r})") from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path}: expected a dict with b'data' and b'labels', got {keys}")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(f"{path}: b'data' must be a uint8 [n, 3072] array")
    if data.shape[1] != 3072:
        raise ValueError(f"{path}: b'data' rows have {data.shape[1]} bytes, expected 3072")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{path}: {data.shape[0]} images but b'labels' has shape {labels.shape} "
            f"({labels.dtype})"
        )
    check_labels(labels, 10, str(path))
    return data, labels.astype(np.int64)


def _pixels(data: np.ndarray) -> torch.Tensor:
    images = torch.from_numpy(data.reshape(-1, *IMAGE_SHAPE).astype(np.float32))
    return images.div_(255.0).sub_(0.5)
