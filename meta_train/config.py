"""Canonical JSON and digests of frozen configuration dataclasses (logged whole, hashed once)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any


def to_plain(obj: Any) -> Any:
    """Turns (nested) dataclasses, tuples and enums into JSON-ready plain data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj


def canonical_json(obj: Any) -> str:
    """Sorted-key, whitespace-free JSON: the same config always gives the same bytes."""
    return json.dumps(to_plain(obj), sort_keys=True, separators=(",", ":"))


def digest(obj: Any) -> str:
    """sha256 hex digest of ``canonical_json(obj)``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Flattens a nested config into dotted keys (``unroll.horizon``) for MLflow params."""
    plain = to_plain(obj)
    if not isinstance(plain, dict):
        return {prefix.rstrip("."): json.dumps(plain) if isinstance(plain, list) else str(plain)}
    out: dict[str, str] = {}
    for key, value in plain.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out
