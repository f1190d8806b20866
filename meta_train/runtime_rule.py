"""An exported optimizer (``runtime.load``) as an ``UpdateRule``: evaluation through the artefact.

The held-out benchmark and the promotion gate judge learned optimizers by running them on tasks.
Through the torch reference that measures the maths; through this rule it measures the exported
ONNX step that users install, and on large models it is several times faster (the runtime
walks the coordinates in cache-sized chunks, where the reference makes a dozen passes over
[p, J] tensors: 0.38 s against 0.11 s a step at 3.4·10⁵ coordinates on one core).

The runtime updates the arrays it is bound to in place; an ``UpdateRule`` returns a delta
instead. ``ExportedRule`` binds the runtime to a buffer of zeros and zeroes it before every
step, so after the step the buffer holds exactly the runtime's update (0 + Δ = Δ in float32),
which the caller adds to its parameters as with any rule. This is exact for the learned steps,
whose update does not read the parameters (weight decay, which does, is left at 0).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

import runtime
from runtime.stepper import NonFiniteGradientError


class ExportedRuleState(NamedTuple):
    """The runtime's own state lives in ``stepper``; ``buffer`` is the zeroed delta buffer."""

    buffer: np.ndarray
    stepper: runtime.Stepper


class ExportedRule:
    """An exported optimizer folder, stepped by onnxruntime, as a functional update rule.

    Args:
      folder: an exported optimizer folder (verified against its manifest on load).
      lr: step size α (default: the manifest's).
      tensor_sizes: the task's tensor sizes, in order, for a method with per-array statistics
        (``for_tensors`` sets them; without them the whole vector is one array).
      threads: the runtime's chunk threads (default 1: evaluations run one per process).
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        lr: float | None = None,
        tensor_sizes: Sequence[int] | None = None,
        threads: int = 1,
    ) -> None:
        self.folder = str(folder)
        self._optimizer = runtime.load(self.folder, threads=threads)
        self.lr = self._optimizer.default_lr if lr is None else float(lr)
        self.tensor_sizes = None if tensor_sizes is None else [int(s) for s in tensor_sizes]
        self.threads = threads
        self.name = f"{self._optimizer.method} (runtime: {self.folder})"

    def for_tensors(self, sizes: Sequence[int]) -> ExportedRule:
        """The same optimizer with each of ``sizes`` bound as its own array (its verified
        folder and sessions shared, not loaded again: evaluations bind once per run)."""
        bound = copy.copy(self)
        bound.tensor_sizes = [int(s) for s in sizes]
        return bound

    def init(self, num_coords: int, *, device: torch.device | str = "cpu") -> ExportedRuleState:
        if torch.device(device).type != "cpu":
            raise ValueError(f"ExportedRule runs on the CPU, got device {device!r}")
        sizes = self.tensor_sizes or [num_coords]
        if sum(sizes) != num_coords:
            raise ValueError(
                f"the bound tensor sizes sum to {sum(sizes)}, but the task has {num_coords} "
                "coordinates"
            )
        buffer = np.zeros(num_coords, dtype=np.float32)
        stepper = self._optimizer.bind(_split(buffer, sizes), lr=self.lr, guard_hook=None)
        return ExportedRuleState(buffer, stepper)

    def update(self, grad: Tensor, state: ExportedRuleState) -> tuple[Tensor, ExportedRuleState]:
        """The runtime's update for ``grad``; a non-finite gradient or step gives a NaN delta
        (the caller's divergence check sees it, as with the torch reference)."""
        buffer, stepper = state
        flat = np.ascontiguousarray(grad.detach().cpu().numpy(), dtype=np.float32)
        buffer[...] = 0.0
        try:
            stepper.step(_split(flat, self.tensor_sizes or [flat.size]))
        except NonFiniteGradientError:  # NonFiniteStepError included
            return torch.full((buffer.size,), float("nan")), state
        return torch.from_numpy(buffer.copy()), state


def _split(flat: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """Views of ``flat``, one per size, in order."""
    bounds = np.cumsum([0, *sizes])
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
