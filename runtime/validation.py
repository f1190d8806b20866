"""Boundary checks of the runtime: parameters, gradients, learning rates and state dicts.

Every message names the argument, the constraint and the value (style §6.6), e.g. "gradient 3
has shape (10, 5) but parameter 3 has (10, 4)". The checks run before anything is modified.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import manifest as mf

STATE_FORMAT = "hyperadam.runtime-state"
STATE_FORMAT_VERSION = 1
_STATE_KEYS = {
    "format",
    "format_version",
    "method",
    "config",
    "param_shapes",
    "num_steps",
    "num_skipped",
    "lr",
    "state",
}


def check_lr(lr: Any) -> float:
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"lr must be a real number, got {type(lr).__name__}")
    if not (math.isfinite(lr) and float(lr) > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    return float(lr)


def _sequence(values: Any, what: str) -> list[Any]:
    if not isinstance(values, (list, tuple)):
        raise TypeError(
            f"{what} must be a list or tuple of numpy arrays, got {type(values).__name__}"
        )
    return list(values)


def check_params(params: Any) -> list[np.ndarray]:
    """Parameters must be writeable, C-contiguous float32 numpy arrays that share no memory."""
    params = _sequence(params, "params")
    if not params:
        raise ValueError("params must hold at least one array, got an empty sequence")
    spans = []
    for i, p in enumerate(params):
        if not isinstance(p, np.ndarray):
            raise TypeError(f"parameter {i} must be a numpy.ndarray, got {type(p).__name__}")
        if p.dtype != np.float32:
            raise ValueError(f"parameter {i} has dtype {p.dtype}; the runtime steps float32 only")
        if not p.flags.c_contiguous:
            raise ValueError(
                f"parameter {i} is not C-contiguous: it is updated in place, and a contiguous "
                f"copy would silently not be; pass the array that owns the memory"
            )
        if not p.flags.writeable:
            raise ValueError(f"parameter {i} is read-only; it must be writeable to be updated")
        if p.size:
            start = p.__array_interface__["data"][0]
            spans.append((start, start + p.nbytes, i))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
        if start < end:
            i, j = sorted((first, second))
            raise ValueError(f"parameter {j} overlaps parameter {i} in memory")
    if not spans:
        raise ValueError("params hold no elements (every array is empty)")
    return params


def check_grads(grads: Any, params: list[np.ndarray]) -> list[np.ndarray]:
    """One float32, C-contiguous gradient per parameter with its shape; returns flat views."""
    grads = _sequence(grads, "grads")
    if len(grads) != len(params):
        raise ValueError(f"expected {len(params)} gradients (one per parameter), got {len(grads)}")
    flat = []
    for i, (g, p) in enumerate(zip(grads, params, strict=True)):
        if not isinstance(g, np.ndarray):
            raise TypeError(f"gradient {i} must be a numpy.ndarray, got {type(g).__name__}")
        if g.dtype != np.float32:
            raise ValueError(f"gradient {i} has dtype {g.dtype} but parameter {i} has float32")
        if g.shape != p.shape:
            raise ValueError(f"gradient {i} has shape {g.shape} but parameter {i} has {p.shape}")
        if not g.flags.c_contiguous:
            raise ValueError(
                f"gradient {i} is not C-contiguous; pass numpy.ascontiguousarray(gradient)"
            )
        flat.append(g.reshape(-1))
    return flat


def nonfinite_message(flat_grads: list[np.ndarray], sum_sq: float, *, sharded: bool) -> str:
    for i, g in enumerate(flat_grads):
        if not np.isfinite(g).all():
            return f"gradient {i} contains NaN or inf (on_nonfinite='raise'); nothing was changed"
    if not sharded or (math.isfinite(sum_sq) and sum_sq > float(np.finfo(np.float32).max)):
        return (
            f"the gradients' sum of squares {sum_sq:.3e} overflows float32 "
            f"(on_nonfinite='raise'); nothing was changed"
        )
    return (
        "a gradient on another shard contains NaN or inf (the all-reduced sum of squares is "
        f"{sum_sq}; on_nonfinite='raise'); nothing was changed"
    )


def check_state_dict(
    state_dict: Any, manifest: mf.Manifest, shapes: Sequence[tuple[int, ...]]
) -> dict[str, Any]:
    """Checks a ``Stepper.state_dict()`` against this stepper; returns it with clean types."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    missing, extra = _STATE_KEYS - set(state_dict), set(state_dict) - _STATE_KEYS
    if missing or extra:
        raise ValueError(
            f"state_dict keys differ: missing {sorted(missing)}, unknown {sorted(extra)}"
        )
    if state_dict["format"] != STATE_FORMAT or state_dict["format_version"] != STATE_FORMAT_VERSION:
        raise ValueError(
            f"state_dict format {state_dict['format']!r} version {state_dict['format_version']!r} "
            f"is not supported (expected {STATE_FORMAT!r} version {STATE_FORMAT_VERSION})"
        )
    if state_dict["method"] != manifest.method or dict(state_dict["config"]) != dict(
        manifest.config
    ):
        raise ValueError(
            f"state_dict is for {state_dict['method']} {dict(state_dict['config'])}, this "
            f"optimizer is {manifest.method} {dict(manifest.config)}"
        )
    saved_shapes = [tuple(s) for s in state_dict["param_shapes"]]
    if saved_shapes != list(shapes):
        raise ValueError(
            f"state_dict was saved for parameter shapes {saved_shapes}, this stepper has "
            f"{list(shapes)}"
        )
    for key in ("num_steps", "num_skipped"):
        value = state_dict[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"state_dict[{key!r}] must be an integer >= 0, got {value!r}")
    num_coords = sum(math.prod(s) for s in shapes)
    expected = {f.name: (num_coords, *f.shape) for f in manifest.state.fields}
    expected.update({c.name: c.shape for c in manifest.state.carried})
    state = state_dict["state"]
    if not isinstance(state, Mapping) or set(state) != set(expected):
        got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"state_dict['state'] must have entries {sorted(expected)}, got {got}")
    for name, shape in expected.items():
        value = state[name]
        if not isinstance(value, np.ndarray) or value.dtype != np.float32 or value.shape != shape:
            desc = (
                f"{value.dtype} array of shape {value.shape}"
                if isinstance(value, np.ndarray)
                else type(value).__name__
            )
            raise ValueError(
                f"state entry {name!r} must be a float32 array of shape {shape}, got {desc}"
            )
        if not np.isfinite(value).all():
            raise ValueError(f"state entry {name!r} contains NaN or inf")
    return {
        "state": dict(state),
        "num_steps": int(state_dict["num_steps"]),
        "num_skipped": int(state_dict["num_skipped"]),
        "lr": check_lr(state_dict["lr"]),
    }
