"""The ONNX graphs: valid, standard ops, fp32, opset ≥ 18, IR ≤ 13, dynamic n, ε kept."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from export.methods import EXPORT_METHODS
from meta_train.optimizers import make_learned_optimizer
from meta_train.optimizers.hyperadam import MOMENT_EPS
from meta_train.optimizers.hyperadam_tensor import RMS_EPS, TensorwiseHyperAdam
from meta_train.seeding import generator
from runtime import manifest as mf

# with the step scale ℓ_T
SCALED = (
    mf.HYPERADAM_TENSOR_ADAPTIVE,
    mf.HYPERADAM_TENSOR_TREND,
    mf.HYPERADAM_TENSOR_TREND_ANNEALED,
)
TREND_RULES = (mf.HYPERADAM_TENSOR_TREND, mf.HYPERADAM_TENSOR_TREND_ANNEALED)
TENSORWISE = (mf.HYPERADAM_TENSOR, mf.HYPERADAM_TENSOR_UNBOUNDED, *SCALED)


def graphs(method: str) -> dict[str, onnx.ModelProto]:
    if method in TENSORWISE:
        rule = TensorwiseHyperAdam(
            bounded=method != mf.HYPERADAM_TENSOR_UNBOUNDED,
            adaptive_scale=method in SCALED,
            scale_reference="trend" if method in TREND_RULES else "step",
            anneal_rate=method == mf.HYPERADAM_TENSOR_TREND_ANNEALED,
        )
    else:
        rule = make_learned_optimizer(method)
    theta = rule.init_theta(generator(0))
    return EXPORT_METHODS[method]({k: v.numpy() for k, v in theta.items()})


@pytest.mark.parametrize("method", sorted(mf.METHODS))
def test_graphs_are_valid_standard_fp32_with_a_dynamic_coordinate_axis(method):
    models = graphs(method)
    assert set(models) == set(
        mf.METHODS[method].graphs(**{k: 20 for k in mf.METHODS[method].config_keys})
    )
    for role, model in models.items():
        onnx.checker.check_model(model, full_check=True)
        assert model.ir_version == mf.IR_VERSION <= mf.MAX_IR_VERSION
        assert [(o.domain, o.version) for o in model.opset_import] == [("", mf.OPSET)]
        assert all(node.domain == "" for node in model.graph.node)  # no com.microsoft ops
        for value in [*model.graph.input, *model.graph.output]:
            assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        dims = [d.dim_param for v in model.graph.input for d in v.type.tensor_type.shape.dim]
        assert mf.COORDS in dims, role
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        assert session.get_providers() == ["CPUExecutionProvider"]


@pytest.mark.parametrize("method", TENSORWISE)
def test_tensorwise_epsilons_are_explicit_adds(method):
    """ε = 1e-24 in M̂ (twice: M̂_{t−1} and M̂_t) and in the feature momenta, and 1e-30 inside
    rms_T (and, with the step scale, on the product of the norms in cos_T): each an Add node on
    a constant, so a zero gradient gives zeros, not NaN. The adaptive terms graph's M̂_{t−1} has
    its three; the trend variant's reads a row of feat_m and has none."""
    model = graphs(method)[mf.FUSED]
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    def adds_of(value: float) -> int:
        names = {n for n, v in consts.items() if v.size == 1 and v == np.float32(value)}
        return sum(n.op_type == "Add" and bool(set(n.input) & names) for n in model.graph.node)

    assert adds_of(MOMENT_EPS) == 2 * 3 + 1  # B + ε, Γ + ε, Ṽ + ε per M̂; v̂ + ε of the features
    assert adds_of(RMS_EPS) == 1 + (method in SCALED)
    model = graphs(method)[mf.ARRAY_TERMS]
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert adds_of(MOMENT_EPS) == (3 if method == mf.HYPERADAM_TENSOR_ADAPTIVE else 0)


def test_hyperadam_moment_epsilon_is_an_explicit_add():
    """dynamo's optimizer would delete x + 1e-24 (design §3.1); the hand-built graph keeps it."""
    for role in (mf.FUSED, mf.UPDATE_STAGE):
        model = graphs("hyperadam")[role]
        consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        eps_names = {n for n, v in consts.items() if v.size == 1 and v == np.float32(MOMENT_EPS)}
        adds = [n for n in model.graph.node if n.op_type == "Add" and set(n.input) & eps_names]
        assert len(adds) == 3, role  # B + ε, Γ + ε, Ṽ + ε
