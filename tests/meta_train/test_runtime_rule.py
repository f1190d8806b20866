"""The runtime engine: an exported optimizer as an ``UpdateRule`` (``meta_train.runtime_rule``)
and ``hyperadam benchmark --engine runtime``, against the torch reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from export import export_optimizer
from meta_train import cli
from meta_train.benchmark import (
    RUNTIME_SUFFIX,
    BenchmarkConfig,
    describe_optimizer,
    make_rule,
    run_benchmark,
)
from meta_train.errors import UsageError
from meta_train.runtime_rule import ExportedRule
from meta_train.theta_source import load_theta_source
from runtime.theta import load_theta, save_theta

ROOT = Path(__file__).resolve().parents[2]
# A trained tensor-wise θ with the adaptive step scale: per-array statistics, three of them
# summed, and state beyond the moments — the most the runtime has to get right.
ADAPTIVE_THETA = ROOT / "checkpoints" / "ablation" / "tensor-adaptive-small-log-pes" / "theta.npz"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export") / "adaptive"
    export_optimizer(load_theta(ADAPTIVE_THETA).method, ADAPTIVE_THETA, folder)
    return folder


def test_the_runtime_rule_steps_like_the_reference_per_tensor(exported):
    optimizer, theta = load_theta_source(ADAPTIVE_THETA)
    sizes = [300, 7, 1, 120]
    reference = optimizer.bind(theta).for_tensors(sizes)
    rule = ExportedRule(exported).for_tensors(sizes)
    assert rule.lr == reference.lr
    ref_state, state = reference.init(sum(sizes)), rule.init(sum(sizes))
    rng = np.random.default_rng(0)
    for t in range(8):
        # Tensors at scales 1e-4 … 1e2: per-tensor statistics, not global ones, set each step.
        scales = np.repeat([1e-4, 1.0, 10.0, 1e2], sizes)
        grad = torch.from_numpy((rng.standard_normal(sum(sizes)) * scales).astype(np.float32))
        with torch.no_grad():
            expected, ref_state = reference.update(grad, ref_state)
        delta, state = rule.update(grad, state)
        error = (delta - expected).abs().max() / expected.abs().max()
        assert float(error) < 1e-5, (t, float(error))


def test_a_nonfinite_gradient_gives_a_nan_delta_and_a_bad_layout_an_error(exported):
    rule = ExportedRule(exported).for_tensors([3, 2])
    state = rule.init(5)
    delta, state = rule.update(torch.tensor([1.0, float("nan"), 0.0, 1.0, 2.0]), state)
    assert torch.isnan(delta).all()  # the benchmark's divergence check sees it
    with pytest.raises(ValueError, match="sum to 5, but the task has 6"):
        rule.init(6)
    with pytest.raises(ValueError, match="runs on the CPU"):
        ExportedRule(exported).init(4, device="meta")


def test_runtime_results_are_labelled_apart_from_the_references(exported):
    reference = describe_optimizer(str(ADAPTIVE_THETA))
    through_runtime = describe_optimizer(str(ADAPTIVE_THETA), folder=str(exported))
    assert through_runtime.label == reference.label + RUNTIME_SUFFIX
    assert through_runtime.identity == reference.identity + RUNTIME_SUFFIX  # never merged as one
    config = BenchmarkConfig((str(ADAPTIVE_THETA),), runs=2, engine="runtime", quick=True)
    with pytest.raises(UsageError, match="needs it exported first"):
        run_benchmark(config, progress=lambda _: None)
    with pytest.raises(UsageError, match="--engine must be one of"):
        BenchmarkConfig(("hyperadam",), engine="onnx")


@pytest.mark.slow  # exports a θ and runs two quick tasks (≈ 20 s)
def test_benchmark_engine_runtime_end_to_end(tmp_path):
    out = tmp_path / "docs"
    tasks = ["rescnn-bn-mnist14-100", "leastsq-cond1e6-10000"]
    code = cli.main(["benchmark", "--quick", "--engine", "runtime", "--tasks", *tasks,
                     "--optimizer", "hyperadam", str(ADAPTIVE_THETA), "--out", str(out),
                     "--tracking-uri", "none"])  # fmt: skip
    assert code == 0
    report = json.loads((out / "generalisation.json").read_text())
    assert report["config"]["engine"] == "runtime"
    labels = set(report["optimizers"])
    theta_label = describe_optimizer(str(ADAPTIVE_THETA)).label + RUNTIME_SUFFIX
    assert labels == {"hyperadam" + RUNTIME_SUFFIX, theta_label}
    for key in tasks:
        results = report["tasks"][key]["results"]
        assert set(results) == {"adam"} | labels
        assert all(np.isfinite(results[theta_label]["final_losses"]))


def test_the_runtime_engine_steps_at_the_references_lr_and_binds_without_reloading(tmp_path):
    # A θ file whose ``lr`` meta differs from its method's default: its export's manifest
    # says that lr, the reference runs at the method's; the benchmark's runtime cell must run
    # at the reference's, or "θ@digest/ort" would not be the same θ asked the same thing.
    artifact = load_theta(ADAPTIVE_THETA)
    theta = tmp_path / "lr-meta.npz"
    save_theta(theta, artifact.method, artifact.theta, lr=0.01)
    folder = tmp_path / "export"
    export_optimizer(artifact.method, theta, folder)
    reference = make_rule(describe_optimizer(str(theta)), None)
    exported = make_rule(describe_optimizer(str(theta), folder=str(folder)), None)
    assert reference.lr != 0.01 and exported.lr == reference.lr
    assert make_rule(describe_optimizer(str(theta), folder=str(folder)), 0.02).lr == 0.02
    bound = exported.for_tensors([3, 4])
    assert bound._optimizer is exported._optimizer and bound.tensor_sizes == [3, 4]
    assert exported.tensor_sizes is None  # the unbound rule is left as it was
