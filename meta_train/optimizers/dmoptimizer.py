"""DMoptimizer (Andrychowicz et al. 2016) as the HyperAdam paper ran it (spec §7.1).

LogAndSign preprocessing (k = 10) → 2-layer LSTM (20 units each, TF ``LSTMCell``) → FC 20 → 1,
coordinate-wise with weights shared over all p coordinates; ``w ← w + α·out`` with α = 0.1.
No normalisation anywhere, so, unlike HyperAdam and RNNprop, the update depends on the scale of
the loss.

What the original code does (read for facts, not copied):

* ``vfleaking/rnnprop`` ``nn_opt/deepmind.py`` (``LSTMOptModel``) and the AAAI code's copy
  ``ShipengWang/HyperAdam`` ``adamLSTM/nn_opt/deepmind.py`` agree: the LSTM output goes through
  ``self.fc(last, 1)`` (an affine map with bias, nothing else) and then
  ``delta_x = last[:, 0] * self.lr`` with ``self.lr = 0.1``; ``x += delta_x``. So the spec's
  "output × 0.1" and "w ← w + 0.1·out" are the **same single factor 0.1**; it is *not* 0.01.
  The factor is the test-time step size α (``default_lr``); there is no second output scale.
  (DeepMind's own ``learning-to-learn`` code uses 0.01, spec §7.1; not reproduced here.)
* Both repositories' ``nn_opt/__init__.py`` define ``_deepmind_log_encode(x, p=10.0)`` as
  ``[log(max(|g|, e^-p)) / p, clip(g·e^p, -1, 1)]`` (magnitude feature first) and the DM model
  calls it with the default p = 10. The same file's ``fc`` draws its kernel from
  ``truncated_normal(stddev=0.1)`` and its bias from zeros.
* The LSTM stack is ``MultiRNNCell([LSTMCell(20)] * 2)``: two cells with separate weights, TF
  defaults (forget bias 1.0, Glorot-uniform kernel over ``[inputs, h]``, zero bias, gate order
  ``[i, j, f, o]``, no peepholes). Its state is ``((c1, h1), (c2, h2))``, zeros at t = 0.

Meta-parameters: 22·80 + 80 + 40·80 + 80 + 20 + 1 = 5,141.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .base import LearnedUpdateRule, Theta

LOG_SCALE = 10.0  # k of LogAndSign: gradients below e^-10 ≈ 4.5e-5 share one magnitude feature
FORGET_BIAS = 1.0  # TF's LSTMCell adds +1 to the forget-gate pre-activation
FC_INIT_STD = 0.1  # TF truncated_normal_initializer(stddev=0.1) of the original ``fc``
DEFAULT_LR = 0.1  # α: the original multiplies the FC output by 0.1 (once) at train and test time
HIDDEN_SIZE = 20


class DMState(NamedTuple):
    """Per-coordinate LSTM state, all zeros at t = 0; the ONNX/checkpoint state layout."""

    h1: Tensor  # [p, H] float32 — layer-1 hidden state (H = 20)
    c1: Tensor  # [p, H] float32 — layer-1 cell state
    h2: Tensor  # [p, H] float32 — layer-2 hidden state
    c2: Tensor  # [p, H] float32 — layer-2 cell state


def log_and_sign(grad: Tensor, k: float = LOG_SCALE) -> Tensor:
    """LogAndSign preprocessing (spec §7.1): ``[log(max(|g|, e^-k)) / k, clip(e^k g, -1, 1)]``.

    Args:
      grad: [p] gradient.
      k: the scale k of the paper's preprocessing (10 in the HyperAdam/RNNprop code).

    Returns:
      [p, 2] features, magnitude first (the order of ``_deepmind_log_encode``). Finite for every
      finite input, including g = 0 (features (−1, 0)).
    """
    magnitude = torch.log(torch.clamp(grad.abs(), min=math.exp(-k))) / k
    sign = torch.clamp(grad * math.exp(k), -1.0, 1.0)
    return torch.stack([magnitude, sign], dim=1)


def lstm_cell(
    x: Tensor, h: Tensor, c: Tensor, kernel: Tensor, bias: Tensor
) -> tuple[Tensor, Tensor]:
    """One TF ``LSTMCell`` step (no peepholes), row-wise over coordinates.

    ``[i, j, f, o] = [x, h] W + b``; ``c' = σ(f + 1)⊙c + σ(i)⊙tanh(j)``; ``h' = σ(o)⊙tanh(c')``.

    Args:
      x: [p, D] input. h, c: [p, H] previous state.
      kernel: [D + H, 4H], gate columns ``[i, j, f, o]``. bias: [4H].

    Returns:
      ``(h', c')``, each [p, H].
    """
    gates = torch.cat([x, h], dim=1) @ kernel + bias
    i, j, f, o = gates.chunk(4, dim=1)
    c_new = torch.sigmoid(f + FORGET_BIAS) * c + torch.sigmoid(i) * torch.tanh(j)
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    return h_new, c_new


def dm_step(
    theta: Theta, grad: Tensor, state: DMState, *, lr: float = DEFAULT_LR
) -> tuple[Tensor, DMState]:
    """One DMoptimizer step over a flat gradient (spec §7.1).

    Args:
      theta: meta-parameters (see ``DMOptimizer.theta_shapes``).
      grad: [p] float32 gradient of the whole model, flattened.
      state: the previous ``DMState``.
      lr: step size α (0.1 in the original code, where it is the only output scale).

    Returns:
      ``(delta, new_state)`` with ``w_t = w_{t-1} + delta`` and ``delta = α·(h2 W_out + b_out)``.
      Note the sign: the network outputs the step itself (``x += delta_x`` in the original).
    """
    features = log_and_sign(grad)
    h1, c1 = lstm_cell(features, state.h1, state.c1, theta["lstm1_kernel"], theta["lstm1_bias"])
    h2, c2 = lstm_cell(h1, state.h2, state.c2, theta["lstm2_kernel"], theta["lstm2_bias"])
    out = (h2 @ theta["out_kernel"] + theta["out_bias"]).squeeze(1)
    return lr * out, DMState(h1, c1, h2, c2)


def init_lstm_fc_theta(
    shapes: dict[str, tuple[int, ...]], fc_kernels: tuple[str, ...], generator: torch.Generator
) -> Theta:
    """TF initialisation shared by DM and RNNprop (spec §8 #13).

    FC kernels (``fc_kernels``) ~ truncated normal σ = 0.1 (TF re-draws beyond 2σ), every
    ``lstm*_kernel`` Glorot-uniform (TF's default initializer), every other tensor zero.
    """
    theta = {name: torch.zeros(shape) for name, shape in shapes.items()}
    for name in fc_kernels:
        torch.nn.init.trunc_normal_(
            theta[name], std=FC_INIT_STD, a=-2 * FC_INIT_STD, b=2 * FC_INIT_STD, generator=generator
        )
    for name in shapes:
        if name.startswith("lstm") and name.endswith("_kernel"):
            torch.nn.init.xavier_uniform_(theta[name], generator=generator)
    return theta


class DMOptimizer(LearnedUpdateRule):
    """DMoptimizer: LogAndSign → 2-layer LSTM(H) → FC H→1, ``w ← w + α·out`` (H = 20, α = 0.1).

    Args:
      hidden_size (int, optional): units per LSTM layer (default: 20, giving 5,141 parameters).

    Raises:
      ValueError: if ``hidden_size < 1``.
    """

    name = "dm"
    default_lr = DEFAULT_LR

    def __init__(self, hidden_size: int = HIDDEN_SIZE) -> None:
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        self.hidden_size = hidden_size

    def theta_shapes(self) -> dict[str, tuple[int, ...]]:
        # Same shapes as the TF variables (…/cell_k/lstm_cell/kernel|bias, fc/w, fc/b).
        h = self.hidden_size
        return {
            "lstm1_kernel": (2 + h, 4 * h),  # [log, sign, h1] → gate columns [i, j, f, o]
            "lstm1_bias": (4 * h,),
            "lstm2_kernel": (2 * h, 4 * h),  # [h1, h2] → gates
            "lstm2_bias": (4 * h,),
            "out_kernel": (h, 1),
            "out_bias": (1,),
        }

    def init_theta(self, generator: torch.Generator) -> Theta:
        """Glorot-uniform LSTM kernels, trunc-normal σ = 0.1 FC kernel, zero biases."""
        return init_lstm_fc_theta(self.theta_shapes(), ("out_kernel",), generator)

    def init_state(self, num_coords: int, *, device: torch.device | str = "cpu") -> DMState:
        zeros = torch.zeros(num_coords, self.hidden_size, device=device)
        return DMState(*(zeros.clone() for _ in DMState._fields))

    def step(
        self, theta: Theta, grad: Tensor, state: DMState, *, lr: float
    ) -> tuple[Tensor, DMState]:
        return dm_step(theta, grad, state, lr=lr)
