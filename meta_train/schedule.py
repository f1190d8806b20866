"""Where each slot's trajectories begin and end, in meta-steps (``experimental.horizons``).

A slot runs one chain of trajectories, one truncation per meta-step. With the paper's fixed
horizon every trajectory has K = horizon / truncation truncations and every slot starts a new one
at the same meta-steps (0, K, 2K, …). With log-uniform horizons (issue 15: training on long
horizons without always paying for them) trajectory j of slot b has its own length, drawn from
``derive_seed(run seed, HORIZON_STREAM, b, j)``; with random offsets slot b's first trajectory is
cut at a truncation drawn from ``derive_seed(run seed, OFFSET_STREAM, b)``, so that the slots do
not all start (and sit at the easy start of) their trajectories together. The trajectory starts
fresh at inner step 0 either way; only its length changes.

Every length is a pure function of the run seed and the slot, so the learner, every worker and a
resumed run agree on the schedule without sending it.
"""

from __future__ import annotations

import bisect
import math
import random
from typing import NamedTuple

from .experimental import HorizonConfig
from .seeding import derive_seed
from .unroll import UnrollConfig

HORIZON_STREAM = 19  # the horizon of trajectory j of slot b: derive_seed(run seed, 19, b, j)
OFFSET_STREAM = 23  # the cut of slot b's first trajectory: derive_seed(run seed, 23, b)


class SlotPosition(NamedTuple):
    """Where a slot stands at a meta-step."""

    trajectory: int  # index of its trajectory (the task seed derives from it)
    truncation: int  # index of the truncation within that trajectory (0: a new one starts)
    length: int  # truncations of that trajectory

    @property
    def last(self) -> bool:
        """Whether the trajectory ends with this truncation."""
        return self.truncation + 1 == self.length


class TrajectorySchedule:
    """The trajectory boundaries of every slot of a run.

    Args:
      unroll: the truncation length (and, for fixed horizons, the horizon).
      horizons: fixed or log-uniform (``experimental.HorizonConfig``).
      run_seed: the run seed every length derives from.
    """

    def __init__(
        self, unroll: UnrollConfig, horizons: HorizonConfig | None = None, run_seed: int = 0
    ) -> None:
        horizons = horizons or HorizonConfig()
        self.unroll = unroll
        self.horizons = horizons
        self.run_seed = run_seed
        if horizons.kind == "fixed":
            self._range = (unroll.truncations_per_trajectory,) * 2
        else:
            self._range = horizons.truncation_range(unroll.truncation)
        self._starts: dict[int, list[int]] = {}  # slot → first meta-step of each trajectory

    @property
    def fixed(self) -> bool:
        return self.horizons.kind == "fixed"

    @property
    def max_truncations(self) -> int:
        """The most truncations a trajectory may have (what a rebuild may replay, less one)."""
        return self._range[1]

    def trajectory_length(self, slot: int, trajectory: int) -> int:
        """Truncations of trajectory ``trajectory`` of ``slot``."""
        if self.fixed:
            return self._range[0]
        length = self._drawn_length(slot, trajectory)
        if trajectory == 0 and self.horizons.offsets:
            # Cut at a uniform truncation: the first trajectory keeps 1 … length of them.
            length -= random.Random(derive_seed(self.run_seed, OFFSET_STREAM, slot)).randrange(
                length
            )
        return length

    def _drawn_length(self, slot: int, trajectory: int) -> int:
        """A log-uniform horizon in [min_steps, max_steps], in whole truncations."""
        assert self.horizons.min_steps is not None and self.horizons.max_steps is not None
        u = random.Random(derive_seed(self.run_seed, HORIZON_STREAM, slot, trajectory)).random()
        low, high = math.log(self.horizons.min_steps), math.log(self.horizons.max_steps)
        steps = math.exp(low + u * (high - low))
        fewest, most = self._range
        return min(max(round(steps / self.unroll.truncation), fewest), most)

    def position(self, slot: int, step: int) -> SlotPosition:
        """Where ``slot`` stands at meta-step ``step``."""
        if step < 0:
            raise ValueError(f"meta-step must be >= 0, got {step}")
        if self.fixed:
            k = self._range[0]
            return SlotPosition(step // k, step % k, k)
        starts = self._starts.setdefault(slot, [0])
        while starts[-1] <= step:
            starts.append(starts[-1] + self.trajectory_length(slot, len(starts) - 1))
        trajectory = bisect.bisect_right(starts, step) - 1
        return SlotPosition(
            trajectory,
            step - starts[trajectory],
            starts[trajectory + 1] - starts[trajectory],
        )
