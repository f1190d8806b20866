"""HyperAdam's step as ONNX graphs: fused, state stage and update stage (design §3.1, spec §2).

The maths is ``meta_train.optimizers.hyperadam`` (``state_cell``, ``update_stage``,
``hyperadam_step``), feature-major (``[J, n]``, see ``runtime.manifest``), with rewrites that
change only fp32 rounding:

* every global normalisation is folded into a weight instead of scaling a [J, n] tensor:
  ``(g·s)·a = g·(s·a)`` for the gradient norm and ``N(X)ᵀ W = Xᵀ diag(1/‖X_:,k‖) W`` for the
  columns of h' and M, so the scaling costs O(J²) per call instead of O(nJ);
* TF's forget-gate offset +1 is folded into the LSTM bias;
* both ELUs are computed halved, ``ELU(x) = 2·half_elu(x/2)`` (``onnx_builder.half_elu``), with
  the factors of 2 folded into the surrounding weights and the learning rate (exact);
* one Gemm per gate / decay rate, each followed by its activation, which onnxruntime fuses.

The graphs are written for few passes over [J, n] tensors: on a CPU each elementwise node costs
about as much as 25–40 FLOPs per element of Gemm, so the step is bound by its elementwise passes
(``benchmarks/bench_runtime.py``).

ε = 1e-24 (moments) and 1e-16 (norms) are explicit ``Add`` nodes; no optimizer runs over these
graphs, and the zero-gradient parity cases check that the ε survive into onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx

from meta_train.optimizers.hyperadam import FORGET_BIAS, MOMENT_EPS, NORM_EPS
from runtime import manifest as mf

from .onnx_builder import GraphBuilder, half_elu, inverse_norm, lstm_cell, sum_of_squares

H_NEW, C_NEW = mf.updated("h"), mf.updated("c")


def _state_cell(b: GraphBuilder, theta: dict[str, np.ndarray], grad_sum_sq: str) -> None:
    """StateCell (spec §2.1): e = ELU(ĝ a + b) → one LSTM step; writes ``h_new``, ``c_new``.

    Computes e/2 = half_elu(ĝ a/2 + b/2) and doubles the LSTM kernel's rows for e instead.
    """
    j = theta["pre_bias"].shape[0]
    half_a = b.op(
        "Mul",
        b.const(theta["pre_kernel"].reshape(j, 1) / 2, "pre_kernel_half"),
        inverse_norm(b, grad_sum_sq, NORM_EPS),
    )
    half_pre = b.op(
        "Add", b.op("Mul", half_a, mf.GRAD), b.const(theta["pre_bias"].reshape(j, 1) / 2)
    )
    kernel = np.asarray(theta["lstm_kernel"], np.float32).copy()
    kernel[:j] *= 2  # rows that multiply e, fed e/2
    lstm_cell(
        b,
        [half_elu(b, half_pre)],
        "h",
        "c",
        kernel,
        theta["lstm_bias"],
        FORGET_BIAS,
        h_new=H_NEW,
        c_new=C_NEW,
    )


def _update(b: GraphBuilder, theta: dict[str, np.ndarray], h_col_sum_sq: str) -> None:
    """AdamCell + WeightCell + combination (spec §2.2–2.3) for one chunk; writes ``w_new``, the
    ``*_new`` moments and ``m_col_sum_sq_new`` (this chunk's Σ_rows M'² per column).

    Pass count matters more than FLOPs here (each node is one pass over a [J, n] tensor at a
    few hundred ps per element, against ~12 ps per FLOP in the Gemms): β and γ come from one
    Gemm each with the sigmoid right after it (fused by onnxruntime, no Split), ρ from its own
    [J, J] Gemm (no zero block), and ρ is carried as ρ/2 (``half_elu``) with the 2 folded into
    the learning rate.
    """
    j = theta["weight_bias"].shape[0]
    one, eps = b.const(1.0, "one"), b.const(MOMENT_EPS, "moment_eps")
    row = b.const([0], "axis0")
    # Column normalisation of h' and M folded into the columns of W_aᵀ: [2J(out: β|γ), 2J].
    decay_t = theta["decay_kernel"].T
    kernel = b.op(
        "Concat",
        b.op(
            "Mul",
            b.const(np.ascontiguousarray(decay_t[:, :j]), "decay_kernel_h"),
            b.op("Unsqueeze", inverse_norm(b, h_col_sum_sq, NORM_EPS), row),
        ),
        b.op(
            "Mul",
            b.const(np.ascontiguousarray(decay_t[:, j:]), "decay_kernel_m"),
            b.op("Unsqueeze", inverse_norm(b, mf.M_COL_SUM_SQ, NORM_EPS), row),
        ),
        axis=1,
    )
    beta_kernel, gamma_kernel = b.op_outputs("Split", kernel, b.const([j, j], "split2"), outputs=2)
    bias = theta["decay_bias"].reshape(-1, 1)
    h_and_m = b.op("Concat", H_NEW, "m", axis=0)
    beta = b.op("Sigmoid", b.op("Gemm", beta_kernel, h_and_m, b.const(bias[:j], "beta_bias")))
    gamma = b.op("Sigmoid", b.op("Gemm", gamma_kernel, h_and_m, b.const(bias[j:], "gamma_bias")))
    half_rho = half_elu(
        b,
        b.op(
            "Gemm",
            b.const(np.ascontiguousarray(theta["weight_kernel"].T) / 2, "weight_kernel_half"),
            H_NEW,
            b.const(theta["weight_bias"].reshape(j, 1) / 2, "weight_bias_half"),
        ),
    )
    m_new, v_new, b_new, gamma_new = moment_recursions(b, one, beta, gamma)
    m_tilde = b.op("Div", m_new, b.op("Add", b_new, eps))
    v_tilde = b.op("Div", v_new, b.op("Add", gamma_new, eps))
    m_hat = b.op("Div", m_tilde, b.op("Sqrt", b.op("Add", v_tilde, eps)))
    half_direction = b.op("ReduceSum", b.op("Mul", half_rho, m_hat), row, keepdims=0)
    b.op(
        "Sub",
        mf.PARAM,
        b.op("Mul", b.op("Add", mf.LR, mf.LR), half_direction),  # 2α · Σ (ρ/2) M̂
        outputs=[mf.updated(mf.PARAM)],
    )
    sum_of_squares(b, m_new, 1, output=mf.updated(mf.M_COL_SUM_SQ))


def build_hyperadam_graphs(theta: dict[str, np.ndarray]) -> dict[str, onnx.ModelProto]:
    """Builds the fused, state-stage and update-stage models for θ (numpy fp32 arrays)."""
    j = int(theta["pre_bias"].shape[0])
    specs = mf.hyperadam_graphs(j)

    fused = GraphBuilder("hyperadam_fused")
    grad_sum_sq = sum_of_squares(fused, mf.GRAD, None)
    _state_cell(fused, theta, grad_sum_sq)
    h_col_sum_sq = sum_of_squares(fused, H_NEW, 1)
    _update(fused, theta, h_col_sum_sq)

    state = GraphBuilder("hyperadam_state_stage")
    _state_cell(state, theta, mf.GRAD_SUM_SQ)
    sum_of_squares(state, H_NEW, 1, output=mf.H_COL_SUM_SQ)

    update = GraphBuilder("hyperadam_update_stage")
    _update(update, theta, mf.H_COL_SUM_SQ)

    docs = {
        mf.FUSED: "One HyperAdam step (spec §2) of a model that is a single chunk.",
        mf.STATE_STAGE: "HyperAdam StateCell of one chunk; emits the chunk's Σ_rows h'².",
        mf.UPDATE_STAGE: "HyperAdam AdamCell+WeightCell of one chunk; emits the chunk's Σ M'².",
    }
    builders = {mf.FUSED: fused, mf.STATE_STAGE: state, mf.UPDATE_STAGE: update}
    return {
        role: builders[role].model(spec.inputs, spec.outputs, docs[role])
        for role, spec in specs.items()
    }


def moment_recursions(
    b: GraphBuilder, one: str, beta: str, gamma: str
) -> tuple[str, str, str, str]:
    """The J Adams' moments and learned bias corrections after this step (spec §2.2.3), as the
    state outputs m', v', B', Γ'. Same association as the reference: β⊙M + (1−β)⊙G, and so on;
    G = g broadcast over rows."""
    one_minus_beta, one_minus_gamma = b.op("Sub", one, beta), b.op("Sub", one, gamma)
    m_new = b.op(
        "Add",
        b.op("Mul", beta, "m"),
        b.op("Mul", one_minus_beta, mf.GRAD),
        outputs=[mf.updated("m")],
    )
    v_new = b.op(
        "Add",
        b.op("Mul", gamma, "v"),
        b.op("Mul", one_minus_gamma, b.op("Mul", mf.GRAD, mf.GRAD)),
        outputs=[mf.updated("v")],
    )
    b_new = b.op("Add", b.op("Mul", beta, "b"), one_minus_beta, outputs=[mf.updated("b")])
    gamma_new = b.op(
        "Add", b.op("Mul", gamma, "gamma"), one_minus_gamma, outputs=[mf.updated("gamma")]
    )
    return m_new, v_new, b_new, gamma_new
