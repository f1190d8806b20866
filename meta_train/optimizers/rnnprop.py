"""RNNprop (Lv, Jiang, Li 2017): Adam-scaled inputs → FC+ELU → 2-layer LSTM → α·tanh (spec §7.2).

Coordinate-wise with weights shared over all p coordinates. Both inputs are divided by the
same running RMS σ of the gradient, so the update is invariant to rescaling the loss (up to
the ε = 1e-8 in σ), and ``|delta| < α`` always because of the tanh.

What the original code does (read for facts, not copied):

* ``vfleaking/rnnprop`` ``nn_opt/rnn.py`` (``RNNpropModel._iter``) and the AAAI code's copy
  ``ShipengWang/HyperAdam`` ``adamLSTM/nn_opt/rnn.py`` (``iter``) agree line for line:
  ``m = .95m + .05g``; ``v = .95v + .05g²``; running products ``b1t *= .95``, ``b2t *= .95``
  (both start at 1, so after step t they equal 0.95^t); ``sv = sqrt(v / (1 − b2t)) + 1e-8`` (ε
  **outside** the root); input ``[g / sv, (m / (1 − b1t)) / sv]`` (raw gradient first) →
  ``elu(fc(·, 20))`` (affine with bias) → ``MultiRNNCell([LSTMCell(20)] * 2)`` →
  ``fc(·, 1)`` with bias → ``a = tanh(a) * self.lr`` with ``self.lr = 0.1`` → ``x -= a``.
  So tanh is applied to the FC output and α multiplies *after* the tanh, once: the step is
  ``−0.1·tanh(out)``, bounded by 0.1 per coordinate. (The later PyTorch port in
  ``ShipengWang/Variational-HyperAdam`` drops the tanh; spec §7.2 says not to follow it.)
* ``fc`` kernels are ``truncated_normal(stddev=0.1)``, biases zero (``nn_opt/__init__.py``).

State layout. The original carries the products ``b1t``/``b2t``; here, as in
``torch.optim.Adam``, a float step count t is carried instead and 0.95^t is recomputed (β1 = β2,
so one count serves both corrections). It is a [1] fp32 tensor: it broadcasts against the [p]
tensors, stays a real input/output of an exported ONNX graph (a Python int would be frozen into
the trace as a constant), and has no rank-0 special cases in runtimes. fp32 counts exactly to
2^24 steps, far beyond any horizon here. Every chunk of a chunked step reads the same t and
writes t + 1.

Meta-parameters: 2·20 + 20 + 2·(40·80 + 80) + 20 + 1 = 6,641.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LearnedUpdateRule, Theta
from .dmoptimizer import init_lstm_fc_theta, lstm_cell

BETA1 = 0.95  # decay of the internal first moment
BETA2 = 0.95  # decay of the internal second moment
# ε outside the root of σ = sqrt(v̂) + ε. It is all that keeps a never-touched coordinate (v = 0)
# from computing 0/0, so the ONNX export must keep it (design §3.1: dynamo's optimizer deletes
# ``x + c`` for |c| ≤ 1e-8; export with optimize=False).
SIGMA_EPS = 1e-8
DEFAULT_LR = 0.1  # α: the step is −α·tanh(out), at train and test time
HIDDEN_SIZE = 20


class RNNpropState(NamedTuple):
    """Per-coordinate state, all zeros at t = 0; the ONNX/checkpoint state layout."""

    m: Tensor  # [p] float32 — first moment of the gradient, decay β1 = 0.95
    v: Tensor  # [p] float32 — second moment, decay β2 = 0.95
    step: Tensor  # [1] float32 — number of steps taken so far (0 at init; t after step t)
    h1: Tensor  # [p, H] float32 — layer-1 LSTM hidden state (H = 20)
    c1: Tensor  # [p, H] float32 — layer-1 LSTM cell state
    h2: Tensor  # [p, H] float32 — layer-2 LSTM hidden state
    c2: Tensor  # [p, H] float32 — layer-2 LSTM cell state


def adam_features(grad: Tensor, state: RNNpropState) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Internal Adam statistics and the two scale-free inputs (spec §7.2).

    Returns:
      ``(features, m, v, step)``: features [p, 2] = ``[g/σ, m̂/σ]`` with ``m̂ = m/(1 − β1^t)``
      and ``σ = sqrt(v/(1 − β2^t)) + 1e-8``; the updated m, v and step count t.
    """
    step = state.step + 1.0
    m = BETA1 * state.m + (1.0 - BETA1) * grad
    v = BETA2 * state.v + (1.0 - BETA2) * grad.square()
    m_hat = m / (1.0 - torch.pow(BETA1, step))
    sigma = torch.sqrt(v / (1.0 - torch.pow(BETA2, step))) + SIGMA_EPS
    features = torch.stack([grad / sigma, m_hat / sigma], dim=1)
    return features, m, v, step


def rnnprop_step(
    theta: Theta, grad: Tensor, state: RNNpropState, *, lr: float = DEFAULT_LR
) -> tuple[Tensor, RNNpropState]:
    """One RNNprop step over a flat gradient (spec §7.2).

    Args:
      theta: meta-parameters (see ``RNNprop.theta_shapes``).
      grad: [p] float32 gradient of the whole model, flattened.
      state: the previous ``RNNpropState``.
      lr: step size α (0.1 in the original code).

    Returns:
      ``(delta, new_state)`` with ``w_t = w_{t-1} + delta`` and ``delta = −α·tanh(out)``.
    """
    features, m, v, step = adam_features(grad, state)
    e = F.elu(features @ theta["pre_kernel"] + theta["pre_bias"])
    h1, c1 = lstm_cell(e, state.h1, state.c1, theta["lstm1_kernel"], theta["lstm1_bias"])
    h2, c2 = lstm_cell(h1, state.h2, state.c2, theta["lstm2_kernel"], theta["lstm2_bias"])
    out = (h2 @ theta["out_kernel"] + theta["out_bias"]).squeeze(1)
    return -lr * torch.tanh(out), RNNpropState(m, v, step, h1, c1, h2, c2)


class RNNprop(LearnedUpdateRule):
    """RNNprop: ``[g/σ, m̂/σ]`` → FC 2→H + ELU → 2-layer LSTM(H) → FC H→1 → ``−α·tanh``.

    Args:
      hidden_size (int, optional): width of the input FC and of each LSTM layer
        (default: 20, giving 6,641 parameters).

    Raises:
      ValueError: if ``hidden_size < 1``.
    """

    name = "rnnprop"
    default_lr = DEFAULT_LR

    def __init__(self, hidden_size: int = HIDDEN_SIZE) -> None:
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        self.hidden_size = hidden_size

    def theta_shapes(self) -> dict[str, tuple[int, ...]]:
        # Same shapes as the TF variables (fc/w|b, cellA/…/cell_k/…/kernel|bias, fc_A/w|b).
        h = self.hidden_size
        return {
            "pre_kernel": (2, h),  # rows [g/σ, m̂/σ]
            "pre_bias": (h,),
            "lstm1_kernel": (2 * h, 4 * h),  # [e, h1] → gate columns [i, j, f, o]
            "lstm1_bias": (4 * h,),
            "lstm2_kernel": (2 * h, 4 * h),  # [h1, h2] → gates
            "lstm2_bias": (4 * h,),
            "out_kernel": (h, 1),
            "out_bias": (1,),
        }

    def init_theta(self, generator: torch.Generator) -> Theta:
        """Trunc-normal σ = 0.1 FC kernels, Glorot-uniform LSTM kernels, zero biases."""
        return init_lstm_fc_theta(self.theta_shapes(), ("pre_kernel", "out_kernel"), generator)

    def init_state(self, num_coords: int, *, device: torch.device | str = "cpu") -> RNNpropState:
        zeros = torch.zeros(num_coords, device=device)
        lstm = torch.zeros(num_coords, self.hidden_size, device=device)
        return RNNpropState(
            m=zeros.clone(),
            v=zeros.clone(),
            step=torch.zeros(1, device=device),
            h1=lstm.clone(),
            c1=lstm.clone(),
            h2=lstm.clone(),
            c2=lstm.clone(),
        )

    def step(
        self, theta: Theta, grad: Tensor, state: RNNpropState, *, lr: float
    ) -> tuple[Tensor, RNNpropState]:
        return rnnprop_step(theta, grad, state, lr=lr)
