"""The guard inside ``runtime.jax``'s host callback: its state as arrays, and one guarded step.

``runtime.jax.learned_optimizer(..., guard=...)`` keeps ``runtime.guard``'s state in the optax
state as arrays (``JaxGuardState``: the decision scalars, the snapshot, the fallback Adam's
moments) and runs ``host_step`` on host copies inside ``jax.pure_callback``, so the same pure
decisions as the numpy and torch adapters apply under ``jit``. Updates are additive in optax:
a restore returns ``snapshot − params`` (bitwise while both are within a factor 2, else to one
rounding), and a non-finite learned update is never returned (it restores instead), so the
parameters cannot leave the finite range through this transform.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from . import guard as gd
from . import per_array


class JaxGuardState(NamedTuple):
    """The guard's state inside ``LearnedOptimizerState`` (``runtime.guard.GuardState`` as
    arrays, plus the snapshot and the fallback Adam's moments)."""

    scalars: dict[str, jax.Array]  # GuardState's fields and counters, each [] int32/float32
    snapshot_params: list[jax.Array]  # the last good parameters, one per leaf
    snapshot_state: dict[str, jax.Array]  # the learned state there (stepper layout)
    adam_m: list[jax.Array]  # the fallback Adam's moments, one per leaf
    adam_v: list[jax.Array]


_INT_FIELDS: tuple[str, ...] = (
    "fallback_left",
    "num_fallbacks",
    "since_snapshot",
    "adam_count",
    "snapshot_count",
    "num_adam_steps",
    "is_fallback",
    "has_snapshot",
    "adam_fresh",
)
_FLOAT_FIELDS = ("smoothed", "best")


def scalars_of(state: gd.GuardState, **counters: int) -> dict[str, np.ndarray]:
    """``GuardState`` and the counters (Adam's step count, the snapshot's learned-step count,
    Adam steps taken) as 0-d int32/float32 arrays, the form the optax state holds."""
    values = dict(state._asdict(), **counters)
    values["is_fallback"] = int(state.mode == gd.FALLBACK)
    out = {k: np.asarray(int(values[k]), np.int32) for k in _INT_FIELDS}
    out.update({k: np.asarray(values[k], np.float32) for k in _FLOAT_FIELDS})
    return out


def state_of(scalars: dict[str, Any]) -> tuple[gd.GuardState, dict[str, int]]:
    """The inverse of ``scalars_of`` (on host copies)."""
    v = {k: np.asarray(x).item() for k, x in scalars.items()}
    state = gd.GuardState(
        mode=gd.FALLBACK if v["is_fallback"] else gd.LEARNED,
        fallback_left=int(v["fallback_left"]),
        num_fallbacks=int(v["num_fallbacks"]),
        smoothed=float(v["smoothed"]),
        best=float(v["best"]),
        since_snapshot=int(v["since_snapshot"]),
        has_snapshot=bool(v["has_snapshot"]),
        adam_fresh=bool(v["adam_fresh"]),
    )
    counters = {k: int(v[k]) for k in ("adam_count", "snapshot_count", "num_adam_steps")}
    return state, counters


def host_step(
    config: gd.GuardConfig,
    inputs: dict[str, Any],
    has_loss: bool,
    learned: Callable[[float, list[Any], list[Any]], tuple[Any, ...]],
    names: list[str],
) -> dict[str, Any]:
    """One guarded step on host copies of ``inputs`` (see ``runtime.jax``'s ``guarded_update``):
    ``runtime.guard`` decides; ``learned(lr, grads, raw)`` gives the learned update from state
    ``raw``; returns the new state's arrays and ``"deltas"``, the update to add."""
    host = jax.tree_util.tree_map(np.array, inputs)
    guard_state, counters = state_of(host["scalars"])
    lr_f, rate_f = float(host["lr"]), float(host["rate"])
    loss = float(host["loss"]) if has_loss else None
    params, grads = host["params"], host["grads"]
    out = {k: host[k] for k in ("count", "num_skipped", "raw", "snapshot_params",
                                "snapshot_state", "adam_m", "adam_v")}  # fmt: skip
    out["deltas"] = [np.zeros_like(p) for p in params]

    def finish(new_guard: gd.GuardState) -> dict[str, Any]:
        out["scalars"] = scalars_of(new_guard, **counters)
        out["count"] = np.asarray(out["count"], np.int32)
        out["num_skipped"] = np.asarray(out["num_skipped"], np.int32)
        return out

    def restore(new_guard: gd.GuardState) -> dict[str, Any]:
        out["deltas"] = [s - p for s, p in zip(out["snapshot_params"], params, strict=True)]
        out["raw"] = [a.copy() for a in out["snapshot_state"]]
        out["count"] = counters["snapshot_count"]
        return finish(new_guard)

    decision, new_guard = gd.before_step(config, guard_state, loss)
    if decision.restore:
        return restore(new_guard)
    if not all(np.isfinite(g).all() for g in grads):
        out["num_skipped"] = out["num_skipped"] + 1
        return finish(guard_state)  # a skipped step: the guard's state is kept as it was
    if decision.snapshot:
        out["snapshot_params"] = [p.copy() for p in params]
        out["snapshot_state"] = [a.copy() for a in host["raw"]]
        counters["snapshot_count"] = int(host["count"])
    if decision.use_adam:
        if decision.fresh_adam:
            out["adam_m"] = [np.zeros_like(p) for p in params]
            out["adam_v"] = [np.zeros_like(p) for p in params]
            counters["adam_count"] = 0
        adam_lr = lr_f if decision.lr is None else decision.lr
        deltas = [np.zeros_like(p) for p in params]  # Adam on zeros: −step exactly
        moments = gd.adam_update(
            config,
            gd.AdamMoments(counters["adam_count"], out["adam_m"], out["adam_v"]),
            deltas,
            grads,
            [adam_lr] * len(deltas),
        )
        counters["adam_count"] = moments.count
        counters["num_adam_steps"] += 1
        out["deltas"] = per_array.add_decay_term(deltas, params, adam_lr, rate_f)
        return finish(new_guard)
    deltas, new_raw, _ = learned(lr_f, grads, host["raw"])
    zeros = [np.zeros_like(d) for d in deltas]
    ratio = gd.update_rms_over_lr(zeros, deltas, [lr_f] * len(deltas))
    if not has_loss or not np.isfinite(ratio):  # a non-finite update is never returned
        ok, checked = gd.after_learned_step(config, new_guard, ratio)
        if not ok:
            return restore(checked)
    out["deltas"] = per_array.add_decay_term(deltas, params, lr_f, rate_f)
    out["raw"] = [new_raw[n] for n in names]
    out["count"] = int(host["count"]) + 1
    return finish(new_guard)
