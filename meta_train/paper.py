"""The paper's reported numbers (spec §6) and the rows of the reproduction grid.

Each ``GridRow`` names a test task, the metric the paper reports for it, and the paper's value
per optimizer (None where the paper shows only a curve). ``hyperadam reproduce`` runs every row
and writes our figure beside the paper's.
"""

from __future__ import annotations

import dataclasses

OPTIMIZERS = ("adam", "dm", "rnnprop", "hyperadam")


@dataclasses.dataclass(frozen=True)
class GridRow:
    section: str  # "Table 1", "Table 2", "Table 3", "Fig. 5(d)", "Longer horizons"
    label: str  # the row's name in the paper
    task: str  # test task key (meta_train/tasks/suite.py)
    metric: str  # "final_loss" or a test metric: "test_loss", "test_top1", "test_top2"
    paper: dict[str, float | None]  # optimizer → reported value (None: curve only)
    needs: str | None = None  # "cifar10" when the row needs --data-dir


def _p(adam, dm, rnnprop, hyperadam) -> dict[str, float | None]:
    return {"adam": adam, "dm": dm, "rnnprop": rnnprop, "hyperadam": hyperadam}


_NONE = _p(None, None, None, None)

TABLE1 = [
    GridRow("Table 1", "sigmoid", "mnist-nn-sigmoid-100", "final_loss", _p(0.35, 0.38, 0.34, 0.33)),
    GridRow("Table 1", "ReLU", "mnist-nn-relu-100", "final_loss", _p(0.32, 1.42, 0.31, 0.29)),
    GridRow("Table 1", "ELU", "mnist-nn-elu-100", "final_loss", _p(0.31, 2.02, 0.31, 0.28)),
    GridRow("Table 1", "tanh", "mnist-nn-tanh-100", "final_loss", _p(0.34, 0.83, 0.33, 0.36)),
]
TABLE2 = [
    GridRow("Table 2", "Baseline", "sin-lstm", "final_loss", _p(0.65, 3.10, 0.49, 0.42)),
    GridRow("Table 2", "Small noise", "sin-lstm-no001", "final_loss", _p(0.39, 3.06, 0.32, 0.19)),
    GridRow("Table 2", "2-layer", "sin-lstm-x2", "final_loss", _p(0.51, 2.05, 0.27, 0.26)),
]
TABLE3 = [
    GridRow("Table 3", "CNN-1 loss", "mnist-cnn1-10000", "test_loss", _p(0.10, 2.30, 0.36, 0.05)),
    GridRow(
        "Table 3",
        "CNN-1 top-1",
        "mnist-cnn1-10000",
        "test_top1",
        _p(0.9850, 0.1010, 0.9646, 0.9848),
    ),
    GridRow(
        "Table 3",
        "CNN-1 top-2",
        "mnist-cnn1-10000",
        "test_top2",
        _p(0.9959, 0.2038, 0.9903, 0.9963),
    ),
    GridRow("Table 3", "CNN-2 loss", "mnist-cnn2-10000", "test_loss", _p(0.09, 2.30, 2.30, 0.07)),
    GridRow(
        "Table 3",
        "CNN-2 top-1",
        "mnist-cnn2-10000",
        "test_top1",
        _p(0.9898, 0.1135, 0.1137, 0.9902),
    ),
    GridRow(
        "Table 3",
        "CNN-2 top-2",
        "mnist-cnn2-10000",
        "test_top2",
        _p(0.9980, 0.2145, 0.2169, 0.9978),
    ),
]
# Fig. 5(d), read off the plot (±0.05): final loss after 100 steps vs number of hidden layers.
_FIG5D = {
    "hyperadam": (0.35, 0.42, 0.58, 1.00, 1.36, 1.55, 1.79, 1.97, 2.05, 2.05),
    "rnnprop": (0.34, 0.41, 0.70, 0.94, 1.28, 1.63, 1.96, 2.08, 2.23, 2.30),
    "adam": (0.37, 0.50, 0.76, 1.37, 1.80, 1.98, 2.27, 2.30, 2.30, 2.30),
    "dm": (0.38, 0.43, 1.89, 2.18, 2.30, 2.30, 2.30, 2.30, 2.30, 2.30),
}
FIG5D = [
    GridRow(
        "Fig. 5(d)",
        f"{depth} hidden layer{'s' if depth > 1 else ''}",
        "mnist-nn-sigmoid-100" if depth == 1 else f"mnist-nn-l{depth}-sigmoid-100",
        "final_loss",
        {name: values[depth - 1] for name, values in _FIG5D.items()},
    )
    for depth in range(1, 11)
]
LONGER = [
    GridRow(
        "Longer horizons", "MLP sigmoid, 2 000 steps", "mnist-nn-sigmoid-2000", "final_loss", _NONE
    ),
    GridRow(
        "Longer horizons",
        "MLP sigmoid, 10 000 steps",
        "mnist-nn-sigmoid-10000",
        "final_loss",
        _NONE,
    ),
    GridRow(
        "Longer horizons",
        "MLP 9 layers, 10 000 steps (Fig. 7a)",
        "mnist-nn-l9-sigmoid-10000",
        "final_loss",
        _NONE,
    ),
    GridRow(
        "Longer horizons", "CNN-1 MNIST, 100 steps (Fig. 6a)", "mnist-cnn1-100", "final_loss", _NONE
    ),
    GridRow(
        "Longer horizons", "CNN-2 MNIST, 100 steps (Fig. 6b)", "mnist-cnn2-100", "final_loss", _NONE
    ),
    GridRow(
        "Longer horizons",
        "CNN-2 MNIST, 2 000 steps (Fig. 6c)",
        "mnist-cnn2-2000",
        "final_loss",
        _NONE,
    ),
    GridRow(
        "Longer horizons",
        "CNN-2 MNIST, 10 000 steps (Fig. 6d)",
        "mnist-cnn2-10000",
        "final_loss",
        _NONE,
    ),
    GridRow(
        "Longer horizons",
        "LSTM 2 layers, 10 000 steps (Fig. 7b)",
        "sin-lstm-x2-10000",
        "final_loss",
        _NONE,
    ),
    GridRow(
        "Longer horizons",
        "CNN-1 CIFAR-10 + BN, 100 steps (Fig. 6e)",
        "cifar10-cnn1-bn-100",
        "final_loss",
        _NONE,
        needs="cifar10",
    ),
    GridRow(
        "Longer horizons",
        "CNN-2 CIFAR-10 + dropout, 100 steps (Fig. 6f)",
        "cifar10-cnn2-dropout-100",
        "final_loss",
        _NONE,
        needs="cifar10",
    ),
    GridRow(
        "Longer horizons",
        "CNN-2 CIFAR-10, 2 000 steps (Fig. 6g)",
        "cifar10-cnn2-2000",
        "final_loss",
        _NONE,
        needs="cifar10",
    ),
    GridRow(
        "Longer horizons",
        "CNN-2 CIFAR-10, 10 000 steps (Fig. 6h)",
        "cifar10-cnn2-10000",
        "final_loss",
        _NONE,
        needs="cifar10",
    ),
]
GRID = TABLE1 + TABLE2 + TABLE3 + FIG5D + LONGER
