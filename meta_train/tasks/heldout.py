"""The held-out suite: tasks that are in no meta-training family, to judge generalisation.

Every task here differs from what any ``MetaTaskFamily`` samples in its architecture (LayerNorm,
BatchNorm, residual blocks, GRU/LSTM sequence models, a transformer, an autoencoder, convex
problems), its activation (GELU, SiLU), its data (14×14 MNIST rows, the standard library's
sources, generated spirals and ill-conditioned designs) or its horizon (1 000–10 000 steps).
Only data that ships with the dependencies or is generated is used.

Neural tasks are ``ModuleTask``s: an ``nn.Module`` whose parameters live in one flat vector
(``torch.func.functional_call`` on views of it), initialised with the module's own PyTorch
initialisation under a seeded RNG — the way a user's model starts, not N(0, 0.1²). The convex
tasks report the *excess* loss f(w) − f* (f* computed in float64 when the task is built), so a
ratio of two optimizers' final losses says how much closer to the optimum one got.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import load_mnist
from ..data.text import VOCAB_SIZE, load_stdlib_corpus, sample_windows
from .base import Batch, Task
from .cnn import CNNTask

# -- data ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def mnist14() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST average-pooled to 14×14: (train images [N, 196], labels, test images, labels)."""
    mnist = load_mnist()

    def pool(images: Tensor) -> Tensor:
        return F.avg_pool2d(images.view(-1, 1, 28, 28), 2).reshape(-1, 196).contiguous()

    return (
        pool(mnist.train_images),
        mnist.train_labels,
        pool(mnist.test_images),
        mnist.test_labels,
    )


SPIRAL_NOISE = 0.35  # angular noise: the arms overlap, so the best loss is well above 0


def spirals(num_points: int, num_classes: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``num_points`` fresh points of ``num_classes`` interleaved noisy spiral arms.

    Drawn anew for every minibatch (infinite data): a fixed sample would be memorised and its
    loss driven to ~0, where ratios of final losses mean nothing.
    """
    labels = torch.randint(num_classes, (num_points,), generator=generator)
    radius = 0.05 + 0.95 * torch.rand(num_points, generator=generator)
    angle = 4.0 * radius + labels * (2 * math.pi / num_classes)
    angle = angle + SPIRAL_NOISE * torch.randn(num_points, generator=generator)
    points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    return points, labels


# -- neural tasks over a flat parameter vector ------------------------------------------------


class ModuleTask(Task):
    """An ``nn.Module`` optimizee over one flat vector (views of it fed to ``functional_call``).

    Args:
      name: the task key.
      make_module: builds the module; called under a seeded RNG for every initialisation.
      sample: ``sample(generator) -> batch`` of module inputs followed by targets.
      loss_fn: ``loss_fn(outputs, targets) -> scalar``.
      eval_batches: held-out batches for ``test_metrics`` (optional).
    """

    def __init__(
        self,
        name: str,
        make_module: Callable[[], nn.Module],
        sample: Callable[[torch.Generator], Batch],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
    ) -> None:
        self.name = name
        self._make_module = make_module
        self._sample = sample
        self._loss_fn = loss_fn
        self.module = make_module()
        self._names = [name for name, _ in self.module.named_parameters()]
        self._shapes = [tuple(p.shape) for _, p in self.module.named_parameters()]
        self._sizes = [math.prod(s) for s in self._shapes]
        if any(True for _ in self.module.buffers()):
            raise ValueError(f"{name}: modules with buffers are not supported (BN tracks stats?)")

    @property
    def num_params(self) -> int:
        return sum(self._sizes)

    @property
    def tensor_sizes(self) -> tuple[int, ...]:
        """Sizes of the model's tensors in flat order (for per-tensor optimizers)."""
        return tuple(self._sizes)

    def init_params(self, generator: torch.Generator) -> Tensor:
        seed = int(torch.randint(2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = self._make_module()
        return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).float()

    def sample_batch(self, generator: torch.Generator) -> Batch:
        return self._sample(generator)

    def loss(self, params: Tensor, batch: Batch) -> Tensor:
        *inputs, targets = batch
        pieces = params.split(self._sizes)
        named = {
            n: piece.view(shape)
            for n, piece, shape in zip(self._names, pieces, self._shapes, strict=True)
        }
        outputs = torch.func.functional_call(self.module, named, tuple(inputs))
        return self._loss_fn(outputs, targets)


class _NormMLP(nn.Module):
    """Linear → norm → activation blocks, then a linear read-out."""

    def __init__(self, sizes: list[int], norm: str, activation: str) -> None:
        super().__init__()
        act = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}[activation]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1], strict=True):
            layers.append(nn.Linear(fan_in, fan_out))
            if norm == "layer":
                layers.append(nn.LayerNorm(fan_out))
            elif norm == "batch":
                layers.append(nn.BatchNorm1d(fan_out, track_running_stats=False))
            layers.append(act())
        layers.append(nn.Linear(sizes[-2], sizes[-1]))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _ResidualCNN(nn.Module):
    """conv → [BN-ReLU-conv-BN + skip, ReLU] × blocks → global average pool → linear."""

    def __init__(self, channels: int, blocks: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.BatchNorm2d(channels, track_running_stats=False),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.BatchNorm2d(channels, track_running_stats=False),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 3, padding=1),
            )
            for _ in range(blocks)
        )
        self.head = nn.Linear(channels, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x.view(-1, 1, 14, 14))
        for block in self.blocks:
            h = h + block(h)
        return self.head(F.relu(h).mean(dim=(2, 3)))


class _RowRNN(nn.Module):
    """An LSTM or GRU reading a 14×14 image row by row; the last state classifies it."""

    def __init__(self, cell: str, hidden: int) -> None:
        super().__init__()
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](14, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x.view(-1, 14, 14))
        return self.head(out[:, -1])


class _CharGRU(nn.Module):
    """A character language model: embedding → GRU → linear over the vocabulary."""

    def __init__(self, embed: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, embed)
        self.rnn = nn.GRU(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, VOCAB_SIZE)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.head(out)


class _CharTransformer(nn.Module):
    """A small causal transformer language model (pre-norm blocks, learned positions)."""

    def __init__(self, width: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        block = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB_SIZE)
        self.context = context

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[1]
        mask = torch.triu(torch.full((n, n), float("-inf")), diagonal=1)
        h = self.embed(x) + self.position[:n]
        return self.head(self.norm(self.blocks(h, mask=mask, is_causal=True)))


class _Autoencoder(nn.Module):
    """784 → 256 → 32 → 256 → 784, ReLU inside, logits out (Bernoulli likelihood)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 32), nn.ReLU(),
            nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 784),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _image_sampler(images: Tensor, labels: Tensor, batch_size: int):
    def sample(generator: torch.Generator) -> Batch:
        index = torch.randint(images.shape[0], (batch_size,), generator=generator)
        return images.index_select(0, index), labels.index_select(0, index)

    return sample


def _lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1))


# -- convex tasks with a known optimum --------------------------------------------------------


class _ConvexTask(Task):
    """A full-batch convex problem whose reported loss is the excess f(w) − f* (f* in float64)."""

    def __init__(self, name: str, features: Tensor, targets: Tensor) -> None:
        self.name = name
        self.features = features.float()
        self.targets = targets.float()
        # f* of the fp32 data the optimizers see (the float64 design rounds differently).
        self.optimum = self._solve(self.features.double(), self.targets.double())

    @property
    def num_params(self) -> int:
        return self.features.shape[1]

    def init_params(self, generator: torch.Generator) -> Tensor:
        return torch.randn(self.num_params, generator=generator)

    def sample_batch(self, generator: torch.Generator) -> Batch:
        del generator
        return (self.features, self.targets)

    def loss(self, params: Tensor, batch: Batch) -> Tensor:
        return self.objective(params, *batch) - self.optimum

    def objective(self, params: Tensor, features: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def _solve(self, features: Tensor, targets: Tensor) -> float:
        raise NotImplementedError


def _ill_conditioned_design(
    rows: int, cols: int, condition: float, seed: int
) -> tuple[Tensor, torch.Generator]:
    """A ``rows × cols`` matrix whose singular values are log-spaced over [1, √condition]
    (so its Gram matrix has condition number ``condition``), with random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    s = torch.logspace(0, 0.5 * math.log10(condition), cols, dtype=torch.float64)
    return (u * s) @ v.T, g


class LeastSquaresTask(_ConvexTask):
    """½·mean((Xw − y)²) with cond(XᵀX) = ``condition``; y = Xw* + noise."""

    def __init__(self, name: str, *, rows: int, cols: int, condition: float, seed: int) -> None:
        x, g = _ill_conditioned_design(rows, cols, condition, seed)
        x = x / x.norm(dim=0).max() * math.sqrt(rows)  # largest column RMS ~1
        y = x @ torch.randn(cols, generator=g, dtype=torch.float64)
        y = y + 0.1 * torch.randn(rows, generator=g, dtype=torch.float64)
        super().__init__(name, x, y)

    def objective(self, params: Tensor, features: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * (features @ params - targets).square().mean()

    def _solve(self, features: Tensor, targets: Tensor) -> float:
        w = torch.linalg.lstsq(features, targets.unsqueeze(1)).solution.squeeze(1)
        return float(0.5 * (features @ w - targets).square().mean())


class LogisticRegressionTask(_ConvexTask):
    """Mean logistic loss on an ill-conditioned design, labels from a noisy linear rule."""

    def __init__(self, name: str, *, rows: int, cols: int, condition: float, seed: int) -> None:
        x, g = _ill_conditioned_design(rows, cols, condition, seed)
        x = x / x.norm(dim=0).max() * math.sqrt(rows)
        w_true = torch.randn(cols, generator=g, dtype=torch.float64)
        margin = x @ w_true
        flip = torch.rand(rows, generator=g, dtype=torch.float64) < torch.sigmoid(-margin.abs())
        y = ((margin > 0) ^ flip).double()
        super().__init__(name, x, y)

    def objective(self, params: Tensor, features: Tensor, targets: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(features @ params, targets)

    def _solve(self, features: Tensor, targets: Tensor) -> float:
        # Newton's method with backtracking in float64: the Hessian's condition number is the
        # design's, which first-order methods cannot get through but Newton does not notice.
        def f(w: Tensor) -> float:
            return float(F.binary_cross_entropy_with_logits(features @ w, targets))

        w = torch.zeros(features.shape[1], dtype=torch.float64)
        for _ in range(200):
            p = torch.sigmoid(features @ w)
            grad = features.T @ (p - targets) / len(targets)
            hess = (features.T * (p * (1 - p))) @ features / len(targets)
            step = torch.linalg.solve(hess, grad)
            t, current = 1.0, f(w)
            while f(w - t * step) > current - 0.25 * t * float(grad @ step) and t > 1e-10:
                t *= 0.5
            w = w - t * step
            if float(grad @ step) < 1e-24:
                break
        return f(w)


# -- the suite ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HeldoutTaskSpec:
    """One held-out task.

    Attributes:
      key: the task's name; ``-T`` at its end is the horizon.
      horizon: optimizer steps per run.
      kind: the class of problem it stands for (for the report).
      build: builds the task (data loaded lazily, so listing the suite is free).
      quick_horizon: steps in ``--quick`` mode.
    """

    key: str
    horizon: int
    kind: str
    build: Callable[[], Task]
    quick_horizon: int = 20

    def digest(self) -> str:
        """Identity of the task for cached baselines: its key and its code's version tag."""
        return hashlib.sha256(f"{self.key}|{TASKS_VERSION}".encode()).hexdigest()[:16]


# Bump when a task's definition changes: cached Adam tunings keyed on the old one are redone.
TASKS_VERSION = 1


def _mlp_task(key: str, sizes: list[int], norm: str, act: str, *, small: bool) -> Task:
    if small:
        images, labels, _, _ = mnist14()
    else:
        mnist = load_mnist()
        images, labels = mnist.train_images, mnist.train_labels
    return ModuleTask(
        key,
        lambda: _NormMLP(sizes, norm, act),
        _image_sampler(images, labels, 128),
        F.cross_entropy,
    )


def _rescnn(key: str) -> Task:
    images, labels, _, _ = mnist14()
    return ModuleTask(
        key, lambda: _ResidualCNN(16, 2), _image_sampler(images, labels, 64), F.cross_entropy
    )


def _row_rnn(key: str, cell: str) -> Task:
    images, labels, _, _ = mnist14()
    return ModuleTask(
        key, lambda: _RowRNN(cell, 64), _image_sampler(images, labels, 128), F.cross_entropy
    )


def _text_sampler(batch_size: int, length: int):
    corpus = load_stdlib_corpus()

    def sample(generator: torch.Generator) -> Batch:
        return sample_windows(
            corpus.train, batch_size=batch_size, length=length, generator=generator
        )

    return sample


def _char_gru(key: str) -> Task:
    return ModuleTask(key, lambda: _CharGRU(32, 128), _text_sampler(32, 64), _lm_loss)


def _char_transformer(key: str) -> Task:
    return ModuleTask(
        key, lambda: _CharTransformer(64, 2, 4, 64), _text_sampler(32, 64), _lm_loss
    )


def _autoencoder(key: str) -> Task:
    mnist = load_mnist()
    images = mnist.train_images

    def sample(generator: torch.Generator) -> Batch:
        x = images.index_select(0, torch.randint(images.shape[0], (128,), generator=generator))
        return x, x

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(target)

    return ModuleTask(key, _Autoencoder, sample, loss)


def _spirals(key: str) -> Task:
    return ModuleTask(
        key,
        lambda: _NormMLP([2, 64, 64, 3], "none", "silu"),
        lambda generator: spirals(128, 3, generator),
        F.cross_entropy,
    )


def _cnn(key: str, arch: str) -> Task:
    return CNNTask(load_mnist(), arch=arch, name=key)


HELDOUT_SUITE: tuple[HeldoutTaskSpec, ...] = (
    HeldoutTaskSpec(
        "mlp-ln-silu-d8-mnist-100", 100, "MLP, LayerNorm, SiLU, depth 8",
        lambda: _mlp_task("mlp-ln-silu-d8-mnist-100", [784] + [128] * 8 + [10], "layer", "silu",
                          small=False),
    ),  # fmt: skip
    HeldoutTaskSpec(
        "rescnn-bn-mnist14-100", 100, "residual CNN, BatchNorm",
        lambda: _rescnn("rescnn-bn-mnist14-100"),
    ),
    HeldoutTaskSpec(
        "mlp-ln-gelu-d3-mnist-1000", 1000, "MLP, LayerNorm, GELU, depth 3, width 256",
        lambda: _mlp_task("mlp-ln-gelu-d3-mnist-1000", [784, 256, 256, 256, 10], "layer",
                          "gelu", small=False),
    ),  # fmt: skip
    HeldoutTaskSpec(
        "mlp-bn-silu-d6-mnist14-1000", 1000, "MLP, BatchNorm, SiLU, depth 6, width 128",
        lambda: _mlp_task("mlp-bn-silu-d6-mnist14-1000", [196] + [128] * 6 + [10], "batch",
                          "silu", small=True),
    ),  # fmt: skip
    HeldoutTaskSpec(
        "rescnn-bn-mnist14-1000", 1000, "residual CNN, BatchNorm",
        lambda: _rescnn("rescnn-bn-mnist14-1000"),
    ),
    HeldoutTaskSpec(
        "lstm-rows-mnist14-1000", 1000, "LSTM over image rows",
        lambda: _row_rnn("lstm-rows-mnist14-1000", "lstm"),
    ),
    HeldoutTaskSpec(
        "gru-charlm-stdlib-1000", 1000, "GRU character language model",
        lambda: _char_gru("gru-charlm-stdlib-1000"),
    ),
    HeldoutTaskSpec(
        "transformer-charlm-stdlib-1000", 1000, "2-layer transformer language model",
        lambda: _char_transformer("transformer-charlm-stdlib-1000"),
    ),
    HeldoutTaskSpec(
        "autoencoder-mnist-1000", 1000, "MLP autoencoder",
        lambda: _autoencoder("autoencoder-mnist-1000"),
    ),
    HeldoutTaskSpec(
        "cnn1-mnist-2000", 2000, "CNN-1 (the paper's)",
        lambda: _cnn("cnn1-mnist-2000", "cnn1"),
    ),
    HeldoutTaskSpec(
        "cnn2-mnist-2000", 2000, "CNN-2 (the paper's)",
        lambda: _cnn("cnn2-mnist-2000", "cnn2"),
    ),
    HeldoutTaskSpec(
        "leastsq-cond1e6-10000", 10000, "least squares, cond 1e6",
        lambda: LeastSquaresTask(
            "leastsq-cond1e6-10000", rows=400, cols=100, condition=1e6, seed=11
        ),
    ),
    HeldoutTaskSpec(
        "logreg-cond1e5-10000", 10000, "logistic regression, cond 1e5",
        lambda: LogisticRegressionTask(
            "logreg-cond1e5-10000", rows=1000, cols=50, condition=1e5, seed=12
        ),
    ),
    HeldoutTaskSpec(
        "spirals-noisy-mlp-silu-10000", 10000, "MLP on fresh noisy spirals, SiLU",
        lambda: _spirals("spirals-noisy-mlp-silu-10000"),
    ),
)

HELDOUT_KEYS = tuple(spec.key for spec in HELDOUT_SUITE)

# The fast subset: every horizon and kind of problem, minutes per optimizer rather than hours.
# Ablation arms are compared on it, and `registry promote` gates on it.
HELDOUT_FAST = (
    "mlp-ln-silu-d8-mnist-100",
    "rescnn-bn-mnist14-100",
    "mlp-bn-silu-d6-mnist14-1000",
    "lstm-rows-mnist14-1000",
    "leastsq-cond1e6-10000",
    "logreg-cond1e5-10000",
    "spirals-noisy-mlp-silu-10000",
)


def heldout_spec(key: str) -> HeldoutTaskSpec:
    for spec in HELDOUT_SUITE:
        if spec.key == key:
            return spec
    raise KeyError(f"unknown held-out task {key!r}; known: {', '.join(HELDOUT_KEYS)}")
