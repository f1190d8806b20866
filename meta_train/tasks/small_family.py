"""A broad, cheap meta-training family: many small architectures on 8×8 MNIST and sine sequences.

Issue 15's family lever. Where the paper trains on one 784-20-10 sigmoid MLP, this family draws
per task: an MLP of depth 1–6, width 16–64, one of four activations, with or without
LayerNorm; a small CNN; or a sine-sequence LSTM — on MNIST average-pooled to 8×8 (a step costs
well under a millisecond) — and, with probability ``reparam_probability``, a per-tensor
*reparameterisation*: the optimizer trains u = w / s with s = exp(U(ln 1e-3, ln 1e3)) per
tensor, so that the scale of a tensor's gradient says nothing about how far to step (a learned
optimizer that keys on raw magnitudes fails here; one that normalises per tensor does not).

Two further members are off by default (their weights are the optional 4th and 5th entries of
``model_weights``; a 3-entry config draws exactly as before, so its digest and tasks are
unchanged): *convex* problems, least squares or logistic regression on a design whose
condition number is drawn log-uniformly over ``convex_conditions`` (at most 1e4 by default, an
order of magnitude short of the held-out suite's 1e5 and 1e6), scored by the raw objective, or
with ``convex_excess_floor`` set by the excess over the optimum plus that floor;
and *mnist28* MLPs, depth 1–3 (``mnist28_max_depth``) of the same widths and activations on
full 28×28 MNIST, whose unbounded activations on 784 inputs are what broke meta-trained θs on
the paper's ReLU and ELU rows. Together with horizons up to 10 000 steps they put into
meta-training what the snapshot gate checks (docs/generalisation.md, session 16). Deeper 28×28
MLPs (a larger ``mnist28_max_depth``) put in the vanishing signal of the paper's deep sigmoid
MLPs (Fig. 5(d)), at other widths (16–64, not the paper's 20) and with PyTorch's
initialisation (not the paper's N(0, 0.1²)).

Every choice derives from the task seed; ``SmallFamilyConfig`` is logged whole and digested.
Nothing here overlaps the held-out suite (no GELU/SiLU, no BatchNorm, no residual blocks, no
text, no 14×14 images, no convex problem conditioned as badly as the suite's).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import load_mnist
from .base import Batch, Task, TaskConfig, TaskFamily
from .heldout import LeastSquaresTask, LogisticRegressionTask, ModuleTask
from .lstm import SineLSTMTask

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU}
MODELS = ("mlp", "cnn", "lstm", "convex", "mnist28")
LEGACY_MODELS = 3  # configs with 3 weights draw among the first three models only
MNIST28_MAX_DEPTH = 3  # the default of ``mnist28_max_depth``, drawn as families first drew it
CONVEX_SIZES = (20, 50, 100)  # columns; rows are 4× as many


@functools.lru_cache(maxsize=1)
def mnist8() -> tuple[Tensor, Tensor]:
    """MNIST training images average-pooled to 8×8 ([N, 64]) and their labels."""
    mnist = load_mnist()
    images = F.adaptive_avg_pool2d(mnist.train_images.view(-1, 1, 28, 28), 8)
    return images.reshape(-1, 64).contiguous(), mnist.train_labels


@dataclasses.dataclass(frozen=True)
class SmallFamilyConfig:
    """The family's knobs (defaults: the family of the issue-15 experiments)."""

    # mlp, cnn, lstm[, convex, mnist28]: the last two are optional (see the module docstring)
    model_weights: tuple[float, ...] = (0.6, 0.2, 0.2)
    max_depth: int = 6
    widths: tuple[int, ...] = (16, 32, 64)
    activations: tuple[str, ...] = tuple(ACTIVATIONS)
    layernorm_probability: float = 0.5
    reparam_probability: float = 0.5
    log_scale_range: float = math.log(1e3)
    batch_size: int = 64
    convex_conditions: tuple[float, float] = (1e1, 1e4)  # log-uniform condition numbers
    mnist28_max_depth: int = MNIST28_MAX_DEPTH  # hidden layers of the 28×28 MLPs, 1 to this
    # How the convex problems are scored: None, by the raw objective f(w); a number δ > 0, by
    # the excess (f(w) − f*)₊ + δ (``ConvexObjectiveTask``).
    convex_excess_floor: float | None = None

    def __post_init__(self) -> None:
        for name in ("model_weights", "widths", "activations", "convex_conditions"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("layernorm_probability", "reparam_probability"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                0 <= value <= 1
            ):
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        if not (isinstance(self.log_scale_range, (int, float)) and self.log_scale_range >= 0):
            raise ValueError(f"log_scale_range must be >= 0, got {self.log_scale_range!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or (
            self.batch_size < 1
        ):
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not sum(self.model_weights) > 0:
            raise ValueError(f"model_weights must not all be 0, got {self.model_weights!r}")
        if len(self.model_weights) not in (LEGACY_MODELS, len(MODELS)) or (
            min(self.model_weights) < 0
        ):
            raise ValueError(
                f"model_weights needs {LEGACY_MODELS} or {len(MODELS)} weights >= 0 (for "
                f"{', '.join(MODELS)}), got {self.model_weights!r}"
            )
        conditions = self.convex_conditions
        if not (
            isinstance(conditions, tuple)
            and len(conditions) == 2
            and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in conditions)
            and 1 <= conditions[0] <= conditions[1] < math.inf
        ):
            raise ValueError(
                f"convex_conditions must be (low, high) with 1 <= low <= high, got "
                f"{self.convex_conditions!r}"
            )
        floor = self.convex_excess_floor
        if floor is not None and (
            isinstance(floor, bool)
            or not isinstance(floor, (int, float))
            or not 0 < floor < math.inf
        ):
            raise ValueError(f"convex_excess_floor must be None or a number > 0, got {floor!r}")
        unknown = set(self.activations) - set(ACTIVATIONS)
        if unknown or not self.activations:
            raise ValueError(f"unknown activations {sorted(unknown)}; known {list(ACTIVATIONS)}")
        self._check_sizes()

    def _check_sizes(self) -> None:
        if self.max_depth < 1 or not self.widths or min(self.widths) < 1:
            raise ValueError("max_depth and widths must be >= 1")
        depth = self.mnist28_max_depth
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= 16:
            raise ValueError(f"mnist28_max_depth must be an integer in [1, 16], got {depth!r}")


@dataclasses.dataclass(frozen=True)
class SmallTaskConfig(TaskConfig):
    """One drawn task."""

    seed: int
    model: str
    depth: int
    width: int
    activation: str
    layernorm: bool
    log_scales: tuple[float, ...] | None  # per tensor, or None without reparameterisation

    condition: float | None = None  # convex tasks only

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.condition is None:  # the keys of the configs drawn before the convex member
            del data["condition"]
        return data


class _MLP(nn.Module):
    def __init__(
        self, depth: int, width: int, activation: str, layernorm: bool, inputs: int = 64
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        fan_in = inputs
        for _ in range(depth):
            layers.append(nn.Linear(fan_in, width))
            if layernorm:
                layers.append(nn.LayerNorm(width))
            layers.append(ACTIVATIONS[activation]())
            fan_in = width
        layers.append(nn.Linear(fan_in, 10))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _CNN(nn.Module):
    def __init__(self, width: int, activation: str) -> None:
        super().__init__()
        channels = max(4, width // 4)
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = ACTIVATIONS[activation]()
        self.head = nn.Linear(channels * 16, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.conv1(x.view(-1, 1, 8, 8)))
        h = F.max_pool2d(self.act(self.conv2(h)), 2)
        return self.head(h.flatten(1))


class ReparameterisedTask(Task):
    """Trains u = w / s for per-tensor scales s: loss(u) = inner.loss(s ⊙ u)."""

    def __init__(self, inner: Task, log_scales: tuple[float, ...]) -> None:
        sizes = inner.tensor_sizes
        if len(log_scales) != len(sizes):
            raise ValueError(f"{len(log_scales)} scales for {len(sizes)} tensors")
        self.inner = inner
        self.name = f"reparam({inner.name})"
        self.scale = torch.repeat_interleave(
            torch.tensor(log_scales, dtype=torch.float32).exp(), torch.tensor(sizes)
        )

    @property
    def num_params(self) -> int:
        return self.inner.num_params

    @property
    def tensor_sizes(self) -> tuple[int, ...]:
        return self.inner.tensor_sizes

    def init_params(self, generator: torch.Generator) -> Tensor:
        return self.inner.init_params(generator) / self.scale

    def sample_batch(self, generator: torch.Generator) -> Batch:
        return self.inner.sample_batch(generator)

    def loss(self, params: Tensor, batch: Batch) -> Tensor:
        return self.inner.loss(self.scale * params, batch)


class ConvexObjectiveTask(Task):
    """A held-out-style convex problem scored by its raw objective f(w) (``excess_floor`` None)
    or by its excess over the optimum plus a floor, (f(w) − f*)₊ + δ.

    The raw objective stops at its noise floor f*, so the excess's log cannot run to −∞ near
    the optimum and outweigh every other task of the family. It is also blind where the
    snapshot gate looks: an excess of 1.3e-3 on the gate's logistic regression (f* = 0.223)
    moves log f by 0.006, while the gate counts it as 2 310× the start's final excess
    (session 19). The floored excess sees it and is still bounded below, by log δ."""

    def __init__(
        self, inner: LeastSquaresTask | LogisticRegressionTask, excess_floor: float | None = None
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.excess_floor = excess_floor

    @property
    def num_params(self) -> int:
        return self.inner.num_params

    def init_params(self, generator: torch.Generator) -> Tensor:
        return self.inner.init_params(generator)

    def sample_batch(self, generator: torch.Generator) -> Batch:
        return self.inner.sample_batch(generator)

    def loss(self, params: Tensor, batch: Batch) -> Tensor:
        objective = self.inner.objective(params, *batch)
        if self.excess_floor is None:
            return objective
        # In fp32 the objective can round below f* near the optimum: the clamp keeps it ≥ δ.
        return (objective - self.inner.optimum).clamp_min(0.0) + self.excess_floor


class SmallTaskFamily(TaskFamily):
    """Draws and builds the small tasks (see the module docstring)."""

    def __init__(self, config: SmallFamilyConfig = SmallFamilyConfig()) -> None:
        self.config = config

    def sample(self, seed: int) -> SmallTaskConfig:
        cfg = self.config
        g = torch.Generator().manual_seed(seed)

        def pick(options: tuple) -> Any:
            return options[int(torch.randint(len(options), (1,), generator=g))]

        weights = torch.tensor(cfg.model_weights, dtype=torch.float64)
        model = MODELS[int(torch.multinomial(weights, 1, generator=g))]
        depth = int(torch.randint(1, cfg.max_depth + 1, (1,), generator=g))
        width = pick(cfg.widths)
        activation = pick(cfg.activations)
        layernorm = bool(torch.rand(1, generator=g) < cfg.layernorm_probability)
        reparam = bool(torch.rand(1, generator=g) < cfg.reparam_probability)
        condition = None
        if model == "mnist28" and cfg.mnist28_max_depth == MNIST28_MAX_DEPTH:
            depth = 1 + (depth - 1) % MNIST28_MAX_DEPTH  # as drawn before the depth was a knob
        elif model == "mnist28":
            # Its own draw, made only for 28×28 MLPs of a family that sets the knob, so every
            # other family's sequence of draws (and so its tasks and digest) is unchanged.
            depth = int(torch.randint(1, cfg.mnist28_max_depth + 1, (1,), generator=g))
        elif model == "convex":
            # The kind (least squares or logistic regression) and the size follow from the
            # depth drawn; the condition number is an extra draw made for convex tasks only, so
            # a 3-model config's sequence of draws is unchanged.
            low, high = (math.log(c) for c in cfg.convex_conditions)
            condition = math.exp(low + (high - low) * float(torch.rand(1, generator=g)))
        config = SmallTaskConfig(seed, model, depth, width, activation, layernorm, None, condition)
        if reparam:
            tensors = len(self._build_inner(config).tensor_sizes)
            u = torch.rand(tensors, generator=g, dtype=torch.float64) * 2 - 1
            scales = tuple(float(x) * cfg.log_scale_range for x in u)
            config = dataclasses.replace(config, log_scales=scales)
        return config

    def _build_inner(self, config: SmallTaskConfig) -> Task:
        name = f"small-{config.model}-s{config.seed}"
        if config.model == "lstm":
            return SineLSTMTask(
                num_layers=1 + config.depth % 2, noise_std=0.1, batch_size=self.config.batch_size
            )
        if config.model == "convex":
            assert config.condition is not None
            kind = LeastSquaresTask if config.depth % 2 else LogisticRegressionTask
            cols = CONVEX_SIZES[config.depth % len(CONVEX_SIZES)]
            return ConvexObjectiveTask(
                kind(name, rows=4 * cols, cols=cols, condition=config.condition, seed=config.seed),
                self.config.convex_excess_floor,
            )
        if config.model == "mnist28":
            mnist = load_mnist()
            images, labels = mnist.train_images, mnist.train_labels
        else:
            images, labels = mnist8()
        batch = self.config.batch_size

        def sample(generator: torch.Generator) -> Batch:
            index = torch.randint(images.shape[0], (batch,), generator=generator)
            return images.index_select(0, index), labels.index_select(0, index)

        if config.model == "cnn":
            return ModuleTask(
                name, lambda: _CNN(config.width, config.activation), sample, F.cross_entropy
            )
        inputs = images.shape[1]
        return ModuleTask(
            name,
            lambda: _MLP(config.depth, config.width, config.activation, config.layernorm, inputs),
            sample,
            F.cross_entropy,
        )

    def build(self, config: TaskConfig) -> Task:
        if not isinstance(config, SmallTaskConfig):
            raise TypeError(f"expected a SmallTaskConfig, got {type(config).__name__}")
        inner = self._build_inner(config)
        if config.log_scales is None:
            return inner
        return ReparameterisedTask(inner, config.log_scales)

    def to_dict(self) -> dict[str, Any]:
        data = {"family": "small", **dataclasses.asdict(self.config)}
        if self.config.convex_conditions == SmallFamilyConfig.convex_conditions:
            del data["convex_conditions"]  # as families logged it before the convex member
        if self.config.mnist28_max_depth == MNIST28_MAX_DEPTH:
            del data["mnist28_max_depth"]  # as families logged it before the knob
        if self.config.convex_excess_floor is None:
            del data["convex_excess_floor"]  # as families logged it before the knob
        return data

    def digest(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()
