"""The guard: a learned optimizer that leaves its training distribution falls back to Adam.

A learned step is only as good as the tasks it was meta-trained on; on a problem unlike them it
may oscillate or blow up. The guard (in the spirit of loss-guarded learned optimizers, e.g.
Prémont-Schwarz et al. 2022) promises that a run never ends far worse than Adam would have left
it: it watches the loss of the current parameters, and when that loss turns non-finite or rises
well above its running best, the caller restores the last good parameters and optimizer state
(bitwise) and runs Adam for a while before trying the learned step again.

This module is the pure part, shared by every adapter (``runtime.guarded`` for numpy/torch
arrays, ``runtime.jax`` inside its host callback): a frozen ``GuardConfig``, an explicit
``GuardState`` and functions ``(config, state, observation) -> (decision, new state)`` that touch
no arrays, plus Adam's update written with in-place operators only (so it runs unchanged on
numpy, torch and CuPy arrays). Because the decision functions are pure, a step that fails on bad
input leaves the guard as it was: the caller keeps the new state only after the step succeeded.

The rule, per step t with loss L_t of the current parameters w_t:

* ``ℓ_t = s·ℓ_{t−1} + (1−s)·L_t`` (``smoothing`` s; ℓ starts at the first loss), and
  ``best = min ℓ`` since the last restore. Smoothing keeps minibatch noise from firing it.
* **Bad** when L_t is NaN/inf or ``ℓ_t > best + max_rise·|best|``: restore the snapshot, discard
  this step's gradients, run ``fallback_steps · backoff^k`` Adam steps (k = fallbacks so far) at
  ``fallback_lr`` (default: the optimizer's lr), then retry the learned step.
* **Good** and ℓ_t a new best: w_t and the state are the new snapshot (at most every
  ``snapshot_every`` steps, which bounds the cost of the copies).
* **Without a loss** the update-size guard decides instead: a learned step whose RMS over any
  array exceeds ``max_update_rms · lr`` (or is non-finite) is undone by the same restore and
  fallback; snapshots are then taken every ``snapshot_every`` accepted steps.

References:
  Prémont-Schwarz, Vítků, Feyereisl, "A Simple Guard for Learned Optimizers", ICML 2022.
  Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015 (the fallback).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

LEARNED, FALLBACK = "learned", "fallback"
FALLBACKS_METRIC = "guard/fallbacks"


@dataclasses.dataclass(frozen=True)
class GuardConfig:
    """The guard's settings (the defaults are what ``guard=True`` means).

    Attributes:
      max_rise: a smoothed loss above ``best + max_rise·|best|`` is a blow-up (0.5: 1.5× best).
      smoothing: the loss EMA's decay s (0.98: about the last 50 losses; 0 compares raw
        losses). Late in an MNIST MLP run the minibatch losses swing by ±50 % around their
        mean: an EMA over ~10 losses (0.9) then drifted 1.5× above its own best by noise
        alone, one over ~50 stays within 1.26× (``benchmarks/bench_guard.py``).
      fallback_steps: Adam steps after the first fallback before the learned step is retried.
      backoff: each further fallback runs this many times longer than the one before, so an
        optimizer that keeps failing hands more and more of the run to Adam.
      fallback_lr: Adam's lr during a fallback; None: the optimizer's lr at that step (so a
        schedule applies to Adam too).
      snapshot_every: a good state is copied at most once per this many steps (a copy costs
        about one state's worth of memory traffic: HyperAdam keeps 120 floats per coordinate).
      max_update_rms: without a loss, a learned step whose RMS over any array exceeds this
        times lr is undone (Adam's steps are about lr per coordinate).
      beta1, beta2, eps: the fallback Adam's (torch.optim.Adam's defaults).
    """

    max_rise: float = 0.5
    smoothing: float = 0.98
    fallback_steps: int = 50
    backoff: float = 2.0
    fallback_lr: float | None = None
    snapshot_every: int = 10
    max_update_rms: float = 10.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        def real(name: str, low: float, high: float = math.inf, *, closed: bool = True) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"GuardConfig.{name} must be a real number, got {value!r}")
            number = float(value)  # a numbers.Real, compared as a float
            above = number >= low if closed else number > low
            if not (math.isfinite(number) and above and number < high):
                bound = f"in [{low}, {high})" if closed else f"in ({low}, {high})"
                raise ValueError(f"GuardConfig.{name} must be {bound}, got {value}")

        real("max_rise", 0.0, closed=False)
        real("smoothing", 0.0, 1.0)
        real("backoff", 1.0)
        real("max_update_rms", 0.0, closed=False)
        real("beta1", 0.0, 1.0)
        real("beta2", 0.0, 1.0)
        real("eps", 0.0, closed=False)
        if self.fallback_lr is not None:
            real("fallback_lr", 0.0, closed=False)
        for name in ("fallback_steps", "snapshot_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GuardConfig.{name} must be an integer >= 1, got {value!r}")


def guard_config(guard: bool | GuardConfig | None) -> GuardConfig | None:
    """``True`` → the defaults, a ``GuardConfig`` as is, ``False``/``None`` → no guard."""
    if guard is None or guard is False:
        return None
    if guard is True:
        return GuardConfig()
    if isinstance(guard, GuardConfig):
        return guard
    raise TypeError(f"guard must be True, False or a GuardConfig, got {type(guard).__name__}")


class GuardState(NamedTuple):
    """Everything the guard decides from; plain Python scalars (checkpointed as they are)."""

    mode: str  # LEARNED or FALLBACK
    fallback_left: int  # Adam steps still to run in this fallback
    num_fallbacks: int  # fallbacks so far (each a restore of the snapshot)
    smoothed: float  # ℓ, the loss EMA since the last restore (NaN before the first loss)
    best: float  # min ℓ since the last restore (inf before the first loss)
    since_snapshot: int  # steps since the last snapshot (a large number before the first)
    has_snapshot: bool
    adam_fresh: bool  # the next Adam step begins a fallback: its moments start at zero


def init_guard() -> GuardState:
    return GuardState(LEARNED, 0, 0, math.nan, math.inf, 0, False, False)


class Decision(NamedTuple):
    """What the caller does at this step, in this order."""

    restore: bool  # put the snapshot back and apply nothing else
    snapshot: bool  # copy the current parameters and state first
    use_adam: bool  # the step is Adam's (else the learned one)
    fresh_adam: bool  # reset Adam's moments first (a fallback begins)
    lr: float | None  # Adam's lr (None: the optimizer's)


def check_loss(loss: Any) -> float:
    """The loss as a float (0-d arrays and tensors included); NaN/inf pass, they are data."""
    if hasattr(loss, "detach"):  # a torch tensor: one scalar read, no graph kept
        loss = loss.detach()
    try:
        value = float(loss)
    except (TypeError, ValueError):
        raise TypeError(f"loss must be a real number, got {type(loss).__name__}") from None
    return value


def _enter_fallback(config: GuardConfig, state: GuardState) -> GuardState:
    length = math.ceil(config.fallback_steps * config.backoff**state.num_fallbacks)
    return state._replace(
        mode=FALLBACK,
        fallback_left=length,
        num_fallbacks=state.num_fallbacks + 1,
        smoothed=math.nan,
        best=math.inf,
        since_snapshot=0,  # the snapshot is where we are now
        adam_fresh=True,
    )


def before_step(
    config: GuardConfig, state: GuardState, loss: float | None
) -> tuple[Decision, GuardState]:
    """Decides one step from the loss of the current parameters (None: no loss this step)."""
    snapshot = not state.has_snapshot  # the first step's parameters are the first snapshot
    if loss is not None and not math.isfinite(loss):
        if state.has_snapshot:
            return Decision(True, False, False, False, None), _enter_fallback(config, state)
    elif loss is not None:
        s = config.smoothing
        smoothed = loss if math.isnan(state.smoothed) else s * state.smoothed + (1 - s) * loss
        risen = smoothed - state.best > config.max_rise * abs(state.best)
        if risen and state.mode == LEARNED and state.has_snapshot:
            return Decision(True, False, False, False, None), _enter_fallback(config, state)
        new_best = smoothed <= state.best
        state = state._replace(smoothed=smoothed, best=min(state.best, smoothed))
        snapshot |= new_best and state.since_snapshot >= config.snapshot_every
    elif state.mode == LEARNED:  # no loss: snapshots at a fixed interval
        snapshot |= state.since_snapshot >= config.snapshot_every
    since = 0 if snapshot else state.since_snapshot
    state = state._replace(since_snapshot=since + 1, has_snapshot=True)
    if state.mode == LEARNED:
        return Decision(False, snapshot, False, False, None), state
    left = state.fallback_left - 1
    decision = Decision(False, snapshot, True, state.adam_fresh, config.fallback_lr)
    return decision, state._replace(
        fallback_left=left, mode=FALLBACK if left > 0 else LEARNED, adam_fresh=False
    )


def after_learned_step(
    config: GuardConfig, state: GuardState, ratio: float
) -> tuple[bool, GuardState]:
    """The update-size guard (used when no loss is given): False means undo the step (restore
    the snapshot) and fall back to Adam."""
    if math.isfinite(ratio) and ratio <= config.max_update_rms:
        return True, state
    return False, _enter_fallback(config, state)


def update_rms_over_lr(before: Sequence[Any], after: Sequence[Any], lrs: Sequence[float]) -> float:
    """max over arrays of RMS(after − before) / lr of that array (inf when a step is not
    finite); arrays with lr 0 (a warm-up's first step) do not move and are left out."""
    worst = 0.0
    for b, a, lr in zip(before, after, lrs, strict=True):
        if a.size and lr > 0:
            diff = a - b
            rms = math.sqrt(float((diff * diff).sum()) / a.size)
            if not math.isfinite(rms):
                return math.inf
            worst = max(worst, rms / lr)
    return worst


class AdamMoments(NamedTuple):
    """The fallback Adam's state: one m and v per array (same type and device as the array)."""

    # named as optax's step count; it shadows tuple.count on purpose
    count: int  # type: ignore[assignment]  # Adam steps since this fallback began
    m: list[Any]
    v: list[Any]


def adam_update(
    config: GuardConfig,
    moments: AdamMoments,
    params: Sequence[Any],
    grads: Sequence[Any],
    lrs: Sequence[float],
) -> AdamMoments:
    """One Adam step (Kingma & Ba, Alg. 1) with lr ``lrs[i]`` for array i, in place on
    ``params`` and on the moments.

    Written with ``*=``, ``+=``, ``-=`` and ``**`` only, so the same code runs on numpy, torch
    and CuPy arrays on any device.
    """
    count = moments.count + 1
    b1, b2 = config.beta1, config.beta2
    bias1, bias2 = 1 - b1**count, 1 - b2**count
    for w, g, m, v, lr in zip(params, grads, moments.m, moments.v, lrs, strict=True):
        step_size = lr / bias1
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * (g * g)
        w -= step_size * m / ((v / bias2) ** 0.5 + config.eps)
    return moments._replace(count=count)
