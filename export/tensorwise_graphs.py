"""The tensor-wise HyperAdam variant as ONNX graphs: the per-array terms and one step graph.

The maths is ``meta_train.optimizers.hyperadam_tensor`` (``input_features``,
``tensorwise_step``, ``adapted_log_scale``), feature-major (``[J, n]``, see
``runtime.manifest``). Its only quantity that spans coordinates is rms_T(g) of each
coordinate's tensor T (the bound array). That is a per-array statistic
(``runtime.manifest.ARRAY_MEANS``): ``array_terms.onnx`` emits g² per coordinate, the runtime
averages it over each array (all chunks, all shards), and the step graph receives the mean per
coordinate. Given it, the step is coordinate-wise, so the one ``fused`` graph runs on any
chunk, packed chunks of several arrays included.

The adaptive variant (``hyperadam-tensor-adaptive``) also needs cos_T(g, D) with the previous
step direction D = Σ_j ρ_j(h) M̂_j, both of the incoming state: its terms graph recomputes D
per coordinate from h, m, v, b, γ and emits g², g·D and D² as well, which the runtime sums over
each array (``runtime.manifest.TENSORWISE_ADAPTIVE_SUMMED``); the step graph forms the cosine
exactly as the reference, Σ g·D / (√Σ g² · √Σ D² + 1e-30), moves the state's ℓ (one value per
coordinate, its tensor's) and multiplies the step by exp(ℓ). The trend variant
(``hyperadam-tensor-trend``) takes the cosine with the gradient's long-run trend y instead, the
β = 0.99 row (``TREND_FEATURE``) of the incoming state's feat_m: its terms graph reads only
feat_m and emits g², g², g·y, y² (``runtime.manifest.TENSORWISE_TREND_SUMMED``); its step graph
is the adaptive variant's.

Rewrites that change only fp32 rounding:

* the training-progress features tanh(t/τ) are the same for every coordinate and lie in
  [0, 1], inside the ±``FEATURE_CLIP`` clip: their product with the kernel's rows is folded
  into the bias (O(J) per call instead of three [J, n] rows);
* the forget-gate offset +1 is folded into the LSTM bias (``onnx_builder.lstm_cell``);
* x · rsqrt(y) is written x / sqrt(y).

ε (1e-24 moments, 1e-30 inside rms_T) are explicit ``Add`` nodes, as in the paper's graphs.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch

from meta_train.optimizers import hyperadam_tensor as ref
from meta_train.optimizers.hyperadam import FORGET_BIAS, MOMENT_EPS
from runtime import manifest as mf

from .hyperadam_graphs import moment_recursions
from .onnx_builder import GraphBuilder, elu, lstm_cell


def build_array_terms(spec: mf.GraphSpec) -> onnx.ModelProto:
    """g → g² as the one row of ``array_terms`` (its mean over an array is rms_T(g)²)."""
    assert spec.outputs[0].shape[0] == len(mf.TENSORWISE_STATISTICS)
    b = GraphBuilder("hyperadam_tensor_array_terms")
    b.op(
        "Unsqueeze",
        b.op("Mul", mf.GRAD, mf.GRAD),  # fp32 g², as the reference's x.square()
        b.const([0], "axis0"),
        outputs=[mf.ARRAY_TERMS_OUT],
    )
    return b.model(spec.inputs, spec.outputs, "Per-coordinate terms of the per-array statistics.")


def _step_weights(b: GraphBuilder, theta: dict[str, np.ndarray], h: str, *, bounded: bool) -> str:
    """ρ [J, n] from the LSTM state h, the reference's ``step_weights``."""
    j = int(theta["weight_bias"].shape[0])
    logits = b.op(
        "Gemm",
        b.const(np.ascontiguousarray(np.asarray(theta["weight_kernel"], np.float32).T), "w_k"),
        h,
        b.const(np.asarray(theta["weight_bias"], np.float32).reshape(j, 1), "weight_bias"),
    )
    if not bounded:
        return elu(b, logits)
    return b.op("Mul", b.op("Tanh", logits), b.const(ref.RHO_MAX / j, "rho_scale"))


def _cosine_terms(b: GraphBuilder, direction: str) -> None:
    """The rows g², g², g·y, y² of ``array_terms`` for the step scale's cosine between g and
    the direction y ([1, n]): the mean of the first is rms_T(g)², the sums of the others the
    reference's ``tensor_cosine``."""
    grad = b.op("Unsqueeze", mf.GRAD, b.const([0], "axis0"))
    grad_sq = b.op("Mul", grad, grad)
    b.op(
        "Concat",
        grad_sq,  # its mean: rms_T(g)²
        grad_sq,  # its sum: ‖g‖² over T
        b.op("Mul", grad, direction),  # the reference's x * y
        b.op("Mul", direction, direction),
        axis=0,
        outputs=[mf.ARRAY_TERMS_OUT],
    )


def build_adaptive_array_terms(spec: mf.GraphSpec, theta: dict[str, np.ndarray]) -> onnx.ModelProto:
    """(g, h, m, v, b, γ) → the rows g², g², g·D, D² of ``array_terms``, where D = Σ_j ρ_j(h)
    M̂_j(m, v, b, γ) is the previous step's direction (the reference's
    ``scale_reference_direction``, "step": unclipped M̂ of the incoming state, ρ of its h)."""
    assert spec.outputs[0].shape[0] == len(mf.TENSORWISE_ADAPTIVE_STATISTICS)
    b = GraphBuilder("hyperadam_tensor_adaptive_array_terms")
    eps = b.const(MOMENT_EPS, "moment_eps")
    rho = _step_weights(b, theta, "h", bounded=True)
    direction = b.op(
        "ReduceSum",
        b.op("Mul", rho, _directions(b, "m", "v", "b", "gamma", eps)),
        b.const([0], "axis0"),
        keepdims=1,
    )  # [1, n]
    _cosine_terms(b, direction)
    return b.model(
        spec.inputs,
        spec.outputs,
        "Per-coordinate terms of the adaptive variant's per-array statistics: g² (mean: rms_T(g)²)"
        ", then g², g·D, D² (sums: the cosine between g and the previous step direction D).",
    )


def build_trend_array_terms(spec: mf.GraphSpec) -> onnx.ModelProto:
    """(g, feat_m) → the rows g², g², g·y, y² of ``array_terms``, where y is the gradient's
    trend, feat_m's β = 0.99 row of the incoming state (the reference's
    ``scale_reference_direction``, "trend")."""
    assert spec.outputs[0].shape[0] == len(mf.TENSORWISE_TREND_STATISTICS)
    b = GraphBuilder("hyperadam_tensor_trend_array_terms")
    trend = b.op("Gather", "feat_m", b.const([ref.TREND_FEATURE], "trend_row"), axis=0)  # [1, n]
    _cosine_terms(b, trend)
    return b.model(
        spec.inputs,
        spec.outputs,
        "Per-coordinate terms of the trend variant's per-array statistics: g² (mean: rms_T(g)²)"
        ", then g², g·y, y² (sums: the cosine between g and its trend y, the β = 0.99 momentum).",
    )


def _adapted_log_scale(
    b: GraphBuilder,
    theta: dict[str, np.ndarray],
    statistics: tuple[str, ...],
    step: str,
    *,
    anneal: bool,
) -> str:
    """ℓ' = clip(ℓ + κ·cos_T(g, y), ±log SCALE_MAX) from the summed statistics (rows 1–3 of
    ``array_means``, named ``statistics``; y is the previous step direction D or the trend),
    the reference's ``adapted_log_scale`` and ``tensor_cosine``; ``anneal``: at the reference's
    annealed rate κ_t of the updated step count ``step``."""

    def row(index: int) -> str:
        name = statistics[index]
        return b.op("Gather", mf.ARRAY_MEANS, b.const(np.int64(index), f"{name}_row"), axis=0)

    grad_norm = b.op("Sqrt", row(1))
    direction_norm = b.op("Sqrt", row(3))
    cosine = b.op(
        "Div",
        row(2),
        b.op("Add", b.op("Mul", grad_norm, direction_norm), b.const(ref.RMS_EPS, "cosine_eps")),
    )
    # κ = KAPPA_MAX·σ(θ_scale_rate), rounded as the reference rounds it (fp32 σ, then the
    # product with KAPPA_MAX).
    def kappa(name: str) -> str:
        value = ref.KAPPA_MAX * torch.sigmoid(torch.as_tensor(theta[name], dtype=torch.float32))
        return b.const(value.numpy()[0], name)

    rate = kappa("scale_rate")
    if anneal:  # κ + (κ₀ − κ)·exp(−t/τ), in the reference's order
        decay = b.op(
            "Exp",
            b.op("Div", b.op("Neg", step), b.const(ref.SCALE_RATE_ANNEAL_STEPS, "anneal_steps")),
        )
        rate = b.op("Add", rate, b.op("Mul", b.op("Sub", kappa("scale_rate_early"), rate), decay))
    limit = np.float32(math.log(ref.SCALE_MAX))
    return b.op(
        "Clip",
        b.op("Add", "log_scale", b.op("Mul", rate, cosine)),
        b.const(-limit, "minus_log_scale_max"),
        b.const(limit, "log_scale_max"),
        outputs=[mf.updated("log_scale")],
    )


def _directions(b: GraphBuilder, m: str, v: str, bias1: str, bias2: str, eps: str) -> str:
    """M̂ = (M / (B + ε)) / √(V / (Γ + ε) + ε), the reference's ``candidate_directions``."""
    m_tilde = b.op("Div", m, b.op("Add", bias1, eps))
    v_tilde = b.op("Div", v, b.op("Add", bias2, eps))
    return b.op("Div", m_tilde, b.op("Sqrt", b.op("Add", v_tilde, eps)))


def _features(b: GraphBuilder, step: str) -> tuple[str, str]:
    """The per-coordinate features [4, n] (g/rms_T(g), three momenta; clipped) and the
    progress features [3, 1]; writes the updated feature accumulators."""
    one, clip = b.const(1.0, "one"), ref.FEATURE_CLIP
    betas = np.asarray(ref.FEATURE_BETAS, np.float32).reshape(-1, 1)
    # As the reference: betas·m + (1 − betas)·g with (1 − betas) rounded in fp32.
    feat_m = b.op(
        "Add",
        b.op("Mul", b.const(betas, "feature_betas"), "feat_m"),
        b.op("Mul", b.const(np.float32(1.0) - betas, "one_minus_feature_betas"), mf.GRAD),
        outputs=[mf.updated("feat_m")],
    )
    feat_v = b.op(
        "Add",
        b.op("Mul", b.const(ref.FEATURE_BETA2, "feature_beta2"), "feat_v"),
        b.op(
            "Mul",
            b.const(1.0 - ref.FEATURE_BETA2, "one_minus_feature_beta2"),
            b.op("Mul", mf.GRAD, mf.GRAD),
        ),
        outputs=[mf.updated("feat_v")],
    )
    m_hat = b.op("Div", feat_m, b.op("Sub", one, b.op("Pow", b.const(betas, "betas_pow"), step)))
    v_hat = b.op(
        "Div",
        feat_v,
        b.op(
            "Sub",
            one,
            b.op("Pow", b.const(np.asarray([ref.FEATURE_BETA2], np.float32), "beta2_pow"), step),
        ),
    )
    momenta = b.op("Div", m_hat, b.op("Sqrt", b.op("Add", v_hat, b.const(MOMENT_EPS, "eps"))))
    rms = b.op(
        "Sqrt",
        b.op(
            "Add",
            b.op("Gather", mf.ARRAY_MEANS, b.const([0], "grad_sq_row"), axis=0),  # [1, n]
            b.const(ref.RMS_EPS, "rms_eps"),
        ),
    )
    scaled = b.op("Div", b.op("Unsqueeze", mf.GRAD, b.const([0], "axis0")), rms)
    features = b.op(
        "Clip",
        b.op("Concat", scaled, momenta, axis=0),
        b.const(-clip, "minus_clip"),
        b.const(clip, "clip"),
    )
    scales = np.asarray(ref.PROGRESS_SCALES, np.float32).reshape(-1, 1)
    progress = b.op("Tanh", b.op("Div", step, b.const(scales, "progress_scales")))
    return features, progress


def _logistic_of_affine(
    b: GraphBuilder, kernel: np.ndarray, x: str, bias: np.ndarray, name: str
) -> str:
    """σ(kernel·x + bias) to a relative fp32 round-off, as 1 / (1 + exp(−kernel·x − bias)).

    onnxruntime's ``Sigmoid`` (MLAS) is accurate to ~1.4e-7 *absolute*: near 0 its relative
    error is ~1e-7/σ (3e-4 at σ = 3e-4, several hundred per cent below σ = 1e-7). The decay
    gates multiply the moments, m' = β·m + (1 − β)·g and v' = γ·v + (1 − γ)·g², so where a
    gate is near 0 that error carries straight into m and v and, through M̂ = m̃/√ṽ, into the
    step (an untrained θ's step differed from the reference by 2.3e-5 at p = 2, measured). Exp
    and Div are accurate to ~1 ulp; the kernel and bias are negated in the constants, exactly.
    """
    logit_negated = b.op(
        "Gemm",
        b.const(np.ascontiguousarray(-np.asarray(kernel, np.float32)), f"{name}_kernel_negated"),
        x,
        b.const(-np.asarray(bias, np.float32), f"{name}_bias_negated"),
    )
    one = b.const(1.0, f"{name}_one")
    return b.op("Div", one, b.op("Add", one, b.op("Exp", logit_negated)))


def build_tensorwise_graphs(
    theta: dict[str, np.ndarray],
    *,
    bounded: bool,
    adaptive: bool = False,
    scale_reference: str = "step",
    anneal_rate: bool = False,
) -> dict[str, onnx.ModelProto]:
    """The ``array_terms`` and ``fused`` models of the tensor-wise variant (numpy fp32 θ);
    ``adaptive``: with the per-tensor step scale (bounded only, as the reference), whose cosine
    takes ``scale_reference`` ("step" or "trend", the reference's), moved at the annealed rate
    with ``anneal_rate`` (the trend rule only)."""
    if adaptive and not bounded:
        raise ValueError("the adaptive step scale is built on the bounded step")
    if anneal_rate and not (adaptive and scale_reference == "trend"):
        raise ValueError("the annealed rate is defined for the adaptive trend rule")
    j = int(theta["pre_bias"].shape[0])
    specs = mf.tensorwise_graphs(j, adaptive=adaptive, scale_reference=scale_reference)
    per_coordinate = 1 + len(ref.FEATURE_BETAS)  # g/rms and the momenta; then progress
    b = GraphBuilder("hyperadam_tensor_fused")
    step = b.op("Add", mf.STEP_COUNT, b.const(1.0, "one"), outputs=[mf.updated(mf.STEP_COUNT)])
    features, progress = _features(b, step)
    kernel_t = np.ascontiguousarray(np.asarray(theta["pre_kernel"], np.float32).T)  # [J, K]
    progress_bias = b.op(  # W_progressᵀ tanh(t/τ) + b: [J, 1]
        "Add",
        b.op("MatMul", b.const(kernel_t[:, per_coordinate:], "pre_kernel_progress"), progress),
        b.const(theta["pre_bias"].reshape(j, 1), "pre_bias"),
    )
    e = elu(
        b,
        b.op(
            "Add",
            b.op("MatMul", b.const(kernel_t[:, :per_coordinate], "pre_kernel_features"), features),
            progress_bias,
        ),
    )
    h_new, _ = lstm_cell(
        b,
        [e],
        "h",
        "c",
        theta["lstm_kernel"],
        theta["lstm_bias"],
        FORGET_BIAS,
        h_new=mf.updated("h"),
        c_new=mf.updated("c"),
    )
    eps, one = b.const(MOMENT_EPS, "moment_eps"), b.const(1.0, "one")
    clip = ref.FEATURE_CLIP
    previous = b.op(
        "Clip",
        _directions(b, "m", "v", "b", "gamma", eps),
        b.const(-clip, "minus_clip"),
        b.const(clip, "clip"),
    )
    z = b.op("Concat", h_new, previous, axis=0)  # [2J, n], the reference's cat([h, M̂_{t−1}])
    decay_t = np.asarray(theta["decay_kernel"], np.float32).T  # [2J(out: β|γ), 2J(in)]
    bias = np.asarray(theta["decay_bias"], np.float32).reshape(-1, 1)
    beta, gamma = (
        _logistic_of_affine(b, decay_t[rows], z, bias[rows], name)
        for name, rows in (("beta", slice(0, j)), ("gamma", slice(j, 2 * j)))
    )
    m_new, v_new, b_new, gamma_new = moment_recursions(b, one, beta, gamma)
    directions = _directions(b, m_new, v_new, b_new, gamma_new, eps)
    rho = _step_weights(b, theta, h_new, bounded=bounded)
    combined = b.op("ReduceSum", b.op("Mul", rho, directions), b.const([0], "axis0"), keepdims=0)
    update = b.op("Mul", mf.LR, combined)
    if adaptive:  # the reference's (−α · Σ) · exp(ℓ')
        statistics = mf.TENSORWISE_SCALE_REFERENCES[scale_reference][0]
        log_scale = _adapted_log_scale(b, theta, statistics, step, anneal=anneal_rate)
        update = b.op("Mul", update, b.op("Exp", log_scale))
    b.op(
        "Sub", mf.PARAM, update, outputs=[mf.updated(mf.PARAM)]
    )  # w − α Σ_j ρ_j M̂_j, the reference's w + (−α · Σ)
    kind = "bounded (ρ = (RHO_MAX/J)·tanh)" if bounded else "unbounded (ρ = ELU)"
    given = "means"
    if adaptive:
        scale = "trend-following" if scale_reference == "trend" else "adaptive"
        scale += " (annealed rate)" if anneal_rate else ""
        kind += f" and the {scale} per-tensor step scale exp(ℓ)"
        given = "means (rms) and sums (cosine)"
    fused = b.model(
        specs[mf.FUSED].inputs,
        specs[mf.FUSED].outputs,
        f"One tensor-wise HyperAdam step, {kind}, of a chunk of any size, given the per-array "
        f"{given} of its coordinates' terms (array_means).",
    )
    if not adaptive:
        terms = build_array_terms(specs[mf.ARRAY_TERMS])
    elif scale_reference == "trend":
        terms = build_trend_array_terms(specs[mf.ARRAY_TERMS])
    else:
        terms = build_adaptive_array_terms(specs[mf.ARRAY_TERMS], theta)
    return {mf.ARRAY_TERMS: terms, mf.FUSED: fused}
