"""Noisy sine sequences for the LSTM sequence-prediction task (spec §5.3, from RNNprop).

Each example draws an amplitude A ~ U(0, 10), a frequency ω ~ U(0, π/2) and a phase
φ ~ U(0, 2π); the inputs are x_k = A·sin(kω + φ) + ε_k for k = 0..9 with ε_k ~ N(0, σ²), and
the target is the noiseless next value A·sin(10ω + φ). Fresh sequences are drawn for every
minibatch, all from the caller's generator, so a minibatch is a pure function of its seed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MAX_AMPLITUDE = 10.0
MAX_OMEGA = math.pi / 2
SEQ_LEN = 10


def sample_sine_batch(
    generator: torch.Generator,
    batch_size: int = 128,
    *,
    noise_std: float = 0.1,
    seq_len: int = SEQ_LEN,
) -> tuple[Tensor, Tensor]:
    """Draws one minibatch of noisy sine sequences and their noiseless next values.

    Args:
      generator (torch.Generator): the source of every draw (CPU).
      batch_size (int, optional): sequences per minibatch (default: 128).
      noise_std (float, optional): σ of the input noise; the paper uses 0.1 and 0.01
        (default: 0.1).
      seq_len (int, optional): inputs per sequence; the target is at k = seq_len (default: 10).

    Returns:
      ``(inputs, targets)``: float32 ``[batch_size, seq_len]`` and ``[batch_size]``.

    Raises:
      ValueError: batch_size or seq_len < 1, or noise_std < 0.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    # Draw order is part of the data format: amplitude, omega, phase, then the noise.
    amplitude = torch.rand(batch_size, 1, generator=generator) * MAX_AMPLITUDE
    omega = torch.rand(batch_size, 1, generator=generator) * MAX_OMEGA
    phase = torch.rand(batch_size, 1, generator=generator) * (2 * math.pi)
    noise = torch.randn(batch_size, seq_len, generator=generator) * noise_std
    k = torch.arange(seq_len, dtype=torch.float32)
    inputs = amplitude * torch.sin(k * omega + phase) + noise
    targets = (amplitude * torch.sin(seq_len * omega + phase)).squeeze(1)
    return inputs, targets
