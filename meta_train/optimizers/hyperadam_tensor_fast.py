"""The tensor-wise HyperAdam step as one autograd node with a hand-written backward (issue 15).

``tensorwise_step_fast`` has the signature and the results (to round-off) of
``hyperadam_tensor.tensorwise_step`` and is differentiable once with respect to θ and the
incoming state (not the gradient, as in the paper variant's ``hyperadam_step_fast``). Here the
[p, J] chain from the features to the direction is one ``torch.autograd.Function``:

* the forward runs the reference's maths with fewer, wider ops (one sigmoid over all four LSTM
  gates, one over both decay rates, ``addmm`` for every FC layer, tanh through expm1) and
  records nothing;
* the backward is the chain rule written out once (ELU → LSTM → decay gates → the moment and bias
  recursions → M̂ = M̃ (Ṽ + ε)^-½ → the bounded or ELU weights), with the four FC layers'
  input- and weight-gradients as single matmuls; it reuses what the forward kept.

Measured (docs/benchmarks.md, ``benchmarks/bench_tensorwise_step.py``): ×1.1–1.2 per
meta-training truncation on the small family, ×1.35–1.50 for a no-grad step at p = 10⁵. The
reference's time is in the matmuls and in passes over [p, J] tensors, not in autograd's
bookkeeping, and this backward makes about as many passes as autograd's; below the ×1.3 the
issue asked for, so meta-training does not select it (``RunConfig.implementation`` applies to
the paper variant only). It is kept as the gradchecked derivation for a fused kernel.

Only what depends on θ or on the differentiable state goes through the node. The input features
(functions of the gradients alone) are the reference's ``input_features``, and the adaptive
variant's per-tensor step scale (a few [p]-sized ops and segment sums) stays in autograd: the node
returns the previous step's direction Σ_j ρ_j(h_{t−1}) M̂_{t−1,j} as an extra output and the
reference's ``tensor_cosine`` takes it from there. All of it is torch ops, so it runs on any
device and dtype (float64 for ``gradcheck``), and it is deterministic as the reference is.

Derivatives used below, with ε = ``MOMENT_EPS`` (D = M̂, A = M̃ = m/(b+ε), Ṽ = v/(Γ+ε),
r = (Ṽ+ε)^-½): ∂D/∂m = r/(b+ε), ∂D/∂b = −A r/(b+ε), ∂D/∂v = −½ A r³/(Γ+ε), ∂D/∂Γ = ½ A r³ Ṽ/(Γ+ε).
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Theta
from .hyperadam import FORGET_BIAS, MOMENT_EPS
from .hyperadam_fast import THETA_ORDER as PAPER_THETA_ORDER
from .hyperadam_tensor import (
    FEATURE_CLIP,
    RHO_MAX,
    SCALE_MAX,
    SCALE_REFERENCES,
    TREND_FEATURE,
    TensorwiseState,
    input_features,
    scale_rate,
    tensor_cosine,
)

# The same cells as the paper's kernel, in the same order (plus κ, and κ₀, in the adaptive
# variants).
THETA_ORDER = PAPER_THETA_ORDER
DIFFERENTIABLE_STATE = ("h", "c", "m", "v", "b", "gamma")  # the node's state inputs and outputs


def _candidates(m: Tensor, v: Tensor, b: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(A, r, A·r): M̃ = m/(b+ε), (Ṽ+ε)^-½ and M̂, in the reference's order of operations."""
    a = m / (b + MOMENT_EPS)
    r = torch.rsqrt(v / (gamma + MOMENT_EPS) + MOMENT_EPS)
    return a, r, a * r


def _tanh(x: Tensor) -> Tensor:
    """tanh(x) = e / (e + 2) with e = expm1(2x): within 2 ulp of the exact value (fp32).

    Why: torch's CPU tanh costs ~3.5 of its exp and ~10 of its sigmoid (float32, AVX-512 build,
    measured on the development machine: 204, 59 and 21 µs over [4810, 20]), and the step takes
    three or four per coordinate. The clamp keeps e finite where tanh already rounds to ±1.
    """
    limit = 9.0 if x.dtype == torch.float32 else 19.0
    e = torch.expm1(x.clamp(-limit, limit).mul_(2.0))
    return e.div_(e + 2.0)


def _weights(logits: Tensor, bounded: bool) -> tuple[Tensor, Tensor]:
    """ρ and what its derivative needs: tanh(logits) (bounded) or ρ itself (ELU)."""
    if bounded:
        squashed = _tanh(logits)
        return squashed * (RHO_MAX / logits.shape[1]), squashed
    rho = F.elu(logits)
    return rho, rho


def _weights_backward(d_rho: Tensor, logits: Tensor, kept: Tensor, bounded: bool) -> Tensor:
    """∂L/∂logits from ∂L/∂ρ: (RHO_MAX/J)(1 − tanh²) bounded, ELU' = 1 or ρ + 1 otherwise."""
    if bounded:
        return (1.0 - kept.square()).mul_(d_rho).mul_(RHO_MAX / logits.shape[1])
    return torch.where(logits > 0, d_rho, d_rho * (kept + 1.0))


def _candidates_backward(
    d_out: Tensor, m: Tensor, v: Tensor, b: Tensor, gamma: Tensor, a: Tensor, r: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """∂L/∂(m, v, b, Γ) from ∂L/∂M̂ (the derivatives in the module docstring)."""
    d_m = d_out * r / (b + MOMENT_EPS)
    d_b = -d_m * a
    d_v = d_out * a * r.pow(3) * -0.5 / (gamma + MOMENT_EPS)
    d_gamma = -d_v * (v / (gamma + MOMENT_EPS))
    return d_m, d_v, d_b, d_gamma


def _accumulate(total: Tensor, extra: Tensor | None) -> Tensor:
    return total if extra is None else total.add_(extra)


def _cells_forward(
    bounded: bool, adaptive: bool, features: Tensor, grad: Tensor, *tensors: Tensor
) -> tuple[tuple[Tensor, ...], tuple[Tensor | None, ...]]:
    """The node's outputs and what its backward keeps (see ``_TensorwiseCells``)."""
    h0, c0, m0, v0, b0, gamma0 = tensors[:6]
    pre_k, pre_b, lstm_k, lstm_b, decay_k, decay_b, weight_k, weight_b = tensors[6:]
    j = h0.shape[1]
    # StateCell: FC + ELU, then the LSTM with one sigmoid over all four gates (the cell
    # input's column is overwritten by its tanh).
    pre = torch.addmm(pre_b, features, pre_k)
    lstm_in = torch.cat([F.elu(pre), h0], dim=1)
    gates = torch.addmm(lstm_b, lstm_in, lstm_k)
    act = gates.clone()
    act[:, 2 * j : 3 * j] += FORGET_BIAS
    act.sigmoid_()
    act[:, j : 2 * j] = _tanh(gates[:, j : 2 * j])
    s_in, t_u, s_f, s_o = act.chunk(4, dim=1)
    c = torch.addcmul(s_f * c0, s_in, t_u)
    tanh_c = _tanh(c)
    h = s_o * tanh_c
    # AdamCell: decay rates from [h, clip(M̂_{t−1})], then the reference's recursions.
    a0, r0, previous = _candidates(m0, v0, b0, gamma0)
    decay_in = torch.cat([h, previous.clamp(-FEATURE_CLIP, FEATURE_CLIP)], dim=1)
    decays = torch.addmm(decay_b, decay_in, decay_k).sigmoid_()
    beta, gamma = decays.chunk(2, dim=1)
    one_minus = 1.0 - decays
    one_minus_beta, one_minus_gamma = one_minus.chunk(2, dim=1)
    g = grad.unsqueeze(1)
    m = torch.addcmul(beta * m0, one_minus_beta, g)
    v = torch.addcmul(gamma * v0, one_minus_gamma, g.square())
    b = torch.addcmul(one_minus_beta, beta, b0)
    gam = torch.addcmul(one_minus_gamma, gamma, gamma0)
    a, r, directions = _candidates(m, v, b, gam)
    # WeightCell and the combination.
    logits = torch.addmm(weight_b, h, weight_k)
    rho, rho_kept = _weights(logits, bounded)
    direction = (rho * directions).sum(dim=1)
    outputs = [direction, h, c, m, v, b, gam]
    last_logits = last_rho = last_kept = None
    if adaptive:
        last_logits = torch.addmm(weight_b, h0, weight_k)
        last_rho, last_kept = _weights(last_logits, bounded)
        outputs.append((last_rho * previous).sum(dim=1))
    saved = (
            features, grad, pre, lstm_in, act, c0, tanh_c, decay_in, decays,
            m0, v0, b0, gamma0, a0, r0, previous, m, v, b, gam, a, r, directions,
            logits, rho, rho_kept, last_logits, last_rho, last_kept,
        lstm_k, decay_k, weight_k,
    )  # fmt: skip
    return tuple(outputs), saved


def _cells_backward(
    bounded: bool,
    adaptive: bool,
    needs: tuple[bool, ...],
    saved: tuple[Tensor | None, ...],
    d_direction: Tensor | None,
    *d_outputs: Tensor | None,
) -> tuple[Tensor | None, ...]:
    """∂L/∂(state, θ) of the node from ∂L/∂(its outputs); ``needs`` says which state."""
    (
        features, grad, pre, lstm_in, act, c0, tanh_c, decay_in, decays,
        m0, v0, b0, gamma0, a0, r0, previous, m, v, b, gam, a, r, directions,
        logits, rho, rho_kept, last_logits, last_rho, last_kept,
        lstm_k, decay_k, weight_k,
    ) = cast(tuple[Tensor, ...], saved)  # fmt: skip  (the step saves every one of them)
    d_h_out, d_c_out, d_m_out, d_v_out, d_b_out, d_gam_out = d_outputs[:6]
    d_last = d_outputs[6] if adaptive else None
    j = rho.shape[1]
    h = decay_in[:, :j]
    if d_direction is None:
        d_direction = torch.zeros_like(grad)
    d_dir = d_direction.unsqueeze(1)
    # WeightCell: direction = Σ_j ρ_j M̂_j.
    d_logits = _weights_backward(d_dir * directions, logits, rho_kept, bounded)
    d_weight_k = h.t() @ d_logits
    d_weight_b = d_logits.sum(dim=0)
    d_h = _accumulate(d_logits @ weight_k.t(), d_h_out)
    # M̂_t = candidates(m_t, v_t, b_t, Γ_t), then the recursions m_t = β m + (1 − β) g etc.
    d_m, d_v, d_b, d_gam = _candidates_backward(d_dir * rho, m, v, b, gam, a, r)
    d_m, d_v = _accumulate(d_m, d_m_out), _accumulate(d_v, d_v_out)
    d_b, d_gam = _accumulate(d_b, d_b_out), _accumulate(d_gam, d_gam_out)
    beta, gamma = decays.chunk(2, dim=1)
    g = grad.unsqueeze(1)
    d_decays = torch.cat(
        [d_m * (m0 - g) + d_b * (b0 - 1.0), d_v * (v0 - g.square()) + d_gam * (gamma0 - 1.0)],
        dim=1,
    )
    d_decay_logits = d_decays.mul_(decays).mul_(1.0 - decays)
    d_decay_k = decay_in.t() @ d_decay_logits
    d_decay_b = d_decay_logits.sum(dim=0)
    d_decay_in = d_decay_logits @ decay_k.t()
    d_h.add_(d_decay_in[:, :j])
    # LSTM: h = σ(o) tanh(c), c = σ(f + 1) c₀ + σ(i) tanh(u).
    s_in, t_u, s_f, s_o = act.chunk(4, dim=1)
    d_c = d_h * s_o * (1.0 - tanh_c.square())
    d_c = _accumulate(d_c, d_c_out)
    d_act = torch.cat([d_c * t_u, d_c * s_in, d_c * c0, d_h * tanh_c], dim=1)
    slope = act * (1.0 - act)
    slope[:, j : 2 * j] = 1.0 - t_u.square()
    d_gates = d_act.mul_(slope)
    d_lstm_k = lstm_in.t() @ d_gates
    d_lstm_b = d_gates.sum(dim=0)
    d_lstm_in = d_gates @ lstm_k.t()
    # FC + ELU: ELU'(x) = 1 for x > 0, else ELU(x) + 1 = min(ELU(x), 0) + 1.
    d_pre = d_lstm_in[:, :j] * lstm_in[:, :j].clamp(max=0.0).add_(1.0)
    d_pre_k = features.t() @ d_pre
    d_pre_b = d_pre.sum(dim=0)
    # Adaptive: the previous direction Σ_j ρ_j(h₀) M̂_{t−1,j} reaches W_q, b_q through ρ(h₀).
    if d_last is not None:
        d_last_logits = _weights_backward(
            d_last.unsqueeze(1) * previous, last_logits, last_kept, bounded
        )
        d_weight_k.addmm_(lstm_in[:, j:].t(), d_last_logits)
        d_weight_b.add_(d_last_logits.sum(dim=0))
    d_theta = (d_pre_k, d_pre_b, d_lstm_k, d_lstm_b, d_decay_k, d_decay_b, d_weight_k, d_weight_b)
    if not any(needs):  # a truncation's first step: its state is a detached start
        return (None,) * 6 + d_theta
    # M̂_{t−1}: through the clipped decay input (clamp passes the gradient on its closed
    # interval, as torch's does) and, adaptive, through the previous direction.
    inside = (previous >= -FEATURE_CLIP) & (previous <= FEATURE_CLIP)
    d_previous = d_decay_in[:, j:] * inside
    d_h0 = None
    if d_last is not None:
        d_previous.addcmul_(d_last.unsqueeze(1), last_rho)
        d_h0 = d_last_logits @ weight_k.t()
    d_m0, d_v0, d_b0, d_gam0 = _candidates_backward(d_previous, m0, v0, b0, gamma0, a0, r0)
    d_m0.addcmul_(d_m, beta)
    d_b0.addcmul_(d_b, beta)
    d_v0.addcmul_(d_v, gamma)
    d_gam0.addcmul_(d_gam, gamma)
    d_c0 = d_c * s_f
    d_h0 = d_lstm_in[:, j:] if d_h0 is None else d_h0.add_(d_lstm_in[:, j:])
    d_state = [
        x if need else None
        for x, need in zip((d_h0, d_c0, d_m0, d_v0, d_b0, d_gam0), needs, strict=True)
    ]
    return (*d_state, *d_theta)


class _TensorwiseCells(torch.autograd.Function):
    """Inputs: bounded, adaptive, features [p, K], grad [p], the six state tensors (h, c, m, v, b,
    Γ; [p, J]), θ in ``THETA_ORDER``.

    Outputs: the direction Σ_j ρ_j M̂_j ([p]), the six new state tensors and, adaptive, the
    previous step's direction Σ_j ρ_j(h_{t−1}) M̂_{t−1,j} ([p]).
    """

    @staticmethod
    def forward(ctx, bounded: bool, adaptive: bool, features: Tensor, grad: Tensor, *tensors):
        ctx.set_materialize_grads(False)
        outputs, saved = _cells_forward(bounded, adaptive, features, grad, *tensors)
        ctx.bounded, ctx.adaptive = bounded, adaptive
        ctx.save_for_backward(*saved)
        return outputs

    @staticmethod
    def backward(ctx, *d_outputs: Tensor | None):
        needs = tuple(ctx.needs_input_grad[4:10])
        grads = _cells_backward(ctx.bounded, ctx.adaptive, needs, ctx.saved_tensors, *d_outputs)
        return (None, None, None, None, *grads)


def tensorwise_step_fast(
    theta: Theta,
    grad: Tensor,
    state: TensorwiseState,
    *,
    lr: float | Tensor,
    bounded: bool,
    adaptive: bool = False,
    scale_reference: str = "step",
    anneal_rate: bool = False,
) -> tuple[Tensor, TensorwiseState]:
    """One tensor-wise step: ``tensorwise_step``'s results to round-off, one autograd node.

    Args:
      theta: meta-parameters (``TensorwiseHyperAdam.theta_shapes``).
      grad: [p] flat gradient; must not require grad (first-order meta-gradients only).
      state: the previous ``TensorwiseState``.
      lr: step size α.
      bounded: the bounded step (tanh weights) rather than the paper's ELU weights.
      adaptive: the per-tensor adaptive step scale (needs ``theta["scale_rate"]``).
      scale_reference: what its cosine compares the gradient with (``SCALE_REFERENCES``):
        the previous step direction, which the node returns, or the trend momentum feature,
        which does not depend on θ and is read from the state outside the node.
      anneal_rate: the scale moves at the annealed rate κ_t (``hyperadam_tensor.scale_rate``).

    Returns:
      ``(delta, new_state)`` as ``tensorwise_step`` returns them, to round-off.

    Raises:
      ValueError: if ``grad`` requires grad or is not flat.
    """
    if grad.ndim != 1:
        raise ValueError(f"grad must be a flat [p] tensor, got shape {tuple(grad.shape)}")
    if grad.requires_grad:
        raise ValueError(
            "tensorwise_step_fast does not differentiate through the gradient (first-order "
            "meta-gradients only); pass grad.detach() or use the reference implementation"
        )
    features, feat_m, feat_v, t = input_features(grad, state)
    cells = (state.h, state.c, state.m, state.v, state.b, state.gamma)
    if scale_reference not in SCALE_REFERENCES:
        raise ValueError(
            f"scale_reference must be one of {SCALE_REFERENCES}, got {scale_reference!r}"
        )
    with_last_step = adaptive and scale_reference == "step"
    direction, h, c, m, v, b, gam, *last = _TensorwiseCells.apply(
        bounded, with_last_step, features, grad, *cells, *(theta[name] for name in THETA_ORDER)
    )
    delta = -lr * direction
    log_scale = state.log_scale
    if adaptive:
        reference = last[0] if with_last_step else state.feat_m[:, TREND_FEATURE]
        cosine = tensor_cosine(grad, reference, state.segment, state.segment_size.shape[0])
        rate = scale_rate(theta, t, anneal=anneal_rate)
        limit = math.log(SCALE_MAX)
        log_scale = (state.log_scale + rate * cosine).clamp(-limit, limit)
        delta = delta * torch.exp(log_scale)
    new_state = TensorwiseState(
        h, c, m, v, b, gam, feat_m, feat_v, t, state.segment, state.segment_size, log_scale
    )
    return delta, new_state
