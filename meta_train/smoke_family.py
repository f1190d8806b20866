"""A tiny meta-training task family over ``QuadraticTask``: the whole Ray/MLflow path in seconds.

The real distribution is ``tasks.family.MetaTaskFamily`` (MNIST MLPs with the tricks). This one
exists so that tests, smoke runs and benchmarks of the distributed machinery need no dataset:
``sample(seed)`` draws a frozen config, ``build`` makes a random least-squares problem from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import config as config_lib
from .seeding import derive_seed
from .tasks.base import TaskConfig, TaskFamily
from .tasks.quadratic import QuadraticTask

FAMILY_NAME = "quadratic"
FAMILY_VERSION = 1
SYSTEM_STREAM = 3  # derive_seed(task seed, 3) draws the system A, y (0 and 1 are w_0 and batches)


@dataclasses.dataclass(frozen=True)
class QuadraticFamilyConfig:
    """Sizes of the random least-squares problems."""

    dim: int = 10
    rows: int = 64
    batch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("dim", "rows", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.batch_size > self.rows:
            raise ValueError(f"batch_size must be <= rows ({self.rows}), got {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class QuadraticTaskConfig(TaskConfig):
    """One sampled problem: the family sizes and the seed its system is drawn from."""

    seed: int
    system_seed: int
    dim: int
    rows: int
    batch_size: int

    def to_dict(self) -> dict[str, Any]:
        return config_lib.to_plain(self)


class QuadraticFamily(TaskFamily):
    """Random least-squares problems; the same seed always gives the same problem."""

    def __init__(self, config: QuadraticFamilyConfig | None = None) -> None:
        self.config = config or QuadraticFamilyConfig()

    def sample(self, seed: int) -> QuadraticTaskConfig:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        return QuadraticTaskConfig(
            seed=seed,
            system_seed=derive_seed(seed, SYSTEM_STREAM),
            **dataclasses.asdict(self.config),
        )

    def build(self, config: TaskConfig) -> QuadraticTask:
        if not isinstance(config, QuadraticTaskConfig):
            raise TypeError(f"expected a QuadraticTaskConfig, got {type(config).__name__}")
        return QuadraticTask(
            config.dim, config.rows, config.batch_size, seed=config.system_seed
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": FAMILY_NAME,
            "version": FAMILY_VERSION,
            "config": config_lib.to_plain(self.config),
        }
