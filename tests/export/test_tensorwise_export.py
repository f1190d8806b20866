"""Export of the tensor-wise HyperAdam variants: their θ files (``python -m meta_train.ablation``)
export through ``export_optimizer`` and ``hyperadam export``, with the parity check run on
several arrays of different sizes and gradient scales, chunked and sharded; the adaptive and
trend variants (per-tensor step scale) included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import runtime
from export import export_optimizer
from export import parity as parity_lib
from meta_train.cli import main
from meta_train.optimizers.hyperadam_tensor import TensorwiseHyperAdam
from meta_train.seeding import generator
from runtime import manifest as mf
from runtime.theta import load_theta, save_theta

ABLATION = Path(__file__).resolve().parents[2] / "checkpoints" / "ablation"
THETA_FILES = {
    "tensor-small-log": mf.HYPERADAM_TENSOR,
    "tensor-adam-start": mf.HYPERADAM_TENSOR,
    "tensor-unbounded-small-log": mf.HYPERADAM_TENSOR_UNBOUNDED,
    "tensor-adaptive-start": mf.HYPERADAM_TENSOR_ADAPTIVE,
    "tensor-adaptive-small-log-pes": mf.HYPERADAM_TENSOR_ADAPTIVE,  # trained cells: ρ sees h
    "tensor-trend-start": mf.HYPERADAM_TENSOR_TREND,
    "tensor-trend-annealed-start": mf.HYPERADAM_TENSOR_TREND_ANNEALED,
}
# The variants with the per-tensor step scale: their statistics (rms_T(g)², then the cosine's sums)
SCALED_STATISTICS = {
    mf.HYPERADAM_TENSOR_ADAPTIVE: (
        mf.TENSORWISE_ADAPTIVE_STATISTICS,
        mf.TENSORWISE_ADAPTIVE_SUMMED,
    ),
    mf.HYPERADAM_TENSOR_TREND: (mf.TENSORWISE_TREND_STATISTICS, mf.TENSORWISE_TREND_SUMMED),
    mf.HYPERADAM_TENSOR_TREND_ANNEALED: (
        mf.TENSORWISE_TREND_STATISTICS,
        mf.TENSORWISE_TREND_SUMMED,
    ),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("tensorwise")
    return {
        name: (root / name, export_optimizer(method, ABLATION / name / "theta.npz", root / name))
        for name, method in THETA_FILES.items()
    }


@pytest.mark.parametrize("name", sorted(THETA_FILES))
def test_parity_covers_arrays_chunks_and_shards(exports, name):
    folder, manifest = exports[name]
    assert manifest.method == THETA_FILES[name] == load_theta(ABLATION / name / "theta.npz").method
    assert {p.name for p in folder.iterdir()} == {
        mf.GRAPH_FILES[mf.ARRAY_TERMS],
        mf.GRAPH_FILES[mf.FUSED],
        mf.THETA_FILE,
        mf.MANIFEST_FILE,
    }
    assert manifest.default_lr == 0.003  # the variant's α (the θ files carry no lr)
    parity = manifest.parity
    assert parity["passed"] is True and parity["sizes"] == [2, 1000]
    cases = {case["case"]: case for case in parity["cases"]}
    layout = parity_lib.array_sizes(1000)
    assert layout == [500, 300, 200]
    for kind in ("random", "zero"):
        small = {f"p=2 in arrays of [1, 1] {kind}-gradient {p}" for p in ("fused", "chunked")}
        assert small <= set(cases)
        for path, chunks in (("fused", 1), ("chunked", 4), ("sharded", 8)):
            case = cases[f"p=1000 in arrays of {layout} {kind}-gradient {path}"]
            assert case["chunks"] >= chunks  # an array spans chunks; sharded: both shards
            assert case["tolerance"] == parity_lib.step_tolerance(case["fp32_vs_fp64_floor"])
    for case in parity["cases"]:
        assert case["max_error"] <= case["tolerance"], case
    assert "100-step ReLU-MLP trajectory chunked" in cases
    statistics = json.loads((folder / mf.MANIFEST_FILE).read_text())["per_array_statistics"]
    if manifest.method in SCALED_STATISTICS:
        terms, summed = SCALED_STATISTICS[manifest.method]
        assert statistics["terms"] == list(terms) and statistics["summed"] == list(summed)
        assert "log_scale" in {f.name for f in manifest.state.fields}
    else:
        assert statistics["terms"] == ["grad_sq"] and "summed" not in statistics


# One θ file of each kind of per-array statistics: the bounded variant's mean, the adaptive and
# trend variants' sums (each from its own terms graph).
PER_ARRAY_KINDS = [
    (mf.HYPERADAM_TENSOR, "tensor-small-log"),
    (mf.HYPERADAM_TENSOR_ADAPTIVE, "tensor-adaptive-start"),
    (mf.HYPERADAM_TENSOR_TREND, "tensor-trend-start"),
    (mf.HYPERADAM_TENSOR_TREND_ANNEALED, "tensor-trend-annealed-start"),
]


@pytest.mark.parametrize("method, name", PER_ARRAY_KINDS)
def test_a_broken_per_array_reduction_fails_parity(tmp_path, monkeypatch, method, name):
    """The sharded case catches a statistic that is per shard instead of per array."""
    from runtime import stepper as stepper_lib

    original = stepper_lib.Stepper._reduce

    def no_cross_shard_sum(self, partial):
        original(self, partial)  # every shard still takes part in the collective
        return partial

    monkeypatch.setattr(stepper_lib.Stepper, "_reduce", no_cross_shard_sum)
    with pytest.raises(parity_lib.ParityError, match=r"p=1000 in arrays of .* sharded"):
        export_optimizer(method, ABLATION / name / "theta.npz", tmp_path / "x", trajectory_steps=3)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method, name", PER_ARRAY_KINDS)
def test_cli_exports_a_tensorwise_theta(tmp_path, capsys, method, name):
    out = tmp_path / "tensor"
    code = main(["export", "--theta", str(ABLATION / name / "theta.npz"), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"exported {method} to" in captured.out
    assert runtime.load(out).method == method


def _edit(folder: Path, change) -> None:
    path = folder / mf.MANIFEST_FILE
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda raw: raw.update(method="hyperadam-tensor-v2"),
            r"got 'hyperadam-tensor-v2': this runtime does not know that optimizer \(variant\); "
            r"upgrade hyperadam",
        ),
        (lambda raw: raw.pop("per_array_statistics"), r"per_array_statistics None differ"),
        (
            lambda raw: raw["per_array_statistics"].update(terms=["grad_abs"]),
            r"per_array_statistics .*grad_abs.* differ from what this runtime computes",
        ),
        (lambda raw: raw.update(method="hyperadam"), r"state layout .* differs from the hyperadam"),
    ],
    ids=["unknown-variant", "no-statistics", "other-statistic", "as-paper"],
)
def test_a_runtime_refuses_a_variant_it_does_not_know(exports, tmp_path, change, message):
    folder = tmp_path / "copy"
    shutil.copytree(exports["tensor-small-log"][0], folder)
    _edit(folder, change)
    with pytest.raises(mf.ManifestError, match=message):
        runtime.load(folder)


def test_a_paper_manifest_claiming_statistics_is_refused(tmp_path):
    from meta_train.optimizers import make_learned_optimizer
    from meta_train.seeding import generator

    theta = make_learned_optimizer("hyperadam").init_theta(generator(0))
    export_optimizer("hyperadam", theta, tmp_path / "h", parity_sizes=(2,), trajectory_steps=3)
    assert "per_array_statistics" not in json.loads((tmp_path / "h" / mf.MANIFEST_FILE).read_text())
    _edit(tmp_path / "h", lambda raw: raw.update(per_array_statistics={"terms": ["grad_sq"]}))
    with pytest.raises(mf.ManifestError, match=r"differ from what this runtime computes"):
        runtime.load(tmp_path / "h")


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda raw: raw["per_array_statistics"].pop("summed"),
            r"per_array_statistics .* differ from what this runtime computes",
        ),
        (
            lambda raw: raw["per_array_statistics"].update(summed=["grad_sq"]),
            r"per_array_statistics .* differ from what this runtime computes",
        ),
        (
            lambda raw: raw.update(method=mf.HYPERADAM_TENSOR),
            r"state layout .* differs from the hyperadam-tensor layout",
        ),
    ],
    ids=["means-not-sums", "other-sums", "as-bounded"],
)
@pytest.mark.parametrize(
    "name", ["tensor-adaptive-start", "tensor-trend-start", "tensor-trend-annealed-start"]
)
def test_a_runtime_refuses_an_edited_adaptive_manifest(exports, tmp_path, change, message, name):
    """Which statistics are sums is part of the method: an edit that would average the cosine's
    sums, or run the adaptive (trend) graphs as the plain bounded variant, is refused."""
    folder = tmp_path / "copy"
    shutil.copytree(exports[name][0], folder)
    _edit(folder, change)
    with pytest.raises(mf.ManifestError, match=message):
        runtime.load(folder)


def test_trend_and_adaptive_manifests_do_not_pass_for_each_other(exports, tmp_path):
    """The two variants share the state layout and the step graph's signature; the terms graph
    (what the cosine compares g with: D from h, m, v, b, γ, or the trend row of feat_m) tells
    them apart, so a folder relabelled as the other method is refused."""
    for name, other in (("tensor-trend-start", mf.HYPERADAM_TENSOR_ADAPTIVE),
                        ("tensor-adaptive-start", mf.HYPERADAM_TENSOR_TREND)):  # fmt: skip
        folder = tmp_path / name
        shutil.copytree(exports[name][0], folder)
        _edit(folder, lambda raw, other=other: raw.update(method=other))
        with pytest.raises(mf.ManifestError, match=rf"graphs .* expects for {other} "):
            runtime.load(folder)


@pytest.mark.parametrize(
    "method",
    [mf.HYPERADAM_TENSOR_ADAPTIVE, mf.HYPERADAM_TENSOR_TREND, mf.HYPERADAM_TENSOR_TREND_ANNEALED],
)
def test_adaptive_parity_with_trained_cells(tmp_path, method):
    """The adaptive and trend start θ are Adam (ρ does not depend on h): with the trained
    bounded θ's cells and κ = 0.1, the previous direction D = Σ_j ρ_j(h) M̂_j that the adaptive
    terms graph recomputes depends on the state's h (the trend variant's reads feat_m), and the
    parity check passes fused, chunked and sharded."""
    theta = dict(load_theta(ABLATION / "tensor-small-log" / "theta.npz").theta)
    theta["scale_rate"] = np.zeros(1, np.float32)  # κ = KAPPA_MAX·σ(0) = 0.1
    if method == mf.HYPERADAM_TENSOR_TREND_ANNEALED:
        theta["scale_rate_early"] = np.full(1, 3.0, np.float32)  # κ₀ = 0.2·σ(3) ≈ 0.19
    save_theta(tmp_path / "theta.npz", method, theta)
    manifest = export_optimizer(method, tmp_path / "theta.npz", tmp_path / "adaptive")
    cases = {case["case"]: case for case in manifest.parity["cases"]}
    assert manifest.parity["passed"] is True
    for path in ("fused", "chunked", "sharded"):
        case = cases[f"p=1000 in arrays of [500, 300, 200] random-gradient {path}"]
        assert case["tolerance"] == parity_lib.step_tolerance(case["fp32_vs_fp64_floor"])
        assert case["max_error"] <= case["tolerance"]


def _rule(method: str) -> TensorwiseHyperAdam:
    return TensorwiseHyperAdam(
        bounded=method != mf.HYPERADAM_TENSOR_UNBOUNDED,
        adaptive_scale=method in SCALED_STATISTICS,
        scale_reference="trend"
        if method in (mf.HYPERADAM_TENSOR_TREND, mf.HYPERADAM_TENSOR_TREND_ANNEALED)
        else "step",
        anneal_rate=method == mf.HYPERADAM_TENSOR_TREND_ANNEALED,
    )


@pytest.mark.parametrize(
    "method",
    [mf.HYPERADAM_TENSOR, mf.HYPERADAM_TENSOR_UNBOUNDED, *SCALED_STATISTICS],
)
def test_cli_exports_an_untrained_theta(tmp_path, capsys, method):
    """``init_theta``'s θ (random cells, decay gates anywhere in (0, 1)) passes parity in every
    variant: onnxruntime's Sigmoid, accurate only to ~1e-7 absolute, once moved the moments of
    gates near 0 and the p = 2 step by 2.3e-5 (adaptive: 3.5e-3 at p = 1000)."""
    rule = _rule(method)
    theta = {k: v.numpy() for k, v in rule.init_theta(generator(0)).items()}
    save_theta(tmp_path / "theta.npz", method, theta)
    out = tmp_path / "untrained"
    code = main(["export", "--theta", str(tmp_path / "theta.npz"), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    parity = json.loads((out / mf.MANIFEST_FILE).read_text())["parity"]
    assert parity["passed"] is True
    for case in parity["cases"]:
        assert case["max_error"] <= case["tolerance"] / 10, case  # round-off, not a near miss


def test_decay_gates_near_zero_keep_the_moments_relative_accuracy(tmp_path):
    """β, γ ≈ σ(−16…−8) (1e-7…3e-4) and a zero gradient: m' = β·m and v' = γ·v carry the
    gates' relative error, which M̂ = m̃/√ṽ passes on to the step. The runtime's m', v' match
    the fp32 reference per coordinate and column to a few ulp (a Sigmoid accurate to 1.4e-7
    absolute was up to several hundred per cent off there)."""
    import torch

    rule = _rule(mf.HYPERADAM_TENSOR)
    theta = rule.init_theta(generator(0))
    j = theta["weight_bias"].shape[0]
    theta["decay_kernel"] = torch.zeros(2 * j, 2 * j)
    theta["decay_bias"] = torch.linspace(-16.0, -8.0, 2 * j)
    export_optimizer(
        mf.HYPERADAM_TENSOR, theta, tmp_path / "gates", parity_sizes=(2,), trajectory_steps=3
    )
    opt = runtime.load(tmp_path / "gates", threads=1)
    rng = np.random.default_rng(3)
    sizes = [60, 40]
    state = parity_lib.random_state(rule, sum(sizes), rng, sizes)
    zero = [np.zeros(n, np.float32) for n in sizes]
    w, got, _ = parity_lib._runtime_step(
        opt, parity_lib.to_runtime_state(opt.manifest.state, state), zero, opt.default_lr, 32
    )
    with torch.no_grad():
        delta, want = rule.step(theta, torch.zeros(sum(sizes)), state, lr=opt.default_lr)
    for name in ("m", "v"):
        np.testing.assert_allclose(got[name], getattr(want, name).numpy(), rtol=1e-6, atol=0)
    assert parity_lib.relative_error(w, delta.numpy()) < parity_lib.STEP_TOLERANCE


def test_an_annealed_theta_exported_at_a_constant_rate_fails_parity(tmp_path, monkeypatch):
    """The annealed rate lives in the step graph only (same state, same statistics as the trend
    variant): graphs built at the constant rate κ fail the export's parity check."""
    from functools import partial

    from export import methods
    from export.tensorwise_graphs import build_tensorwise_graphs

    constant = partial(
        build_tensorwise_graphs, bounded=True, adaptive=True, scale_reference="trend"
    )
    monkeypatch.setitem(methods.EXPORT_METHODS, mf.HYPERADAM_TENSOR_TREND_ANNEALED, constant)
    theta = ABLATION / "tensor-trend-annealed-start" / "theta.npz"
    with pytest.raises(parity_lib.ParityError):
        export_optimizer(mf.HYPERADAM_TENSOR_TREND_ANNEALED, theta, tmp_path / "x")
    assert not (tmp_path / "x").exists()
