"""Optimizers: the learned HyperAdam, DMoptimizer and RNNprop, and hand-designed baselines.

Names are looked up by two explicit ``make_*`` functions over fixed tuples (no registry that
other modules can extend): ``make_learned_optimizer("rnnprop")``, ``make_baseline("adam", lr)``.
"""

from __future__ import annotations

from .base import BoundLearnedUpdateRule, LearnedUpdateRule, Theta, UpdateRule
from .baselines import (
    SGD,
    Adadelta,
    AdadeltaState,
    Adagrad,
    AdagradState,
    Adam,
    AdamState,
    Momentum,
    MomentumState,
    RMSProp,
    RMSPropState,
    SGDState,
)
from .dmoptimizer import DMOptimizer, DMState
from .hyperadam import HyperAdam, HyperAdamState
from .rnnprop import RNNprop, RNNpropState

LEARNED_OPTIMIZERS = ("hyperadam", "rnnprop", "dm")
BASELINES = ("adam", "sgd", "momentum", "rmsprop", "adagrad", "adadelta")


def make_learned_optimizer(name: str) -> LearnedUpdateRule:
    """Builds a learned optimizer with the paper's architecture.

    Args:
      name (str): one of ``LEARNED_OPTIMIZERS``.

    Returns:
      A fresh ``HyperAdam``, ``RNNprop`` or ``DMOptimizer`` (J = H = 20).

    Raises:
      ValueError: if ``name`` is unknown; the message lists the known names.
    """
    if name == "hyperadam":
        return HyperAdam()
    if name == "rnnprop":
        return RNNprop()
    if name == "dm":
        return DMOptimizer()
    raise ValueError(f"unknown learned optimizer {name!r}; known: {', '.join(LEARNED_OPTIMIZERS)}")


def make_baseline(name: str, lr: float) -> UpdateRule:
    """Builds a hand-designed update rule with TF 1.x defaults for everything but ``lr``.

    Args:
      name (str): one of ``BASELINES``.
      lr (float): step size (> 0).

    Returns:
      The update rule, e.g. ``Adam(lr)``.

    Raises:
      ValueError: if ``name`` is unknown (the message lists the known names) or ``lr`` is
        invalid.
    """
    rules = {
        "adam": Adam,
        "sgd": SGD,
        "momentum": Momentum,
        "rmsprop": RMSProp,
        "adagrad": Adagrad,
        "adadelta": Adadelta,
    }
    if name not in rules:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    return rules[name](lr)


__all__ = [
    "BASELINES",
    "LEARNED_OPTIMIZERS",
    "SGD",
    "Adadelta",
    "AdadeltaState",
    "Adagrad",
    "AdagradState",
    "Adam",
    "AdamState",
    "BoundLearnedUpdateRule",
    "DMOptimizer",
    "DMState",
    "HyperAdam",
    "HyperAdamState",
    "LearnedUpdateRule",
    "Momentum",
    "MomentumState",
    "RMSProp",
    "RMSPropState",
    "RNNprop",
    "RNNpropState",
    "SGDState",
    "Theta",
    "UpdateRule",
    "make_baseline",
    "make_learned_optimizer",
]
