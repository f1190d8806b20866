"""Turns an optimizer name or path from the command line into an update rule for evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import UsageError
from .optimizers.base import UpdateRule
from .theta_source import load_theta_source

BASELINES = ("adam", "sgd", "momentum", "rmsprop", "adagrad", "adadelta")
LEARNED = ("hyperadam", "rnnprop", "dm")

# Learning rates of the hand-designed baselines other than Adam, whose per-task values the paper
# did not release (spec §8 #10). One value per optimizer on the 2^(−k/2) grid; pass --lr to tune.
DEFAULT_BASELINE_LR = {
    "sgd": 0.5,
    "momentum": 0.0625,
    "rmsprop": 0.0078125,
    "adagrad": 0.25,
    "adadelta": 1.0,
}


def resolve_optimizer(
    name: str, task_spec: Any, *, lr: float | None = None
) -> tuple[UpdateRule, float]:
    """Returns ``(rule, lr)`` for a baseline name, a shipped learned optimizer or a path.

    Adam uses the task's tuned lr from the paper (spec §5) unless ``lr`` is given; learned
    optimizers use their own default step size (α = 0.005 for HyperAdam, 0.1 for DM/RNNprop).
    An exported folder is verified like ``runtime.load`` does (every hash, θ required) before
    its θ is read; its rule is labelled ``METHOD (PATH)``, not like the built-in.
    """
    if lr is not None and not lr > 0:
        raise UsageError(f"--lr must be > 0, got {lr}")
    if name in BASELINES:
        from .optimizers import make_baseline

        chosen = (
            lr
            if lr is not None
            else (task_spec.adam_lr if name == "adam" else DEFAULT_BASELINE_LR[name])
        )
        return make_baseline(name, chosen), chosen
    source: str | Path = name
    if name not in LEARNED:
        source = Path(name)
        if not source.exists():
            raise UsageError(
                f"unknown optimizer {name!r}: not one of {', '.join(BASELINES + LEARNED)} "
                "and no such file or folder"
            )
    try:
        optimizer, theta = load_theta_source(source)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from error
    from .optimizers.hyperadam import HyperAdam

    if isinstance(optimizer, HyperAdam):
        # The fused CPU kernels: the same math to round-off, several times faster per step,
        # which is what makes the 2 000- and 10 000-step rows affordable on CPUs.
        optimizer = HyperAdam(optimizer.num_candidates, implementation="fast")
    rule = optimizer.bind(theta, lr=lr)
    if name not in LEARNED:
        # Not the built-in of that name: the label says which method and which file or folder.
        rule.name = f"{optimizer.name} ({source})"
    return rule, rule.lr
