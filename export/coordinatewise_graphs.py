"""DMoptimizer and RNNprop steps as ONNX graphs (spec §7.1, §7.2): one graph each.

Neither normalises over coordinates, so the single ``fused`` graph is also the chunk graph: a
runtime can run it on any split of the coordinates. The maths is ``dm_step`` and
``rnnprop_step`` of ``meta_train.optimizers``, feature-major (``[H, n]``, see
``runtime.manifest``); the forget-gate offset is folded into the LSTM biases and ELU is written
``max(x, exp(min(x,0)) − 1)`` (``export.onnx_builder.elu``), both rounding-level changes.
RNNprop's ε = 1e-8 outside the root is an explicit ``Add``.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from meta_train.optimizers import dmoptimizer, rnnprop
from runtime import manifest as mf

from .onnx_builder import GraphBuilder, elu, lstm_cell


def _readout(b: GraphBuilder, theta: dict[str, np.ndarray], h2: str) -> str:
    """out = h2ᵀ W_out + b_out as a [n] vector."""
    out = b.op(
        "Gemm",
        b.const(np.ascontiguousarray(theta["out_kernel"].T), "out_kernel_t"),
        h2,
        b.const(theta["out_bias"].reshape(1, 1), "out_bias"),
    )  # [1, n]
    return b.op("Reshape", out, b.const([-1], "flat"))


def _two_layer_lstm(
    b: GraphBuilder, theta: dict[str, np.ndarray], inputs: list[str], forget_bias: float
) -> str:
    h1, _ = lstm_cell(
        b,
        inputs,
        "h1",
        "c1",
        theta["lstm1_kernel"],
        theta["lstm1_bias"],
        forget_bias,
        h_new=mf.updated("h1"),
        c_new=mf.updated("c1"),
    )
    h2, _ = lstm_cell(
        b,
        [h1],
        "h2",
        "c2",
        theta["lstm2_kernel"],
        theta["lstm2_bias"],
        forget_bias,
        h_new=mf.updated("h2"),
        c_new=mf.updated("c2"),
    )
    return h2


def build_dm_graphs(theta: dict[str, np.ndarray]) -> dict[str, onnx.ModelProto]:
    """DMoptimizer: LogAndSign (k = 10) → 2-layer LSTM → FC → ``w' = w + α·out``."""
    hidden = int(theta["lstm1_bias"].shape[0]) // 4
    spec = mf.METHODS[mf.DM].graphs(hidden_size=hidden)[mf.FUSED]
    b = GraphBuilder("dm_fused")
    k = dmoptimizer.LOG_SCALE
    row = b.const([0], "axis0")
    magnitude = b.op(
        "Div",
        b.op("Log", b.op("Max", b.op("Abs", mf.GRAD), b.const(math.exp(-k), "log_floor"))),
        b.const(k, "log_scale"),
    )
    sign = b.op(
        "Clip",
        b.op("Mul", mf.GRAD, b.const(math.exp(k), "sign_scale")),
        b.const(-1.0, "minus_one"),
        b.const(1.0, "one"),
    )
    features = [b.op("Unsqueeze", magnitude, row), b.op("Unsqueeze", sign, row)]
    h2 = _two_layer_lstm(b, theta, features, dmoptimizer.FORGET_BIAS)
    b.op(
        "Add", mf.PARAM, b.op("Mul", mf.LR, _readout(b, theta, h2)), outputs=[mf.updated(mf.PARAM)]
    )
    doc = "One DMoptimizer step (spec §7.1) of a chunk of any size."
    return {mf.FUSED: b.model(spec.inputs, spec.outputs, doc)}


def build_rnnprop_graphs(theta: dict[str, np.ndarray]) -> dict[str, onnx.ModelProto]:
    """RNNprop: [g/σ, m̂/σ] → FC + ELU → 2-layer LSTM → FC → ``w' = w − α·tanh(out)``."""
    hidden = int(theta["pre_bias"].shape[0])
    spec = mf.METHODS[mf.RNNPROP].graphs(hidden_size=hidden)[mf.FUSED]
    b = GraphBuilder("rnnprop_fused")
    one = b.const(1.0, "one")
    step = b.op("Add", mf.STEP, one, outputs=[mf.updated(mf.STEP)])
    # As the reference: BETA * m + (1 − BETA) * g, with both factors rounded to fp32.
    m = b.op(
        "Add",
        b.op("Mul", b.const(rnnprop.BETA1, "beta1"), "m"),
        b.op("Mul", b.const(1.0 - rnnprop.BETA1, "one_minus_beta1"), mf.GRAD),
        outputs=[mf.updated("m")],
    )
    v = b.op(
        "Add",
        b.op("Mul", b.const(rnnprop.BETA2, "beta2"), "v"),
        b.op("Mul", b.const(1.0 - rnnprop.BETA2, "one_minus_beta2"), b.op("Mul", mf.GRAD, mf.GRAD)),
        outputs=[mf.updated("v")],
    )
    correction1 = b.op("Sub", one, b.op("Pow", b.const(rnnprop.BETA1, "beta1"), step))
    correction2 = b.op("Sub", one, b.op("Pow", b.const(rnnprop.BETA2, "beta2"), step))
    m_hat = b.op("Div", m, correction1)
    sigma = b.op(
        "Add", b.op("Sqrt", b.op("Div", v, correction2)), b.const(rnnprop.SIGMA_EPS, "sigma_eps")
    )
    row = b.const([0], "axis0")
    features = b.op(
        "Concat",
        b.op("Unsqueeze", b.op("Div", mf.GRAD, sigma), row),
        b.op("Unsqueeze", b.op("Div", m_hat, sigma), row),
        axis=0,
    )  # [2, n]: raw-gradient feature first
    pre = b.op(
        "Gemm",
        b.const(np.ascontiguousarray(theta["pre_kernel"].T), "pre_kernel_t"),
        features,
        b.const(theta["pre_bias"].reshape(-1, 1), "pre_bias"),
    )
    h2 = _two_layer_lstm(b, theta, [elu(b, pre)], dmoptimizer.FORGET_BIAS)
    b.op(
        "Sub",
        mf.PARAM,
        b.op("Mul", mf.LR, b.op("Tanh", _readout(b, theta, h2))),
        outputs=[mf.updated(mf.PARAM)],
    )
    doc = "One RNNprop step (spec §7.2) of a chunk of any size."
    return {mf.FUSED: b.model(spec.inputs, spec.outputs, doc)}
