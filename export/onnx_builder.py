"""A small ONNX graph builder over ``onnx.helper``: the graphs are written op by op, not traced.

Why not ``torch.onnx.export``: its dynamo optimizer deletes ``x + 1e-24`` (design §3.1 traps),
and a hand-written graph lets us fold the global normalisations into the (tiny) weight matrices
instead of scaling [n, J] tensors, which matters for speed. The maths is checked against the torch
reference by the parity check that runs on every export (``export.parity``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime import manifest as mf


class GraphBuilder:
    """Collects nodes and fp32 initializers; ``op`` returns the output name of a new node
    (``op_outputs`` the names, for a node with several)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(
        self, value: np.ndarray | np.generic | float | Sequence[int], hint: str = "const"
    ) -> str:
        """Adds an initializer: float data as fp32, integer data (axes, splits) as int64."""
        array = np.asarray(value)
        dtype = np.int64 if np.issubdtype(array.dtype, np.integer) else np.float32
        name = self._fresh(hint)
        self.initializers.append(numpy_helper.from_array(array.astype(dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int | Sequence[str] = 1, **attrs: Any) -> str:
        """Appends a node with one output and returns its name; ``outputs`` is 1 (a fresh name)
        or the exact name in a one-element sequence."""
        names = self.op_outputs(op_type, *inputs, outputs=outputs, **attrs)
        if len(names) != 1:
            raise ValueError(f"op gives one output, {op_type} has {len(names)}: use op_outputs")
        return names[0]

    def op_outputs(
        self, op_type: str, *inputs: str, outputs: int | Sequence[str], **attrs: Any
    ) -> list[str]:
        """Appends one node. ``outputs`` is a count (fresh names) or the exact output names."""
        if isinstance(outputs, int):
            names = [self._fresh(op_type.lower()) for _ in range(outputs)]
        else:
            names = list(outputs)
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names

    def model(
        self, inputs: Sequence[mf.TensorSpec], outputs: Sequence[mf.TensorSpec], doc: str
    ) -> onnx.ModelProto:
        """The checked model: opset ``mf.OPSET``, IR ``mf.IR_VERSION``, fp32, dynamic ``n``."""

        def info(spec: mf.TensorSpec) -> onnx.ValueInfoProto:
            assert spec.dtype == mf.DTYPE
            return helper.make_tensor_value_info(spec.name, TensorProto.FLOAT, list(spec.shape))

        graph = helper.make_graph(
            self.nodes,
            self.name,
            [info(s) for s in inputs],
            [info(s) for s in outputs],
            initializer=self.initializers,
            doc_string=doc,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", mf.OPSET)],
            # onnx 1.23 would write IR 14 by default, which onnxruntime 1.31 refuses.
            ir_version=mf.IR_VERSION,
            producer_name="hyperadam.export",
        )
        onnx.checker.check_model(model, full_check=True)
        return model


# -- building blocks shared by the optimizers' graphs (all feature-major: [features, n]) ------


def elu(b: GraphBuilder, x: str) -> str:
    """ELU(x) = max(x, expm1(min(x, 0))), with expm1(y) = tanh(y/2)·(eʸ + 1).

    The max form is exact on both branches (expm1(0) = 0 < x for x > 0; expm1(x) ≥ x for
    x ≤ 0). ONNX has no Expm1, and eʸ − 1 (what onnxruntime's ``Elu`` kernel computes) loses all
    relative precision near 0, which put the LSTM state 10× further from an fp64 reference than
    torch's fp32 ``F.elu``; the tanh identity keeps it at fp32 round-off, and is still faster
    than the ``Elu`` kernel on the CPU provider.
    """
    y = b.op("Min", x, b.const(0.0, "zero"))
    half_tanh = b.op("Tanh", b.op("Mul", y, b.const(0.5, "half")))
    expm1 = b.op("Mul", half_tanh, b.op("Add", b.op("Exp", y), b.const(1.0, "one")))
    return b.op("Max", x, expm1)


def half_elu(b: GraphBuilder, u: str) -> str:
    """ELU(2u) / 2 = max(u, τ / (1 − τ)) with τ = tanh(min(u, 0)): five passes instead of seven.

    For y = 2·min(u, 0) ≤ 0, expm1(y) / 2 = tanh(y/2) / (1 − tanh(y/2)) (from eʸ + 1 =
    2 / (1 − tanh(y/2))): accurate near 0 (τ ≈ u, 1 − τ ≈ 1), no cancellation, and no Exp next to
    the Tanh. Callers fold the factors of 2 into the weights around it (exact: powers of two), so
    ``elu(x)`` and ``2·half_elu(x/2)`` differ only by the rounding of the formula.
    """
    tau = b.op("Tanh", b.op("Min", u, b.const(0.0, "zero")))
    return b.op("Max", u, b.op("Div", tau, b.op("Sub", b.const(1.0, "one"), tau)))


def inverse_norm(b: GraphBuilder, sum_sq: str, eps: float) -> str:
    """1 / sqrt(Σx² + ε), the guarded inverse L2 norm of the reference's normalisations."""
    return b.op("Reciprocal", b.op("Sqrt", b.op("Add", sum_sq, b.const(eps, "norm_eps"))))


def lstm_cell(
    b: GraphBuilder,
    inputs: Sequence[str],
    h: str,
    c: str,
    kernel: np.ndarray,
    bias: np.ndarray,
    forget_bias: float,
    *,
    h_new: str | None = None,
    c_new: str | None = None,
) -> tuple[str, str]:
    """One TF ``LSTMCell`` step, feature-major: ``inputs`` are [d_k, n], h and c are [H, n].

    ``[i, u, f, o] = Wᵀ [inputs; h] + b`` with W the reference's ``[D + H, 4H]`` kernel (a
    caller that feeds a scaled input scales W's rows for it);
    ``c' = σ(f + forget_bias)⊙c + σ(i)⊙tanh(u)``, ``h' = σ(o)⊙tanh(c')``. The forget offset is
    folded into the bias (a rounding-level change).
    """
    hidden = kernel.shape[1] // 4
    folded = np.asarray(bias, np.float32).copy()
    folded[2 * hidden : 3 * hidden] += forget_bias
    x = b.op("Concat", *inputs, h, axis=0)
    # One Gemm per gate, each followed directly by its activation: onnxruntime's CPU provider
    # fuses Gemm + Sigmoid/Tanh (FusedGemm), which one [4H, n] Gemm + Split + four activations
    # cannot use; it also saves the Split's copy. Each output element is the same dot product.
    i, u, f, o = (
        b.op(
            activation,
            b.op(
                "Gemm",
                b.const(np.ascontiguousarray(kernel[:, k * hidden : (k + 1) * hidden].T), "lstm_w"),
                x,
                b.const(folded[k * hidden : (k + 1) * hidden].reshape(-1, 1), "lstm_b"),
            ),
        )
        for k, activation in enumerate(("Sigmoid", "Tanh", "Sigmoid", "Sigmoid"))
    )
    c_out = b.op(
        "Add",
        b.op("Mul", f, c),
        b.op("Mul", i, u),
        outputs=[c_new] if c_new else 1,
    )
    h_out = b.op("Mul", o, b.op("Tanh", c_out), outputs=[h_new] if h_new else 1)
    return h_out, c_out


def sum_of_squares(b: GraphBuilder, x: str, axis: int | None, *, output: str | None = None) -> str:
    """Σ x² over ``axis`` (all axes if None), accumulated in float64, returned as float32.

    onnxruntime's fp32 ReduceSumSquare adds sequentially: over 10⁶ coordinates it is off by
    ~5e-4 relative, against ~1e-8 through float64. The price, measured on a [20, n] chunk: ~20 ns
    per coordinate against ~10 for an fp32 reduction, below the noise of a whole step.
    """
    wide = b.op("Cast", x, to=onnx.TensorProto.DOUBLE)
    axes = () if axis is None else (b.const([axis], f"axis{axis}"),)
    total = b.op("ReduceSumSquare", wide, *axes, keepdims=0)
    return b.op("Cast", total, to=onnx.TensorProto.FLOAT, outputs=[output] if output else 1)
