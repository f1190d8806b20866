"""A broad, cheap meta-training family: many small architectures on 8×8 MNIST and sine sequences.

Issue 15's family lever. Where the paper trains on one 784-20-10 sigmoid MLP, this family draws
per task: an MLP of depth 1–6, width 16–64, one of four activations, with or without
LayerNorm; a small CNN; or a sine-sequence LSTM — on MNIST average-pooled to 8×8 (a step costs
well under a millisecond) — and, with probability ``reparam_probability``, a per-tensor
*reparameterisation*: the optimizer trains u = w / s with s = exp(U(ln 1e-3, ln 1e3)) per
tensor, so that the scale of a tensor's gradient says nothing about how far to step (a learned
optimizer that keys on raw magnitudes fails here; one that normalises per tensor does not).

Every choice derives from the task seed; ``SmallFamilyConfig`` is logged whole and digested.
Nothing here overlaps the held-out suite (no GELU/SiLU, no BatchNorm, no residual blocks, no
text, no 14×14 or 28×28 images, no convex problems).
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
from .heldout import ModuleTask
from .lstm import SineLSTMTask

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU}
MODELS = ("mlp", "cnn", "lstm")


@functools.lru_cache(maxsize=1)
def mnist8() -> tuple[Tensor, Tensor]:
    """MNIST training images average-pooled to 8×8 ([N, 64]) and their labels."""
    mnist = load_mnist()
    images = F.adaptive_avg_pool2d(mnist.train_images.view(-1, 1, 28, 28), 8)
    return images.reshape(-1, 64).contiguous(), mnist.train_labels


@dataclasses.dataclass(frozen=True)
class SmallFamilyConfig:
    """The family's knobs (defaults: the family of the issue-15 experiments)."""

    model_weights: tuple[float, float, float] = (0.6, 0.2, 0.2)  # mlp, cnn, lstm
    max_depth: int = 6
    widths: tuple[int, ...] = (16, 32, 64)
    activations: tuple[str, ...] = tuple(ACTIVATIONS)
    layernorm_probability: float = 0.5
    reparam_probability: float = 0.5
    log_scale_range: float = math.log(1e3)
    batch_size: int = 64

    def __post_init__(self) -> None:
        for name in ("model_weights", "widths", "activations"):  # a config file gives lists
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
        if len(self.model_weights) != len(MODELS) or min(self.model_weights) < 0:
            raise ValueError(f"model_weights needs {len(MODELS)} weights >= 0")
        unknown = set(self.activations) - set(ACTIVATIONS)
        if unknown or not self.activations:
            raise ValueError(f"unknown activations {sorted(unknown)}; known {list(ACTIVATIONS)}")
        if self.max_depth < 1 or not self.widths or min(self.widths) < 1:
            raise ValueError("max_depth and widths must be >= 1")


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _MLP(nn.Module):
    def __init__(self, depth: int, width: int, activation: str, layernorm: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        fan_in = 64
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
        config = SmallTaskConfig(seed, model, depth, width, activation, layernorm, None)
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
        images, labels = mnist8()
        batch = self.config.batch_size

        def sample(generator: torch.Generator) -> Batch:
            index = torch.randint(images.shape[0], (batch,), generator=generator)
            return images.index_select(0, index), labels.index_select(0, index)

        if config.model == "cnn":
            return ModuleTask(
                name, lambda: _CNN(config.width, config.activation), sample, F.cross_entropy
            )
        return ModuleTask(
            name,
            lambda: _MLP(config.depth, config.width, config.activation, config.layernorm),
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
        return {"family": "small", **dataclasses.asdict(self.config)}

    def digest(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()
