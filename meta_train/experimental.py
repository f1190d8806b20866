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


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"experimental.{name} must be a number > 0, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"experimental.{name} must be finite, got {value!r}")
    return float(value)


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
    """

    family_mix: FamilyMix | None = None
    adam_start: AdamStart | None = None
    pre_kernel_scale: float = 1.0
    meta_lr_half_life: float | None = None
    validation_score: str = "loss"

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

    def meta_lr_at(self, lr: float, step: int) -> float:
        """The meta lr of meta-step ``step`` (0-based) for a base meta lr ``lr``."""
        if self.meta_lr_half_life is None:
            return lr
        return lr * 2.0 ** (-step / self.meta_lr_half_life)
