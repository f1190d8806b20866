"""The messages between the learner and its gradient workers: frozen dataclasses of numpy arrays.

Kept free of torch, so that anything that only speaks the protocol (a benchmark's stand-in
worker, a tool that reads messages) stays a light process; ``TrajectoryArrays`` imports torch
only in the methods that convert to and from torch.

Per slot and meta-step the learner sends a ``SlotWork`` (two ints, and a ``Rebuild`` only when
the worker must rebuild the slot's state) and receives a ``SlotResult``: the meta-gradient, O(θ),
and a few numbers. Trajectories (O(p·J)) stay on the workers.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .unroll import Trajectory


@dataclasses.dataclass(frozen=True)
class TrajectoryArrays:
    """A ``Trajectory`` as numpy arrays: how inner state travels and is checkpointed."""

    seed: int  # task seed of the trajectory
    step: int  # inner steps taken so far
    params: np.ndarray  # [p] float32 optimizee parameters
    state: tuple[np.ndarray, ...]  # the optimizer state's tensors, in ``state_fields`` order
    state_fields: tuple[str, ...]  # the state NamedTuple's field names

    @classmethod
    def from_trajectory(cls, trajectory: Trajectory) -> TrajectoryArrays:
        state = trajectory.opt_state
        return cls(
            seed=int(trajectory.seed),
            step=int(trajectory.step),
            params=np.ascontiguousarray(trajectory.params.detach().cpu().numpy()),
            # Contiguous, so that Ray ships each array as one out-of-band buffer: the fused
            # step keeps its state as transposed planes, which pickle would copy in-band
            # (measured: 11 ms against 6 ms to put one 7.7 MB trajectory).
            state=tuple(np.ascontiguousarray(t.detach().cpu().numpy()) for t in state),
            state_fields=tuple(state._fields),
        )

    def to_trajectory(self, state_type: Any) -> Trajectory:  # state_type: a NamedTuple class
        """Copies back into torch (arrays received from Ray are read-only views)."""
        import torch

        from .unroll import Trajectory

        if tuple(state_type._fields) != self.state_fields:
            raise ValueError(
                f"trajectory state has fields {self.state_fields}, the optimizer expects "
                f"{tuple(state_type._fields)}"
            )
        return Trajectory(
            self.seed,
            self.step,
            torch.tensor(self.params),
            state_type(*(torch.tensor(a) for a in self.state)),
        )

    @property
    def nbytes(self) -> int:
        return int(self.params.nbytes + sum(a.nbytes for a in self.state))


@dataclasses.dataclass(frozen=True)
class Rebuild:
    """How to rebuild a slot's state at the start of a meta-step the worker does not hold.

    The replay runs the meta-steps ``step − len(versions)`` … ``step − 1`` from ``base``, each with
    θ of the version it used the first time. ``base`` is None for the trajectory's start (what
    every run writes); a stored state only for runs continued from a format-1 checkpoint, until
    that trajectory ends.
    """

    versions: tuple[int, ...]  # θ version of each replayed meta-step, oldest first
    base: TrajectoryArrays | None = None


@dataclasses.dataclass(frozen=True)
class SlotWork:
    """One slot's meta-step to compute; ``rebuild`` only when the worker lacks the slot's state."""

    slot: int
    step: int
    rebuild: Rebuild | None = None


@dataclasses.dataclass(frozen=True)
class SlotResult:
    """The meta-gradient of one slot at one meta-step, and where its trajectory now stands."""

    slot: int
    step: int  # the meta-step computed
    version: int  # the θ version it was computed with
    task_seed: int
    meta_grad: np.ndarray  # flat, float32, θ's layout
    inner_step: int  # inner steps the slot's trajectory has taken after this truncation
    meta_loss: float
    inner_losses: tuple[float, ...]
    grad_norm: float  # L2 norm of meta_grad (nan if it is not finite)
    compute_s: float
    replayed: int = 0  # truncations replayed to rebuild the slot's state before this one

    @property
    def finite(self) -> bool:
        return bool(np.isfinite(self.meta_grad).all())


@dataclasses.dataclass(frozen=True)
class WorkerResult:
    """The answer to one ``compute`` call."""

    worker_id: int
    pid: int
    version: int
    results: tuple[SlotResult, ...]
    compute_s: float
