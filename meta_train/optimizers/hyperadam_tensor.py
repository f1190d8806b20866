"""HyperAdam, tensor-wise: a variant whose cells see the gradient, with a bounded step (issue 15).

The paper's cells see ĝ = g/‖g‖₂ over the whole model, which is ~1/√p per coordinate, and
column norms over all p coordinates in the decay gates: at p ≈ 10⁴–10⁶ every input is ~0 and
the cells act as one fixed per-step schedule (docs/results.md, the adaptivity trace). This
variant keeps the architecture (StateCell LSTM → AdamCell with J learned-decay Adams →
WeightCell) and changes what the cells see and how large a step can be:

* **Inputs per coordinate** (``NUM_FEATURES`` of them, each O(1) whatever p is):
  g / rms_T(g), the gradient over the RMS of *its own tensor* T (the array a user binds);
  Adam-normalised momenta m̂_k / √v̂ at three fixed timescales (β = 0.5, 0.9, 0.99; v̂ with
  β₂ = 0.999), bias-corrected; and the training progress tanh(t / τ) for τ = 10, 100, 1000.
  Features are clipped to ±``FEATURE_CLIP``. A FC K → J with ELU feeds the LSTM as in the paper.
* **Decay gates** see [s_t, M̂_{t−1}] — the LSTM state (bounded by tanh) and the previous
  candidate directions (Adam-normalised per coordinate, clipped) — instead of the paper's
  column norms over all p coordinates.
* **Bounded step**: ρ = (``RHO_MAX`` / J)·tanh(s W_q + b_q), so |Σ_j ρ_j M̂_j| ≤ RHO_MAX·max_j
  |M̂_j|: the update is at most RHO_MAX times an Adam step of size α per coordinate, whatever θ
  learns. (``bounded=False`` keeps the paper's unnormalised ELU weights, for the ablation.)

* **Adaptive step scale** (``adaptive_scale=True``, method ``hyperadam-tensor-adaptive``): each
  tensor T carries a log step scale ℓ_T that follows the hypergradient of the loss with respect
  to the step size: ℓ_T ← clip(ℓ_T + κ·cos_T(g_t, D_{t−1}), ±log ``SCALE_MAX``), where D_{t−1}
  = Σ_j ρ_j M̂_j is the previous step's direction and κ = ``KAPPA_MAX``·σ(θ_scale_rate) is
  learned. While successive gradients keep pointing along the last step, the step grows; when
  the step overshoots (the gradient turns against it), it shrinks. The cosine is invariant to
  the tensor's scale, and the step stays bounded: at most RHO_MAX·SCALE_MAX Adam steps of α.
  This is what lets one default α serve tasks whose tuned Adam lr spans 1e-3…1e-1
  (docs/generalisation.md).
* **Trend-following step scale** (``scale_reference="trend"``, method ``hyperadam-tensor-trend``):
  the same rule with the cosine taken against the gradient's long-run trend instead of the last
  step, ℓ_T ← clip(ℓ_T + κ·cos_T(g_t, m^{0.99}_{t−1}), ±log ``SCALE_MAX``), where m^{0.99} is the
  β = 0.99 momentum feature the state already carries. cos(g_t, D_{t−1}) is the hypergradient of
  a one-step lookahead, which is greedy: on an ill-conditioned problem the fast, oscillating
  directions make it negative and the step shrinks towards the largest *stable* step rather
  than the best one (logistic regression at cond 1e5: exp(ℓ) climbs to ~70 then decays to 1.3
  over 10 000 steps while tuned Adam wants 33× α). Against a ~100-step average of the gradient,
  oscillating components cancel and only directions the run has kept moving along count, so
  the step grows while the gradient still agrees with where the run has been heading. The
  cosine reads the incoming state only and does not depend on θ.
* **Annealed rate** (``anneal_rate=True``, method ``hyperadam-tensor-trend-annealed``): the trend
  rule with a rate that starts fast and settles, κ_t = κ + (κ₀ − κ)·exp(−t/τ) with
  κ₀ = ``KAPPA_MAX``·σ(θ_scale_rate_early) and τ = ``SCALE_RATE_ANNEAL_STEPS`` = 100, the
  trend's own timescale 1/(1 − 0.99). One constant κ cannot serve both ends of a run: on the
  paper's 100-step MNIST MLP κ = 0.19 beats κ = 0.02 by 2.2× (the scale must travel ~10× within
  a hundred steps), while at 2 000 steps κ = 0.19 is 1.35× worse (a fast rate with a 100-step
  lag overshoots; docs/generalisation.md, session 14). The fast rate lasts about as long as
  the trend it follows takes to fill; afterwards the rule is the trend rule at κ.

The state adds the fixed-timescale accumulators, the step count and each coordinate's tensor
index; with no tensor layout given the whole vector is one tensor. ``adam_reduction`` gives θ
on which the step is exactly Adam(lr, β₁, β₂) (with ε inside the root, as the paper's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LearnedUpdateRule, Theta
from .hyperadam import FORGET_BIAS, IMPLEMENTATIONS, MOMENT_EPS, spec_init

FEATURE_BETAS = (0.5, 0.9, 0.99)  # timescales of the momentum features
FEATURE_BETA2 = 0.999
PROGRESS_SCALES = (10.0, 100.0, 1000.0)
NUM_FEATURES = 1 + len(FEATURE_BETAS) + len(PROGRESS_SCALES)
FEATURE_CLIP = 10.0
RHO_MAX = 10.0  # the step is at most this many Adam steps of size α, per coordinate
# α: the Adam-reduction start is Adam at 3e-3 (a good Adam lr for CNNs and transformers), and
# the bounded step reaches at most Adam at 3e-2 (what small MLPs and convex problems want).
TENSORWISE_DEFAULT_LR = 0.003
RMS_EPS = 1e-30  # inside rms_T: a zero tensor gives a zero feature, not NaN
SCALE_MAX = 100.0  # the adaptive step scale stays within [1/SCALE_MAX, SCALE_MAX]
KAPPA_MAX = 0.2  # the most the log step scale moves in one step
# The annealed rate's timescale, the trend's 1/(1 − β) for β = 0.99: κ_t relaxes from κ₀ to κ.
SCALE_RATE_ANNEAL_STEPS = 100.0
# What the adaptive step scale's cosine compares the gradient with: the previous step direction
# ("step", ``hyperadam-tensor-adaptive``) or the β = 0.99 momentum feature ("trend",
# ``hyperadam-tensor-trend``).
SCALE_REFERENCES = ("step", "trend")
TREND_FEATURE = FEATURE_BETAS.index(0.99)  # the column of feat_m the trend rule reads
# The adaptive variant's meta-training start: Adam at α plus a hypergradient rate κ = 0.02 (the
# rate chosen by a sweep over 0.01/0.02/0.05 on the held-out fast subset, untrained; all three
# within a few per cent of one another there).
ADAPTIVE_START_RATE = 0.02
# The annealed variant's start (``hyperadam-tensor-trend-annealed``): κ₀ = 0.19 (κ = 0.02 as the
# others), chosen on the paper's own meta-training task (the 1-hidden-layer sigmoid MNIST MLP at
# 100 and 2 000 steps); docs/generalisation.md, session 14.
ANNEALED_START_EARLY_RATE = 0.19


class TensorwiseState(NamedTuple):
    """Per-coordinate state; ``segment`` and ``t`` say where the coordinate is and when."""

    h: Tensor  # [p, J] StateCell LSTM hidden state
    c: Tensor  # [p, J] StateCell LSTM cell state
    m: Tensor  # [p, J] first moments of the J Adams
    v: Tensor  # [p, J] second moments
    b: Tensor  # [p, J] learned bias-correction accumulator B
    gamma: Tensor  # [p, J] learned bias-correction accumulator Γ
    feat_m: Tensor  # [p, 3] momenta at FEATURE_BETAS
    feat_v: Tensor  # [p, 1] second moment at FEATURE_BETA2
    t: Tensor  # [1] float32 steps taken
    segment: Tensor  # [p] int64 index of the coordinate's tensor
    segment_size: Tensor  # [num_tensors] float32 coordinates per tensor
    # [p] the log step scale ℓ_T of the coordinate's tensor; [0] (empty) without one. Always a
    # tensor, so code that maps over states (detach, messages, checkpoints) needs no exception.
    log_scale: Tensor


def segments_for(num_coords: int, tensor_sizes: Sequence[int] | None) -> tuple[Tensor, Tensor]:
    """The per-coordinate tensor index and the tensor sizes of a flat layout."""
    sizes = list(tensor_sizes) if tensor_sizes else [num_coords]
    if any(s < 1 for s in sizes) or sum(sizes) != num_coords:
        raise ValueError(f"tensor sizes {sizes} do not add up to {num_coords} coordinates")
    segment = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return segment, torch.tensor(sizes, dtype=torch.float32)


def segment_sum(x: Tensor, segment: Tensor, num_segments: int) -> Tensor:
    """Σ of x over each tensor ([num_segments])."""
    sums = torch.zeros(num_segments, dtype=x.dtype, device=x.device)
    return sums.index_add(0, segment, x)


def tensor_cosine(x: Tensor, y: Tensor, segment: Tensor, num_segments: int) -> Tensor:
    """cos(x_T, y_T) of every coordinate's tensor T, broadcast back to the coordinates ([p]).

    0 where either is zero over the tensor (the first step, a frozen tensor).
    """
    dot = segment_sum(x * y, segment, num_segments)
    norm_x = _sqrt_with_zero_gradient_at_zero(segment_sum(x.square(), segment, num_segments))
    norm_y = _sqrt_with_zero_gradient_at_zero(segment_sum(y.square(), segment, num_segments))
    return (dot / (norm_x * norm_y + RMS_EPS)).index_select(0, segment)


def _sqrt_with_zero_gradient_at_zero(x: Tensor) -> Tensor:
    """√x, whose derivative at x = 0 is 0 instead of ∞ (the value is unchanged).

    At a trajectory's first step the previous direction is 0, and so is a tensor's gradient
    that never moves: a plain √ there made every meta-gradient through the step NaN, and
    meta_update threw those truncations away.
    """
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), 0.0)


def tensor_rms(x: Tensor, segment: Tensor, segment_size: Tensor) -> Tensor:
    """RMS of x over each coordinate's tensor, broadcast back to the coordinates ([p])."""
    sums = torch.zeros(segment_size.shape, dtype=x.dtype, device=x.device)
    sums = sums.index_add(0, segment, x.square())
    return torch.sqrt(sums / segment_size + RMS_EPS).index_select(0, segment)


def input_features(grad: Tensor, state: TensorwiseState) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The K features of every coordinate ([p, K]) and the updated feature accumulators."""
    t = state.t + 1.0
    betas = torch.tensor(FEATURE_BETAS, dtype=grad.dtype, device=grad.device)
    g = grad.unsqueeze(1)
    feat_m = betas * state.feat_m + (1.0 - betas) * g
    feat_v = FEATURE_BETA2 * state.feat_v + (1.0 - FEATURE_BETA2) * g.square()
    m_hat = feat_m / (1.0 - betas**t)
    v_hat = feat_v / (1.0 - FEATURE_BETA2**t)
    momenta = m_hat * torch.rsqrt(v_hat + MOMENT_EPS)
    scaled = (grad / tensor_rms(grad, state.segment, state.segment_size)).unsqueeze(1)
    scales = torch.tensor(PROGRESS_SCALES, dtype=grad.dtype, device=grad.device)
    progress = torch.tanh(t / scales).expand(grad.shape[0], -1)
    features = torch.cat([scaled, momenta, progress], dim=1).clamp(-FEATURE_CLIP, FEATURE_CLIP)
    return features, feat_m, feat_v, t


def candidate_directions(m: Tensor, v: Tensor, b: Tensor, gamma: Tensor) -> Tensor:
    """M̂ = M̃ / √(Ṽ + ε) of the J Adams (the paper's moment field, spec §2.2.3)."""
    return (m / (b + MOMENT_EPS)) * torch.rsqrt(v / (gamma + MOMENT_EPS) + MOMENT_EPS)


def step_weights(theta: Theta, h: Tensor, *, bounded: bool) -> Tensor:
    """ρ [p, J], the WeightCell's combination weights from the LSTM state h."""
    logits = h @ theta["weight_kernel"] + theta["weight_bias"]
    return torch.tanh(logits) * (RHO_MAX / logits.shape[1]) if bounded else F.elu(logits)


def scale_reference_direction(
    theta: Theta, state: TensorwiseState, previous: Tensor, *, bounded: bool, reference: str
) -> Tensor:
    """The direction [p] the adaptive step scale's cosine compares the gradient with.

    "step": the previous step direction D_{t−1} = Σ_j ρ_j(h_{t−1}) M̂_{t−1, j} (``previous`` is
    M̂_{t−1}); "trend": the β = 0.99 momentum of the gradients up to t − 1.
    """
    if reference not in SCALE_REFERENCES:
        raise ValueError(f"scale_reference must be one of {SCALE_REFERENCES}, got {reference!r}")
    if reference == "trend":
        return state.feat_m[:, TREND_FEATURE]
    return (step_weights(theta, state.h, bounded=bounded) * previous).sum(dim=1)


def adapted_log_scale(
    theta: Theta,
    grad: Tensor,
    state: TensorwiseState,
    previous: Tensor,
    *,
    bounded: bool,
    reference: str = "step",
    anneal: bool = False,
) -> Tensor:
    """ℓ_T after this step's hypergradient move (see the module docstring), per coordinate;
    ``anneal``: at the annealed rate κ_t (``scale_rate``)."""
    direction = scale_reference_direction(
        theta, state, previous, bounded=bounded, reference=reference
    )
    cosine = tensor_cosine(grad, direction, state.segment, state.segment_size.shape[0])
    rate = scale_rate(theta, state.t + 1.0, anneal=anneal)
    limit = math.log(SCALE_MAX)
    return (state.log_scale + rate * cosine).clamp(-limit, limit)


def scale_rate(theta: Theta, t: Tensor, *, anneal: bool) -> Tensor:
    """κ, or with ``anneal`` κ_t = κ + (κ₀ − κ)·exp(−t / SCALE_RATE_ANNEAL_STEPS) at step t ≥ 1
    (``[1]``; see the module docstring)."""
    rate = KAPPA_MAX * torch.sigmoid(theta["scale_rate"])
    if not anneal:
        return rate
    early = KAPPA_MAX * torch.sigmoid(theta["scale_rate_early"])
    return rate + (early - rate) * torch.exp(-t / SCALE_RATE_ANNEAL_STEPS)


def tensorwise_step(
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
    """One step of the tensor-wise variant over a flat gradient; returns ``(delta, state)``.

    ``adaptive``: with the per-tensor step scale, whose cosine takes ``scale_reference``
    (``SCALE_REFERENCES``), at the annealed rate with ``anneal_rate``.
    """
    features, feat_m, feat_v, t = input_features(grad, state)
    e = F.elu(features @ theta["pre_kernel"] + theta["pre_bias"])
    gates = torch.cat([e, state.h], dim=1) @ theta["lstm_kernel"] + theta["lstm_bias"]
    i, u, f, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f + FORGET_BIAS) * state.c + torch.sigmoid(i) * torch.tanh(u)
    h = torch.sigmoid(o) * torch.tanh(c)
    # M̂_{t−1} is recomputed from the state rather than carried in it: a few [p, J] passes per
    # step instead of 80 more bytes of state per coordinate.
    previous = candidate_directions(state.m, state.v, state.b, state.gamma)
    z = torch.cat([h, previous.clamp(-FEATURE_CLIP, FEATURE_CLIP)], dim=1)
    beta, gamma = torch.sigmoid(z @ theta["decay_kernel"] + theta["decay_bias"]).chunk(2, dim=1)
    g = grad.unsqueeze(1)
    m = beta * state.m + (1.0 - beta) * g
    v = gamma * state.v + (1.0 - gamma) * g.square()
    b = beta * state.b + (1.0 - beta)
    gam = gamma * state.gamma + (1.0 - gamma)
    directions = candidate_directions(m, v, b, gam)
    rho = step_weights(theta, h, bounded=bounded)
    delta = -lr * (rho * directions).sum(dim=1)
    log_scale = state.log_scale
    if adaptive:
        log_scale = adapted_log_scale(
            theta,
            grad,
            state,
            previous,
            bounded=bounded,
            reference=scale_reference,
            anneal=anneal_rate,
        )
        delta = delta * torch.exp(log_scale)
    new_state = TensorwiseState(
        h, c, m, v, b, gam, feat_m, feat_v, t, state.segment, state.segment_size, log_scale
    )
    return delta, new_state


class TensorwiseHyperAdam(LearnedUpdateRule):
    """The tensor-wise HyperAdam variant (see the module docstring); J candidates.

    ``implementation`` picks the step, as ``HyperAdam``'s does: "reference" (``tensorwise_step``)
    or "fast" (``hyperadam_tensor_fast``: the same maths to round-off as one autograd node with a
    hand-written backward; any device; ×1.1–1.2 per meta-training truncation, ×1.35–1.50 for a
    no-grad step at p = 10⁵, docs/benchmarks.md). Opt-in: nothing selects it.
    """

    default_lr = TENSORWISE_DEFAULT_LR
    per_tensor = True  # init_state takes the tensor layout

    def __init__(
        self,
        num_candidates: int = 20,
        *,
        bounded: bool = True,
        adaptive_scale: bool = False,
        scale_reference: str = "step",
        anneal_rate: bool = False,
        implementation: str = "reference",
    ) -> None:
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        if adaptive_scale and not bounded:
            raise ValueError("the adaptive step scale is built on the bounded step")
        if scale_reference not in SCALE_REFERENCES:
            raise ValueError(
                f"scale_reference must be one of {SCALE_REFERENCES}, got {scale_reference!r}"
            )
        if scale_reference != "step" and not adaptive_scale:
            raise ValueError("scale_reference applies to the adaptive step scale only")
        if anneal_rate and scale_reference != "trend":
            raise ValueError(
                "the annealed rate is defined for the trend rule (scale_reference='trend')"
            )
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"unknown implementation {implementation!r}; known: {', '.join(IMPLEMENTATIONS)}"
            )
        self.num_candidates = num_candidates
        self.implementation = implementation
        self.bounded = bounded
        self.adaptive_scale = adaptive_scale
        self.scale_reference = scale_reference
        self.anneal_rate = anneal_rate
        if anneal_rate:
            self.name = "hyperadam-tensor-trend-annealed"
        elif adaptive_scale:
            trend = scale_reference == "trend"
            self.name = "hyperadam-tensor-trend" if trend else "hyperadam-tensor-adaptive"
        else:
            self.name = "hyperadam-tensor" if bounded else "hyperadam-tensor-unbounded"

    def theta_shapes(self) -> dict[str, tuple[int, ...]]:
        j = self.num_candidates
        extra = {"scale_rate": (1,)} if self.adaptive_scale else {}
        if self.anneal_rate:
            extra["scale_rate_early"] = (1,)
        return {
            "pre_kernel": (NUM_FEATURES, j),
            "pre_bias": (j,),
            "lstm_kernel": (2 * j, 4 * j),
            "lstm_bias": (4 * j,),
            "decay_kernel": (2 * j, 2 * j),
            "decay_bias": (2 * j,),
            "weight_kernel": (j, j),
            "weight_bias": (j,),
            **extra,
        }

    def init_theta(self, generator: torch.Generator) -> Theta:
        """The paper's initialisation (spec §2.4), shapes aside; κ starts at ADAPTIVE_START_RATE
        (and κ₀ at ANNEALED_START_EARLY_RATE)."""
        theta = spec_init(self.theta_shapes(), generator)
        if self.adaptive_scale:
            theta["scale_rate"] = torch.full((1,), _rate_logit(ADAPTIVE_START_RATE))
        if self.anneal_rate:
            theta["scale_rate_early"] = torch.full((1,), _rate_logit(ANNEALED_START_EARLY_RATE))
        return theta

    def adam_reduction(
        self,
        theta: Theta,
        *,
        lr: float,
        beta1: float = 0.9,
        beta2: float = 0.999,
        scale_rate: float | None = None,
        early_scale_rate: float | None = None,
    ) -> Theta:
        """θ on which the step at α = ``default_lr`` is Adam(lr, β₁, β₂), ε inside the root.

        Constant decay rates (zero kernel, logit biases) make B, Γ Adam's bias corrections;
        constant weights ρ_j = lr/(α J) sum the J identical candidates to lr/α · M̂. The
        StateCell keeps ``theta``'s values, so meta-training starts at Adam with cells that
        already see the inputs. Bounded: needs lr < RHO_MAX · α. Adaptive variant: the step
        scale moves at rate κ = ``scale_rate``; 0 is Adam to round-off (κ ≈ 1e-19), None keeps
        ``theta``'s κ (``init_theta``'s is ADAPTIVE_START_RATE: hypergradient Adam, the
        meta-training start). Annealed variant: κ₀ = ``early_scale_rate`` (None keeps θ's).
        """
        if scale_rate is not None:
            if not self.adaptive_scale:
                raise ValueError("scale_rate needs the adaptive variant")
            if not 0 <= scale_rate < KAPPA_MAX:
                raise ValueError(f"scale_rate must be in [0, {KAPPA_MAX}), got {scale_rate}")
        if early_scale_rate is not None:
            if not self.anneal_rate:
                raise ValueError("early_scale_rate needs the annealed variant")
            if not 0 <= early_scale_rate < KAPPA_MAX:
                raise ValueError(
                    f"early_scale_rate must be in [0, {KAPPA_MAX}), got {early_scale_rate}"
                )
        if not lr > 0 or not (0 < beta1 < 1 and 0 < beta2 < 1):
            raise ValueError(f"Adam needs lr > 0 and betas in (0, 1), got {lr}, {beta1}, {beta2}")
        j = self.num_candidates
        share = lr / self.default_lr  # Σ_j ρ_j
        if self.bounded and not share < RHO_MAX:
            raise ValueError(f"a bounded step reaches at most lr = {RHO_MAX * self.default_lr}")

        def logit(p: float) -> float:
            return math.log(p / (1.0 - p))

        out = dict(theta)
        out["decay_kernel"] = torch.zeros(2 * j, 2 * j)
        out["decay_bias"] = torch.cat(
            [torch.full((j,), logit(beta1)), torch.full((j,), logit(beta2))]
        )
        out["weight_kernel"] = torch.zeros(j, j)
        bias = math.atanh(share / RHO_MAX) if self.bounded else share / j
        out["weight_bias"] = torch.full((j,), bias)
        if scale_rate is not None:
            out["scale_rate"] = torch.full((1,), _rate_logit(scale_rate))
        if early_scale_rate is not None:
            out["scale_rate_early"] = torch.full((1,), _rate_logit(early_scale_rate))
        return out

    def init_state(
        self,
        num_coords: int,
        *,
        device: torch.device | str = "cpu",
        tensor_sizes: Sequence[int] | None = None,
    ) -> TensorwiseState:
        zeros = torch.zeros(num_coords, self.num_candidates, device=device)
        segment, sizes = segments_for(num_coords, tensor_sizes)
        h, c, m, v, b, gamma = (zeros.clone() for _ in range(6))
        return TensorwiseState(
            h,
            c,
            m,
            v,
            b,
            gamma,
            torch.zeros(num_coords, len(FEATURE_BETAS), device=device),
            torch.zeros(num_coords, 1, device=device),
            torch.zeros(1, device=device),
            segment.to(device),
            sizes.to(device),
            torch.zeros(num_coords if self.adaptive_scale else 0, device=device),
        )

    def step(
        self, theta: Theta, grad: Tensor, state: TensorwiseState, *, lr: float
    ) -> tuple[Tensor, TensorwiseState]:
        step = tensorwise_step
        if self.implementation == "fast":
            from .hyperadam_tensor_fast import tensorwise_step_fast as step
        return step(
            theta,
            grad,
            state,
            lr=lr,
            bounded=self.bounded,
            adaptive=self.adaptive_scale,
            scale_reference=self.scale_reference,
            anneal_rate=self.anneal_rate,
        )


def _rate_logit(rate: float) -> float:
    """θ_scale_rate for κ = rate (κ = KAPPA_MAX·σ(θ)); rate 0 gives κ ≈ 4e-19, Adam to round-off."""
    if rate == 0:
        return -40.0
    share = rate / KAPPA_MAX
    return math.log(share / (1.0 - share))
