"""Per-array hyperparameters around the one global learned step: weight decay and lr multipliers.

HyperAdam's step is global (its normalisations span every coordinate), so its graphs take one
lr. Two things still differ per array, as they do per param group in ``torch.optim``:

* **Decoupled weight decay** (AdamW's, Loshchilov & Hutter 2019): ``w ← w − lr·λ·w``. The
  learned step never reads λ: before the learned update each array is scaled in place by the
float32 factor ``1 − lr·λ`` (computed in float64, rounded once), which is bit for bit what
``torch.optim.AdamW`` does (``param.mul_(1 - lr * weight_decay)``). Works on every array the
runtime binds (numpy views, torch and CuPy arrays on the CPU or a CUDA device) through the
in-place ``*=`` they all share.
* **lr multipliers** s: the learned update ``−lr·d`` of an array becomes ``−s·lr·d``. The step's
  state never depends on lr (lr only scales the final direction, spec §1), so this is one global
  step with per-array step sizes: the array is copied before the graph runs, and its update is
  rescaled after (exact up to one float32 rounding).

References:
  Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np


def check_weight_decay(value: Any, count: int) -> list[float]:
    """One finite λ ≥ 0 for every array, or a sequence of ``count`` of them; returns the list."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise ValueError(
            f"weight_decay must be one number or one per parameter ({count}), got {len(values)}"
        )
    for rate in values:
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
            raise TypeError(f"weight_decay must be a real number, got {type(rate).__name__}")
        if not (math.isfinite(rate) and float(rate) >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {rate}")
    return [float(rate) for rate in values]


def decay_factor(lr: float, weight_decay: float) -> float:
    """``1 − lr·λ`` as the float32 value the arrays are multiplied by (as a Python float)."""
    return float(np.float32(1.0 - lr * weight_decay))


def decay_in_place(arrays: Sequence[Any], rates: Sequence[float], lrs: Sequence[float]) -> None:
    """Scales ``arrays[i]`` by ``1 − lrs[i]·rates[i]`` in place; arrays with λ = 0 are
    untouched."""
    for array, rate, lr in zip(arrays, rates, lrs, strict=True):
        if rate:
            array *= decay_factor(lr, rate)


def array_lrs(lr: float, scales: Sequence[float]) -> list[float]:
    """Each array's lr: ``lr·s`` (exactly lr where s = 1)."""
    return [lr * scale for scale in scales]


def check_lr_scales(value: Any, count: int) -> list[float]:
    """One finite multiplier ≥ 0 per array (or one for all); returns the list. A multiplier of
    0 (a warm-up's first step) advances the state without moving the array."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise ValueError(
            f"lr_scales must be one number or one per parameter ({count}), got {len(values)}"
        )
    for scale in values:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"lr_scales must be real numbers, got {type(scale).__name__}")
        if not (math.isfinite(scale) and float(scale) >= 0):
            raise ValueError(f"lr_scales must be finite numbers >= 0, got {scale}")
    return [float(scale) for scale in values]


def copies_to_rescale(arrays: Sequence[Any], scales: Sequence[float]) -> dict[int, Any]:
    """Copies of the arrays whose multiplier is not 1, taken before the learned update."""
    return {
        i: (a.clone() if hasattr(a, "clone") else a.copy())
        for i, (a, scale) in enumerate(zip(arrays, scales, strict=True))
        if scale != 1.0
    }


def rescale_updates(arrays: Sequence[Any], before: dict[int, Any], scales: Sequence[float]) -> None:
    """``w ← w₀ + s·(w − w₀)`` for each array copied by ``copies_to_rescale``."""
    for i, start in before.items():
        update = arrays[i] - start
        update *= scales[i]
        arrays[i][...] = start + update


def check_array_ids(
    ids: Any, num_arrays: Any, count: int, *, sharded: bool
) -> tuple[list[int], int]:
    """Which array of the whole model each of ``count`` bound arrays is (or is a shard of).

    Per-array statistics (the tensor-wise HyperAdam's rms_T(g)) are taken over every bound
    array with the same id, on every shard. Default: each bound array is its own. Sharded, the
    ids index the whole model's arrays, so ``num_arrays`` (their count, the same on every shard)
    is required with them. Returns ``(ids, num_arrays)``.
    """
    if ids is None:
        if num_arrays is not None:
            raise ValueError("num_arrays is only meaningful with array_ids")
        return list(range(count)), count
    values = list(ids)
    if len(values) != count:
        raise ValueError(f"array_ids must give one id per parameter ({count}), got {len(values)}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"array_ids must be integers >= 0, got {value!r}")
    if num_arrays is None:
        if sharded:
            raise ValueError(
                "a sharded step with array_ids needs num_arrays (the whole model's array count, "
                "the same on every shard)"
            )
        num_arrays = max(values, default=-1) + 1
    if isinstance(num_arrays, bool) or not isinstance(num_arrays, numbers.Integral):
        raise ValueError(f"num_arrays must be an integer, got {num_arrays!r}")
    if any(value >= num_arrays for value in values):
        raise ValueError(f"array_ids must be below num_arrays = {num_arrays}, got {values}")
    return [int(v) for v in values], int(num_arrays)


def add_decay_term(
    deltas: list[np.ndarray], params: Sequence[Any], lr: float, rate: float
) -> list[np.ndarray]:
    """Adds optax ``adamw``'s decay term ``−lr·(λ·w)`` (float32) to functional updates, in
    place (``runtime.jax``: its updates are added to the parameters, not applied in place)."""
    if rate:
        for delta, w in zip(deltas, params, strict=True):
            delta += np.float32(-lr) * (np.float32(rate) * np.asarray(w, np.float32))
    return deltas
