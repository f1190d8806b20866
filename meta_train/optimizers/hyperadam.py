"""HyperAdam: StateCell → AdamCell → WeightCell, as a pure differentiable step (spec §2).

Every map is coordinate-wise with weights shared over the p coordinates; the only coupling
between coordinates is through global L2 normalisations (the gradient's norm, and per-column
norms of the LSTM state and of the previous first moments). That is what makes the update
invariant to a rescaling of the loss, and it is why a chunked/sharded step needs reductions
between its stages (design §3.1).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LearnedUpdateRule, Theta

# ε of the moment field (spec §2.2.3). 1e-24 is a normal fp32 number but underflows in
# fp16/bf16, so the whole step is computed in fp32.
MOMENT_EPS = 1e-24
# ε inside sqrt(‖x‖² + ε) of every global/column normalisation (spec §8 #4).
NORM_EPS = 1e-16
# TF's LSTMCell adds +1 to the forget-gate pre-activation (spec §2.1.3).
FORGET_BIAS = 1.0
DEFAULT_LR = 0.005  # α of the paper, used in meta-training and every test task


class HyperAdamState(NamedTuple):
    """Per-coordinate state, all zeros at t = 0; the ONNX/checkpoint state layout."""

    h: Tensor  # [p, J] float32 — StateCell LSTM hidden state (s_t)
    c: Tensor  # [p, J] float32 — StateCell LSTM cell state
    m: Tensor  # [p, J] float32 — first moments M of the J Adams
    v: Tensor  # [p, J] float32 — second moments V
    b: Tensor  # [p, J] float32 — learned bias-correction accumulator B (1 − β^t for constant β)
    gamma: Tensor  # [p, J] float32 — learned bias-correction accumulator Γ


def inverse_norm(sum_of_squares: Tensor) -> Tensor:
    """1 / sqrt(Σx² + 1e-16): the guarded inverse L2 norm of every normalisation (spec §8 #4)."""
    return torch.rsqrt(sum_of_squares + NORM_EPS)


def column_sum_of_squares(x: Tensor) -> Tensor:
    """Σ_rows x² per column ([J]); chunks and shards add these partial sums (design §3.1)."""
    return x.square().sum(dim=0)


def state_cell(
    theta: Theta, grad: Tensor, h: Tensor, c: Tensor, grad_sum_sq: Tensor
) -> tuple[Tensor, Tensor]:
    """StateCell F_h (spec §2.1): normalised gradient → FC+ELU → LSTM. Returns (h', c').

    ``grad_sum_sq`` is Σ g² over ALL coordinates of the model (not just this chunk).
    """
    g_hat = grad * inverse_norm(grad_sum_sq)
    e = F.elu(g_hat.unsqueeze(1) * theta["pre_kernel"] + theta["pre_bias"])
    gates = torch.cat([e, h], dim=1) @ theta["lstm_kernel"] + theta["lstm_bias"]
    i, u, f, o = gates.chunk(4, dim=1)  # TF gate order [i, j, f, o]
    c_new = torch.sigmoid(f + FORGET_BIAS) * c + torch.sigmoid(i) * torch.tanh(u)
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    return h_new, c_new


def decay_rates(
    theta: Theta, s: Tensor, m_prev: Tensor, s_col_sum_sq: Tensor, m_col_sum_sq: Tensor
) -> tuple[Tensor, Tensor]:
    """The AdamCell's decay rates (β_t, γ_t), each [p, J]: a sigmoid of one linear map of the
    column-normalised state and previous first moments (spec §2.2 step 1)."""
    z = torch.cat([s * inverse_norm(s_col_sum_sq), m_prev * inverse_norm(m_col_sum_sq)], dim=1)
    beta, gamma = torch.sigmoid(z @ theta["decay_kernel"] + theta["decay_bias"]).chunk(2, dim=1)
    return beta, gamma


def adam_cell(
    theta: Theta,
    grad: Tensor,
    s: Tensor,
    state: HyperAdamState,
    s_col_sum_sq: Tensor,
    m_col_sum_sq: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """AdamCell (spec §2.2): learned decay rates, moment/bias recursions, candidate updates.

    The decay rates are a sigmoid of one linear map of the column-normalised state s_t and the
    column-normalised PREVIOUS first moments; the column sums of squares are over ALL
    coordinates. The moments are driven by the raw gradient.

    Returns:
      (M_t, V_t, B_t, Γ_t, M̂_t), each [p, J].
    """
    beta, gamma = decay_rates(theta, s, state.m, s_col_sum_sq, m_col_sum_sq)
    g = grad.unsqueeze(1)
    m = beta * state.m + (1.0 - beta) * g
    v = gamma * state.v + (1.0 - gamma) * g.square()
    b = beta * state.b + (1.0 - beta)
    gam = gamma * state.gamma + (1.0 - gamma)
    m_tilde = m / (b + MOMENT_EPS)
    v_tilde = v / (gam + MOMENT_EPS)
    m_hat = m_tilde * torch.rsqrt(v_tilde + MOMENT_EPS)
    return m, v, b, gam, m_hat


def weight_cell(theta: Theta, s: Tensor) -> Tensor:
    """WeightCell F_q (spec §2.3): ρ_t = ELU(s_t W_q + b_q), unnormalised, may be negative."""
    return F.elu(s @ theta["weight_kernel"] + theta["weight_bias"])


def update_stage(
    theta: Theta,
    grad: Tensor,
    state: HyperAdamState,
    h: Tensor,
    c: Tensor,
    h_col_sum_sq: Tensor,
    m_col_sum_sq: Tensor,
    lr: float | Tensor,
) -> tuple[Tensor, HyperAdamState]:
    """AdamCell + WeightCell + combination for one chunk, given the global column sums."""
    m, v, b, gam, m_hat = adam_cell(theta, grad, h, state, h_col_sum_sq, m_col_sum_sq)
    rho = weight_cell(theta, h)
    direction = (rho * m_hat).sum(dim=1)
    return -lr * direction, HyperAdamState(h, c, m, v, b, gam)


def hyperadam_step(
    theta: Theta, grad: Tensor, state: HyperAdamState, *, lr: float | Tensor = DEFAULT_LR
) -> tuple[Tensor, HyperAdamState]:
    """One HyperAdam step over a flat gradient (spec §2, Alg. 2).

    Args:
      theta: meta-parameters (see ``HyperAdam.theta_shapes``).
      grad: [p] float32 gradient of the whole model, flattened.
      state: the previous ``HyperAdamState``.
      lr: step size α (0.005 in the paper).

    Returns:
      ``(delta, new_state)`` with ``w_t = w_{t-1} + delta`` and ``delta = −α Σ_j ρ_j M̂_j``.
    """
    h, c = state_cell(theta, grad, state.h, state.c, grad.square().sum())
    return update_stage(
        theta, grad, state, h, c, column_sum_of_squares(h), column_sum_of_squares(state.m), lr
    )


def spec_init(shapes: dict[str, tuple[int, ...]], generator: torch.Generator) -> Theta:
    """Spec §2.4: trunc-normal σ=0.1 for the FC layers, Glorot-uniform kernels, zero biases."""
    theta = {name: torch.zeros(shape) for name, shape in shapes.items()}
    for name in ("pre_kernel", "weight_kernel"):
        # TF's truncated_normal re-draws beyond two standard deviations.
        torch.nn.init.trunc_normal_(theta[name], std=0.1, a=-0.2, b=0.2, generator=generator)
    for name in ("lstm_kernel", "decay_kernel"):
        torch.nn.init.xavier_uniform_(theta[name], generator=generator)
    return theta


IMPLEMENTATIONS = ("reference", "fast")


class HyperAdam(LearnedUpdateRule):
    """HyperAdam with J candidate Adams (J = 20 in the paper; LSTM hidden size = J).

    ``implementation`` picks the step: "reference" (this module's torch code, any device) or
    "fast" (``hyperadam_fast``: fused CPU kernels compiled on first use; the same math to
    round-off, ~3.4x faster to meta-train; CUDA tensors still take the reference).
    """

    name = "hyperadam"
    default_lr = DEFAULT_LR

    def __init__(self, num_candidates: int = 20, *, implementation: str = "reference") -> None:
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"unknown implementation {implementation!r}; known: {', '.join(IMPLEMENTATIONS)}"
            )
        self.num_candidates = num_candidates
        self.implementation = implementation

    def theta_shapes(self) -> dict[str, tuple[int, ...]]:
        j = self.num_candidates
        return {
            "pre_kernel": (j,),  # a ∈ R^{1×J}
            "pre_bias": (j,),  # b ∈ R^J
            "lstm_kernel": (2 * j, 4 * j),  # W_h, gate columns [i, u, f, o]
            "lstm_bias": (4 * j,),  # b_h
            "decay_kernel": (2 * j, 2 * j),  # W_a, output columns [β | γ]
            "decay_bias": (2 * j,),  # b_a
            "weight_kernel": (j, j),  # W_q
            "weight_bias": (j,),  # b_q
        }

    def init_theta(self, generator: torch.Generator) -> Theta:
        return spec_init(self.theta_shapes(), generator)

    def adam_reduction(
        self, theta: Theta, *, lr: float, beta1: float = 0.9, beta2: float = 0.999
    ) -> Theta:
        """θ on which HyperAdam at α = ``DEFAULT_LR`` is Adam(lr, β1, β2) (the paper's Lemma 1).

        The decay rates become constants (zero kernel, logit biases), so B_t = 1 − β1^t and
        Γ_t = 1 − β2^t are Adam's bias corrections, and every candidate gets the constant weight
        ρ = lr / (α J) (ELU is the identity on positive inputs): −α Σ_j ρ M̂_j = −lr M̂. The
        StateCell keeps ``theta``'s values, so the state s_t still carries information for
        meta-training to use. Adam's ε differs: 1e-24 inside the square root here.
        """
        if not lr > 0 or not (0 < beta1 < 1 and 0 < beta2 < 1):
            raise ValueError(f"Adam needs lr > 0 and betas in (0, 1), got {lr}, {beta1}, {beta2}")
        j = self.num_candidates

        def logit(p: float) -> float:
            return float(torch.logit(torch.tensor(p, dtype=torch.float64)))

        out = dict(theta)
        out["decay_kernel"] = torch.zeros(2 * j, 2 * j)
        out["decay_bias"] = torch.cat(
            [torch.full((j,), logit(beta1)), torch.full((j,), logit(beta2))]
        )
        out["weight_kernel"] = torch.zeros(j, j)
        out["weight_bias"] = torch.full((j,), lr / (DEFAULT_LR * j))
        return out

    def init_state(self, num_coords: int, *, device: torch.device | str = "cpu") -> HyperAdamState:
        zeros = torch.zeros(num_coords, self.num_candidates, device=device)
        return HyperAdamState(*(zeros.clone() for _ in HyperAdamState._fields))

    def step(
        self, theta: Theta, grad: Tensor, state: HyperAdamState, *, lr: float
    ) -> tuple[Tensor, HyperAdamState]:
        if self.implementation == "fast" and grad.device.type == "cpu":
            from .hyperadam_fast import hyperadam_step_fast  # compiles its kernels on first use

            return hyperadam_step_fast(theta, grad, state, lr=lr)
        return hyperadam_step(theta, grad, state, lr=lr)
