"""export.onnx_builder: the building blocks agree with float64 maths element by element."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from export.onnx_builder import GraphBuilder, elu, half_elu
from runtime import manifest as mf


def run_unary(build, x: np.ndarray) -> np.ndarray:
    b = GraphBuilder("unary")
    b.op("Identity", build(b, "x"), outputs=["y"])
    spec_in = mf.TensorSpec("x", (mf.COORDS,))
    spec_out = mf.TensorSpec("y", (mf.COORDS,))
    model = b.model([spec_in], [spec_out], "one unary block")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def elu64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0.0)))


# Both signs, the region near 0 where eˣ − 1 would cancel, and saturation at −1.
X = np.concatenate(
    [
        -np.logspace(-30, 2, 400),
        np.logspace(-30, 2, 400),
        np.linspace(-3, 3, 601),
        [0.0, -0.0, -88.0, -104.0],
    ]
).astype(np.float32)


@pytest.mark.parametrize(
    "build",
    [
        elu,
        # ELU(x) = 2·half_elu(x/2); both factors of 2 are exact in fp32.
        lambda b, x: b.op(
            "Mul", half_elu(b, b.op("Mul", x, b.const(0.5, "half"))), b.const(2.0, "two")
        ),
    ],
    ids=["elu", "half_elu"],
)
def test_elu_blocks_are_accurate_to_a_few_ulp_everywhere(build):
    got = run_unary(build, X).astype(np.float64)
    want = elu64(X)
    relative = np.abs(got - want) / np.maximum(np.abs(want), 1e-38)
    assert relative.max() < 1e-6, X[relative.argmax()]  # fp32 eps is 6e-8
    assert np.array_equal(got[X > 0], X[X > 0])  # the linear branch is exact
