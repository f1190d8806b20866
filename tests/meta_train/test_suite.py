"""The named test tasks of spec §5: keys, horizons, Adam lrs and what build_test_task returns."""

import pickle

import numpy as np
import pytest
import torch

from meta_train.tasks import TEST_TASKS, CNNTask, MLPTask, SineLSTMTask, build_test_task
from meta_train.tasks.suite import TestTaskSpec

EXPECTED_KEYS = {
    *(f"mnist-nn-{a}-100" for a in ("sigmoid", "relu", "elu", "tanh")),
    *(f"mnist-nn-l{d}-sigmoid-100" for d in range(2, 11)),
    "mnist-nn-sigmoid-2000",
    "mnist-nn-sigmoid-10000",
    "mnist-nn-l9-sigmoid-10000",
    *(f"mnist-cnn{a}-{t}" for a in (1, 2) for t in (100, 2000, 10000)),
    "cifar10-cnn1-bn-100",
    "cifar10-cnn2-dropout-100",
    "cifar10-cnn2-2000",
    "cifar10-cnn2-10000",
    "sin-lstm",
    "sin-lstm-no001",
    "sin-lstm-x2",
    "sin-lstm-x2-10000",
}


def test_table_has_exactly_the_paper_keys():
    assert set(TEST_TASKS) == EXPECTED_KEYS
    assert all(spec.key == key for key, spec in TEST_TASKS.items())


@pytest.mark.parametrize("key", sorted(EXPECTED_KEYS))
def test_horizon_matches_the_key(key):
    suffix = key.rsplit("-", 1)[-1]
    expected = int(suffix) if suffix in ("100", "2000", "10000") else 100
    assert TEST_TASKS[key].horizon == expected


@pytest.mark.parametrize(
    ("key", "lr"),
    [
        ("mnist-nn-sigmoid-100", 0.03125),
        ("mnist-nn-relu-100", 0.0220971),
        ("mnist-nn-tanh-100", 0.0110485),
        ("mnist-nn-l4-sigmoid-100", 0.015625),
        ("mnist-nn-l8-sigmoid-100", 0.0004883),
        ("mnist-nn-l10-sigmoid-100", 0.006905),
        ("mnist-nn-sigmoid-10000", 0.0078125),
        ("mnist-nn-l9-sigmoid-10000", 0.015625),
        ("mnist-cnn1-100", 0.015625),
        ("mnist-cnn1-2000", 0.015625),
        ("mnist-cnn1-10000", 0.0055625),
        ("mnist-cnn2-10000", 0.00255243),
        ("cifar10-cnn2-2000", 0.0023062),
        ("sin-lstm", 0.0220971),
        ("sin-lstm-no001", 0.03125),
    ],
)
def test_adam_learning_rates(key, lr):
    assert TEST_TASKS[key].adam_lr == lr


def test_only_table3_rows_report_test_accuracy():
    reporting = {k for k, s in TEST_TASKS.items() if s.reports_test_accuracy}
    assert reporting == {"mnist-cnn1-10000", "mnist-cnn2-10000"}


def test_values_not_in_the_spec_say_where_they_come_from():
    assert "not in the spec" in TEST_TASKS["mnist-cnn1-2000"].note


@pytest.mark.parametrize(
    ("key", "kind", "num_params"),
    [
        ("mnist-nn-sigmoid-100", MLPTask, 15_910),
        ("mnist-nn-l10-sigmoid-100", MLPTask, 19_690),
        ("mnist-nn-l9-sigmoid-10000", MLPTask, 19_270),
        ("mnist-cnn1-10000", CNNTask, 33_850),
        ("mnist-cnn2-100", CNNTask, 117_434),
        ("sin-lstm", SineLSTMTask, 1_781),
        ("sin-lstm-x2-10000", SineLSTMTask, 5_061),
    ],
)
def test_build_test_task(key, kind, num_params):
    task = build_test_task(key)
    assert isinstance(task, kind) and task.num_params == num_params and task.name == key
    g = torch.Generator().manual_seed(0)
    loss = task.loss(task.init_params(g), task.sample_batch(g))
    assert torch.isfinite(loss)


def test_every_mnist_and_sine_key_builds_with_its_settings():
    for key, spec in TEST_TASKS.items():
        if spec.dataset == "cifar10":
            continue
        task = build_test_task(key)
        if spec.model == "mlp":
            assert (task.depth, task.activation) == (spec.depth, spec.activation)
        elif spec.model == "lstm":
            assert (task.num_layers, task.noise_std) == (spec.lstm_layers, spec.noise_std)
        else:
            assert task.arch == spec.model


def test_lstm_noise_levels():
    assert build_test_task("sin-lstm-no001").noise_std == 0.01
    assert build_test_task("sin-lstm-x2").noise_std == 0.1


def test_unknown_key_lists_the_known_ones():
    with pytest.raises(
        ValueError, match=r"unknown test task 'mnist-nn-gelu-100'; known keys: mnist-nn"
    ):
        build_test_task("mnist-nn-gelu-100")


@pytest.mark.parametrize("key", ["cifar10-cnn1-bn-100", "cifar10-cnn2-10000"])
def test_cifar_tasks_need_the_data(key):
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10 needs data_dir"):
        build_test_task(key)


def test_cifar_tasks_from_a_data_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (30, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, 30).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    bn = build_test_task("cifar10-cnn1-bn-100", data_dir=tmp_path)
    dropout = build_test_task("cifar10-cnn2-dropout-100", data_dir=tmp_path)
    assert (bn.num_params, bn.batch_norm) == (43_738, True)
    assert (dropout.num_params, dropout.dropout) == (148_442, True)
    g = torch.Generator().manual_seed(0)
    batch = dropout.sample_batch(g)
    assert len(batch) == 3  # images, labels, dropout mask
    assert torch.isfinite(dropout.loss(dropout.init_params(g), batch))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "rnn"}, r"model must be one of \('mlp', 'cnn1', 'cnn2', 'lstm'\), got 'rnn'"),
        ({"dataset": "svhn"}, r"dataset must be one of"),
        ({"horizon": 0}, r"horizon must be >= 1, got 0"),
        ({"adam_lr": 0.0}, r"adam_lr must be > 0, got 0.0"),
    ],
)
def test_spec_validation(kwargs, message):
    fields = {
        "key": "k",
        "horizon": 100,
        "adam_lr": 0.01,
        "reports_test_accuracy": False,
        "model": "mlp",
        "dataset": "mnist",
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        TestTaskSpec(**fields)
