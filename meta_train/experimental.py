"""Settings beyond the paper's recipe, kept in one section so the paper's path stays plain.

The paper (spec §3) starts θ at its random initialisation, trains it with Adam at a constant
meta lr and selects it by the final loss on one validation task. Each field here changes one of
those for an experiment (``docs/experiments``, results in ``docs/results.md``); at its default
the run is the paper's. The task-family mixes (several activations, depths or models, one drawn
per task) are ``family_mix`` (``tasks.family.FamilyMix``); the family's digest, which names the
task distribution in θ lineage, is computed as it was when they were family settings.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from .tasks.family import FamilyMix, make_mix

VALIDATION_SCORES = ("loss", "adam_ratio")
# HyperAdam's inputs and step (issue 15)
VARIANTS = (
    "paper",
    "tensor",
    "tensor-unbounded",
    "tensor-adaptive",
    "tensor-trend",
    "tensor-trend-annealed",
)
ESTIMATORS = ("tbptt", "pes")  # how a truncation's meta-gradient is estimated
HORIZON_KINDS = ("fixed", "log_uniform")  # how long each trajectory is


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"experimental.{name} must be a number > 0, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"experimental.{name} must be finite, got {value!r}")
    return float(value)


def _check_names(name: str, value: Any) -> tuple[str, ...]:
    """A list of distinct names (θ entries) as a tuple."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"experimental.{name} must be a list of θ entry names, got {value!r}")
    if not all(isinstance(n, str) for n in value) or len(set(value)) != len(value):
        raise ValueError(f"experimental.{name} must name distinct θ entries, got {list(value)}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class AdamStart:
    """θ starts at HyperAdam reduced to Adam(lr, β1, β2) exactly (``HyperAdam.adam_reduction``).

    The StateCell keeps its random initialisation, so meta-training begins at the baseline
    instead of having to rediscover it. HyperAdam only.
    """

    lr: float = 0.0220971  # the tuned Adam lr of the ReLU/ELU MLPs (spec §5.1)
    beta1: float = 0.9
    beta2: float = 0.999

    def __post_init__(self) -> None:
        for name in ("lr", "beta1", "beta2"):
            value = _check_positive(f"adam_start.{name}", getattr(self, name))
            object.__setattr__(self, name, value)
        if not (self.beta1 < 1 and self.beta2 < 1):
            raise ValueError(
                f"experimental.adam_start betas must be < 1, got {self.beta1}, {self.beta2}"
            )


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"experimental.{name} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class EstimatorConfig:
    """The meta-gradient estimator of each truncation.

    ``"tbptt"`` is the paper's: backpropagation through the truncation (``unroll.py``).
    ``"pes"`` is persistent evolution strategies (``pes.py``): forward only, ``pairs``
    antithetic pairs of trajectories per slot, each perturbed by ε ~ N(0, ``sigma``² I) in every
    truncation, whose accumulated ε make the estimate unbiased for the whole trajectory.
    """

    kind: str = "tbptt"
    sigma: float = 0.01  # pes: the perturbations' standard deviation, in θ's units
    pairs: int = 1  # pes: antithetic pairs of trajectories per slot, averaged

    def __post_init__(self) -> None:
        if self.kind not in ESTIMATORS:
            raise ValueError(
                f"experimental.estimator.kind must be one of {ESTIMATORS}, got {self.kind!r}"
            )
        sigma = _check_positive("estimator.sigma", self.sigma)
        object.__setattr__(self, "sigma", sigma)
        _check_count("estimator.pairs", self.pairs, 1)
        if self.kind != "pes" and (sigma != EstimatorConfig.sigma or self.pairs != 1):
            raise ValueError(
                "experimental.estimator.sigma and .pairs apply to kind 'pes' only, "
                f"not {self.kind!r}"
            )


@dataclasses.dataclass(frozen=True)
class HorizonConfig:
    """How many inner steps each trajectory runs (``schedule.py``).

    ``"fixed"``: every trajectory runs ``unroll.horizon`` steps, and every slot starts a new one
    at the same meta-step (the paper). ``"log_uniform"``: each trajectory's horizon is drawn
    log-uniformly between ``min_steps`` and ``max_steps`` (rounded to whole truncations) from
    the run seed, the slot and the trajectory's index; with ``offsets`` each slot's first
    trajectory is also cut short at a random truncation, so the slots' trajectories do not all
    start together (PES's random starting offsets). ``unroll.horizon`` is then unused.
    """

    kind: str = "fixed"
    min_steps: int | None = None  # log_uniform: the shortest horizon, in inner steps
    max_steps: int | None = None  # log_uniform: the longest horizon, in inner steps
    offsets: bool = False  # log_uniform: cut each slot's first trajectory at random

    def __post_init__(self) -> None:
        if self.kind not in HORIZON_KINDS:
            raise ValueError(
                f"experimental.horizons.kind must be one of {HORIZON_KINDS}, got {self.kind!r}"
            )
        if not isinstance(self.offsets, bool):
            raise ValueError(
                f"experimental.horizons.offsets must be true or false, got {self.offsets!r}"
            )
        if self.kind == "fixed":
            if self.min_steps is not None or self.max_steps is not None or self.offsets:
                raise ValueError(
                    "experimental.horizons.min_steps, .max_steps and .offsets apply to kind "
                    "'log_uniform' only (kind 'fixed' runs unroll.horizon steps)"
                )
            return
        _check_count("horizons.min_steps", self.min_steps, 1)
        _check_count("horizons.max_steps", self.max_steps, 1)
        assert self.min_steps is not None and self.max_steps is not None  # checked above
        if self.max_steps < self.min_steps:
            raise ValueError(
                f"experimental.horizons.max_steps ({self.max_steps}) must be >= min_steps "
                f"({self.min_steps})"
            )

    def truncation_range(self, truncation: int) -> tuple[int, int]:
        """(fewest, most) truncations of ``truncation`` steps a log-uniform horizon may have.

        Raises:
          ValueError: no whole number of truncations lies between min_steps and max_steps.
        """
        assert self.min_steps is not None and self.max_steps is not None
        fewest = max(1, -(-self.min_steps // truncation))
        most = self.max_steps // truncation
        if most < fewest:
            raise ValueError(
                f"experimental.horizons: no multiple of unroll.truncation ({truncation}) lies "
                f"between min_steps ({self.min_steps}) and max_steps ({self.max_steps})"
            )
        return fewest, most


def _nested(cls: type, value: Any, name: str) -> Any:
    """A section's table from a config file as its dataclass (unknown keys refused)."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"experimental.{name} must be a table, got {value!r}")
    unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(
            f"unknown config field(s): {', '.join(f'experimental.{name}.{u}' for u in unknown)}"
        )
    return cls(**value)


@dataclasses.dataclass(frozen=True)
class ExperimentalConfig:
    """The experiments a run may switch on (each default is the paper's recipe).

    Attributes:
      family_mix: the MNIST family draws each task's learner from these mixes (``FamilyMix``);
        None = the paper's one MLP.
      adam_start: start θ at Adam (``AdamStart``) instead of ``init``'s θ; None = off.
      pre_kernel_scale: HyperAdam: multiply the start θ's StateCell input kernel ``a`` by this.
        The StateCell reads ĝ = g/‖g‖, whose coordinates are of order 1/√p (≈ 0.008 on the MNIST
        MLP); with ``a`` of order 0.1 its input is ELU(b) to within 1 %, so every coordinate and
        every task gets the same ρ and decay rates. Scaling ``a`` lets the cells see the
        gradient from the first update on.
      meta_lr_half_life: the meta lr halves every this many meta-steps (lr · 2^(−k / half_life)),
        so θ settles near where a high lr took it instead of wandering on; None = constant.
      validation_score: how a validation task scores θ: ``"loss"`` (the paper's mean final loss)
        or ``"adam_ratio"`` (that over Adam's mean final loss on the same runs, with the task's
        tuned lr), so tasks of different loss scales weigh alike and 1.0 means "as good as Adam".
      variant: HyperAdam's variant: ``"paper"`` (global normalisation), ``"tensor"`` (per-tensor
        inputs, bounded step; ``optimizers/hyperadam_tensor.py``) or ``"tensor-unbounded"``
        (per-tensor inputs, the paper's unbounded step) or ``"tensor-adaptive"`` (the bounded
        step times a per-tensor step scale that follows the hypergradient) or ``"tensor-trend"``
        (that scale following the gradient's long-run trend instead of the last step) or
        ``"tensor-trend-annealed"`` (the trend rule at a rate that starts fast and settles). The
        tensor variants have one step, the torch one, whatever ``implementation`` says.
      estimator: the meta-gradient estimator (``EstimatorConfig``: truncated BPTT or PES).
      horizons: how long each trajectory is (``HorizonConfig``: fixed or log-uniform).
      frozen: names of θ entries meta-training leaves exactly as they start (``meta_update``
        zeroes their meta-gradient, so Adam never moves them), e.g. the step-scale rates and
        the base step of a tensor-wise start, so only the cells are trained. PES still
        perturbs them; their estimate is dropped. Empty: every entry is trained.
    """

    family_mix: FamilyMix | None = None
    adam_start: AdamStart | None = None
    pre_kernel_scale: float = 1.0
    meta_lr_half_life: float | None = None
    validation_score: str = "loss"
    variant: str = "paper"
    estimator: EstimatorConfig = EstimatorConfig()
    horizons: HorizonConfig = HorizonConfig()
    frozen: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.family_mix is not None and not isinstance(self.family_mix, (Mapping, FamilyMix)):
            raise ValueError(
                f"experimental.family_mix must be a table (model, activation, depth, "
                f"lstm_layers, noise_std) or None, got {self.family_mix!r}"
            )
        if isinstance(self.family_mix, Mapping):  # from a config file
            unknown = sorted(set(self.family_mix) - {f.name for f in dataclasses.fields(FamilyMix)})
            if unknown:
                raise ValueError(
                    f"unknown config field(s): "
                    f"{', '.join('experimental.family_mix.' + u for u in unknown)}"
                )
        try:
            object.__setattr__(self, "family_mix", make_mix(self.family_mix))
        except (TypeError, ValueError) as error:
            raise ValueError(f"experimental.family_mix: {error}") from None
        if isinstance(self.adam_start, Mapping):  # from a config file
            unknown = sorted(set(self.adam_start) - {f.name for f in dataclasses.fields(AdamStart)})
            if unknown:
                raise ValueError(
                    f"unknown config field(s): "
                    f"{', '.join('experimental.adam_start.' + u for u in unknown)}"
                )
            object.__setattr__(self, "adam_start", AdamStart(**self.adam_start))
        elif self.adam_start is not None and not isinstance(self.adam_start, AdamStart):
            raise ValueError(
                f"experimental.adam_start must be a table (lr, beta1, beta2) or None, "
                f"got {self.adam_start!r}"
            )
        object.__setattr__(
            self, "pre_kernel_scale", _check_positive("pre_kernel_scale", self.pre_kernel_scale)
        )
        if self.meta_lr_half_life is not None:
            object.__setattr__(
                self,
                "meta_lr_half_life",
                _check_positive("meta_lr_half_life", self.meta_lr_half_life),
            )
        if self.validation_score not in VALIDATION_SCORES:
            raise ValueError(
                f"experimental.validation_score must be one of {VALIDATION_SCORES}, "
                f"got {self.validation_score!r}"
            )
        if self.variant not in VARIANTS:
            raise ValueError(
                f"experimental.variant must be one of {VARIANTS}, got {self.variant!r}"
            )
        object.__setattr__(self, "estimator", _nested(EstimatorConfig, self.estimator, "estimator"))
        object.__setattr__(self, "horizons", _nested(HorizonConfig, self.horizons, "horizons"))
        object.__setattr__(self, "frozen", _check_names("frozen", self.frozen))

    def meta_lr_at(self, lr: float, step: int) -> float:
        """The meta lr of meta-step ``step`` (0-based) for a base meta lr ``lr``."""
        if self.meta_lr_half_life is None:
            return lr
        return lr * 2.0 ** (-step / self.meta_lr_half_life)
