"""Seed derivation: every random draw in hyperadam comes from a logged seed through here.

Child seeds are derived with numpy's SeedSequence from a tuple of integers (run seed, trajectory
index, step, ...), so redone work (a restarted worker, a resumed run) draws exactly the same
tasks, initialisations and minibatches.
"""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*entropy: int) -> int:
    """A 63-bit seed determined by the integers in ``entropy`` (order matters)."""
    if any(int(e) < 0 for e in entropy):
        raise ValueError(f"seed entropy must be non-negative integers, got {entropy}")
    state = np.random.SeedSequence([int(e) for e in entropy]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def generator(*entropy: int) -> torch.Generator:
    """A CPU torch.Generator seeded with ``derive_seed(*entropy)``."""
    return torch.Generator().manual_seed(derive_seed(*entropy))
