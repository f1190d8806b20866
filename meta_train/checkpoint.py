"""Trainer checkpoints and the inference-only θ artifact: atomic, hashed, pickle-free.

A checkpoint holds everything exact resume needs: the learner state (θ, Adam state, step, and
what rebuilds every slot's trajectory at that step: the θ version each meta-step of the current
trajectory used and the θs of those versions, at most K − 1 of them), the full run config, the
metric history the plot is drawn from, and the best validated θ. No optimizee or optimizer state
(O(p·J)) is stored: a resumed learner's workers replay the current trajectories' truncations
(``worker.rebuild_trajectory``). All randomness derives from the logged run seed
(``seeding.derive_seed``: task seeds from (seed, slot, trajectory), minibatches from (task seed,
step)), so no RNG state exists beyond the seed and the slots' task seeds and positions.

File layout (one file, so a crash can never pair a new header with an old payload)::

    b"HYPERADAM-CKPT\\n"               magic, 15 bytes
    u64 little-endian                  length H of the header
    H bytes of JSON                    {"format", "version", "payload_bytes", "payload_sha256"}
    payload                            an .npz (numpy zip, no pickles) of named arrays; the
                                       non-array fields travel as the JSON array "meta"

Format versions: 2 (this one) stores the replay records; 1 stored every slot's trajectory at the
step. Version 1 files still load: their trajectories become the slots' replay bases, used until
those trajectories end (a checkpoint written in that window stores them again).

Loading checks the magic, the version, the payload length and its sha256 before reading any
array, and reads with ``allow_pickle=False``: a truncated or altered file, or one whose θ or Adam
state is not finite, is refused with a ``CheckpointError`` that says what is wrong, never loaded
half-way. Writing goes to a temporary file in the same folder, is fsynced, then renamed over the
target (atomic on POSIX).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np

from runtime.theta import save_theta as write_theta

from .learner import LearnerState
from .worker import TrajectoryArrays

MAGIC = b"HYPERADAM-CKPT\n"
FORMAT = "hyperadam-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: every slot's trajectory stored (see the module docstring)
THETA_FILE = "theta.npz"  # the inference-only θ artifact's file name
_HEADER_LEN = struct.Struct("<Q")
_MAX_HEADER = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded (truncated, altered, unknown version)."""


@dataclasses.dataclass(frozen=True)
class History:
    """The per-step meta-loss and the validation curve (what the plot shows)."""

    meta_loss: tuple[float, ...] = ()  # index = meta-step
    validation_steps: tuple[int, ...] = ()
    validation_loss: tuple[float, ...] = ()

    def with_step(self, step: int, meta_loss: float) -> History:
        losses = self.meta_loss[:step] + (float("nan"),) * max(0, step - len(self.meta_loss))
        return dataclasses.replace(self, meta_loss=losses + (float(meta_loss),))

    def with_validation(self, step: int, loss: float) -> History:
        keep = [i for i, s in enumerate(self.validation_steps) if s < step]
        return History(
            self.meta_loss,
            tuple(self.validation_steps[i] for i in keep) + (step,),
            tuple(self.validation_loss[i] for i in keep) + (float(loss),),
        )


@dataclasses.dataclass(frozen=True)
class BestTheta:
    step: int
    loss: float
    theta: np.ndarray


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """The full trainer state at ``learner.step``."""

    config: dict[str, Any]  # RunConfig.to_dict()
    learner: LearnerState
    history: History = History()
    best: BestTheta | None = None
    run_id: str | None = None
    family_digest: str = ""

    @property
    def step(self) -> int:
        return self.learner.step


# -- atomic files -----------------------------------------------------------------------------


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that readers see the old file or the new one, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    payload: dict[str, Any] = dict(arrays)  # typed apart from savez's own keyword arguments
    np.savez(buffer, **payload)
    return buffer.getvalue()


def _json_array(obj: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(obj, sort_keys=True).encode(), dtype=np.uint8)


# -- checkpoints ------------------------------------------------------------------------------


def encode(checkpoint: Checkpoint) -> bytes:
    """The checkpoint as bytes (see the module docstring for the layout)."""
    state = checkpoint.learner
    arrays: dict[str, np.ndarray] = {"theta": np.asarray(state.theta, dtype=np.float32)}
    for name, value in state.adam.items():
        arrays[f"adam/{name}"] = np.asarray(value)
    slots: list[dict[str, Any] | None] = []
    for b, trajectory in enumerate(state.trajectories):
        if trajectory is None:
            slots.append(None)
            continue
        slots.append(
            {"seed": trajectory.seed, "step": trajectory.step, "fields": trajectory.state_fields}
        )
        arrays[f"slot/{b}/params"] = np.asarray(trajectory.params)
        for i, value in enumerate(trajectory.state):
            arrays[f"slot/{b}/state/{i}"] = np.asarray(value)
    for version, theta in state.theta_history.items():
        arrays[f"theta_history/{int(version)}"] = np.asarray(theta, dtype=np.float32)
    history = checkpoint.history
    arrays["history/meta_loss"] = np.asarray(history.meta_loss, dtype=np.float64)
    arrays["history/validation_steps"] = np.asarray(history.validation_steps, dtype=np.int64)
    arrays["history/validation_loss"] = np.asarray(history.validation_loss, dtype=np.float64)
    best = None
    if checkpoint.best is not None:
        best = {"step": checkpoint.best.step, "loss": checkpoint.best.loss}
        arrays["best/theta"] = np.asarray(checkpoint.best.theta, dtype=np.float32)
    meta = {
        "step": state.step,
        "config": checkpoint.config,
        "run_id": checkpoint.run_id,
        "family_digest": checkpoint.family_digest,
        "adam": sorted(state.adam),
        "slots": slots,
        "versions": [list(v) for v in state.slot_versions()],
        "theta_history": sorted(int(v) for v in state.theta_history),
        "stale_rejected_total": state.stale_rejected_total,
        "rejected_total": state.rejected_total,
        "worker_restarts": state.worker_restarts,
        "best": best,
        "rng": {
            "run_seed": checkpoint.config.get("seed"),
            "scheme": "seeding.derive_seed: task (seed, 7, slot, trajectory), θ_0 (seed, 11)",
        },
        "written_at": time.time(),
    }
    arrays["meta"] = _json_array(meta)
    payload = _npz_bytes(arrays)
    header = json.dumps(
        {
            "format": FORMAT,
            "version": VERSION,
            "payload_bytes": len(payload),
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
        },
        sort_keys=True,
    ).encode()
    return MAGIC + _HEADER_LEN.pack(len(header)) + header + payload


def save(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Writes the checkpoint atomically; returns the path."""
    atomic_write_bytes(path, encode(checkpoint))
    return Path(path)


def _verified_payload(
    data: bytes, name: str, fmt: str, versions: tuple[int, ...]
) -> tuple[dict, bytes]:
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{name} is not a hyperadam checkpoint (bad magic bytes)")
    offset = len(MAGIC) + _HEADER_LEN.size
    if len(data) < offset:
        raise CheckpointError(f"{name} is truncated: the file ends inside its header")
    (header_len,) = _HEADER_LEN.unpack_from(data, len(MAGIC))
    if header_len > _MAX_HEADER or len(data) < offset + header_len:
        raise CheckpointError(f"{name} is truncated or altered: bad header length {header_len}")
    try:
        header = json.loads(data[offset : offset + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{name} is altered: its header is not valid JSON") from None
    if not isinstance(header, dict) or header.get("format") != fmt:
        raise CheckpointError(f"{name} is not a {fmt} file (header format {header!r})")
    if header.get("version") not in versions:
        readable = " and ".join(str(v) for v in versions)
        raise CheckpointError(
            f"{name} has format version {header.get('version')!r}; this hyperadam reads "
            f"version {readable}"
        )
    payload = data[offset + header_len :]
    expected = header.get("payload_bytes")
    if len(payload) != expected:
        raise CheckpointError(
            f"{name} is truncated or altered: expected {expected} payload bytes, found "
            f"{len(payload)}"
        )
    digest = hashlib.sha256(payload).hexdigest()
    if digest != header.get("payload_sha256"):
        raise CheckpointError(
            f"{name} is corrupt: payload sha256 {digest} does not match the header's "
            f"{header.get('payload_sha256')}"
        )
    return header, payload


def decode(data: bytes, name: str = "checkpoint") -> Checkpoint:
    """Parses and verifies checkpoint bytes.

    Raises:
      CheckpointError: bad magic, unknown version, truncated, hash mismatch, malformed arrays.
    """
    _, payload = _verified_payload(data, name, FORMAT, READABLE_VERSIONS)
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        meta = json.loads(arrays.pop("meta").tobytes())
        slots: list[TrajectoryArrays | None] = []
        for b, slot in enumerate(meta["slots"]):
            if slot is None:
                slots.append(None)
                continue
            fields = tuple(slot["fields"])
            slots.append(
                TrajectoryArrays(
                    seed=int(slot["seed"]),
                    step=int(slot["step"]),
                    params=arrays[f"slot/{b}/params"],
                    state=tuple(arrays[f"slot/{b}/state/{i}"] for i in range(len(fields))),
                    state_fields=fields,
                )
            )
        # Format 1 has no replay records: its stored trajectories are the replay bases.
        versions = tuple(tuple(int(v) for v in used) for used in meta.get("versions", ()))
        learner = LearnerState(
            step=int(meta["step"]),
            theta=arrays["theta"],
            adam={name: arrays[f"adam/{name}"] for name in meta["adam"]},
            trajectories=tuple(slots),
            rejected_total=int(meta["rejected_total"]),
            worker_restarts=int(meta["worker_restarts"]),
            versions=versions,
            theta_history={
                int(v): arrays[f"theta_history/{int(v)}"] for v in meta.get("theta_history", ())
            },
            stale_rejected_total=int(meta.get("stale_rejected_total", 0)),
        )
        history = History(
            tuple(float(x) for x in arrays["history/meta_loss"]),
            tuple(int(x) for x in arrays["history/validation_steps"]),
            tuple(float(x) for x in arrays["history/validation_loss"]),
        )
        best = None
        if meta["best"] is not None:
            best = BestTheta(int(meta["best"]["step"]), float(meta["best"]["loss"]),
                             arrays["best/theta"])
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError, OSError) as error:
        raise CheckpointError(f"{name} is malformed: {type(error).__name__}: {error}") from None
    _check_finite(name, arrays)
    return Checkpoint(
        config=meta["config"],
        learner=learner,
        history=history,
        best=best,
        run_id=meta.get("run_id"),
        family_digest=meta.get("family_digest", ""),
    )


def _check_finite(name: str, arrays: dict[str, np.ndarray]) -> None:
    """Refuses a non-finite θ, best θ, Adam moment or replay θ: training on from it would reject
    every meta-gradient (NaN in, NaN out) and still end "finished"."""
    kept = ("adam/", "theta_history/")
    for key in ("theta", "best/theta", *(k for k in arrays if k.startswith(kept))):
        value = arrays.get(key)
        if value is None or not np.issubdtype(value.dtype, np.floating):
            continue
        bad = int(np.count_nonzero(~np.isfinite(value)))
        if bad:
            raise CheckpointError(f"{name} holds {bad} non-finite values in {key!r}")


def load(path: str | Path) -> Checkpoint:
    """Reads and verifies a checkpoint file (see ``decode``)."""
    path = Path(path)
    return decode(path.read_bytes(), name=f"checkpoint {str(path)!r}")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def step_of(name: str) -> int | None:
    """The step in a ``checkpoint_name``; None for other names."""
    if not (name.startswith("step-") and name.endswith(".ckpt")):
        return None
    digits = name[len("step-") : -len(".ckpt")]
    return int(digits) if digits.isdigit() else None


# -- the inference-only θ artifact ------------------------------------------------------------


def save_theta(
    path: str | Path,
    *,
    optimizer: Any,
    theta: np.ndarray,
    lr: float | None,
    lineage: dict[str, Any],
) -> Path:
    """Writes θ alone, in the runtime's θ format (``runtime.theta``: one ``.npz`` of fp32
    arrays by meta-parameter name plus a JSON header, read without pickle).

    The header's meta holds the lineage (``mlflow_run_id``, ``step``, ``task_digest``,
    ``config_digest``), the step size and, for HyperAdam, J.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    named = optimizer.unflatten(torch.tensor(np.asarray(theta, dtype=np.float32)))
    meta = dict(lineage)
    meta["lr"] = optimizer.default_lr if lr is None else lr
    if hasattr(optimizer, "num_candidates"):
        meta["num_candidates"] = optimizer.num_candidates
    return write_theta(path, optimizer.name, named, **meta)
