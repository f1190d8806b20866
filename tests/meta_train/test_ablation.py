"""An ablation arm: trained for its wall-time budget, its θ file and MLflow run say what it was."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from mlflow import MlflowClient

from meta_train.ablation import ARMS, LEVER_BUNDLES, ArmConfig, main, train_arm
from meta_train.experimental import EstimatorConfig, HorizonConfig
from meta_train.run_config import build_config, config_digest, load_config_file
from meta_train.theta_source import load_theta_source
from meta_train.training import init_theta_flat
from runtime.theta import load_theta, save_theta


def test_an_arm_logs_its_whole_config_and_seed_and_saves_a_loadable_theta(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    arm = ArmConfig("probe", horizon=20, truncation=10, meta_batch=2, seed=3)
    summary = train_arm(arm, minutes=0.01, out=tmp_path / "runs", tracking_uri=uri)
    assert summary["updates"] >= 1
    artifact = load_theta(tmp_path / "runs" / "probe" / "theta.npz")
    assert artifact.method == "hyperadam-tensor"
    assert artifact.meta["arm"]["seed"] == 3 and artifact.meta["updates"] == summary["updates"]
    optimizer, theta = load_theta_source(tmp_path / "runs" / "probe" / "theta.npz")
    assert optimizer.name == "hyperadam-tensor" and set(theta) == set(optimizer.theta_shapes())
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(artifact.meta["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert json.loads(run.data.params["seed"]) == 3
    assert json.loads(run.data.params["variant"]) == "tensor"
    assert json.loads(run.data.params["family_config"])["family"] == "small"


LEVERS = (
    "variant", "family", "meta_loss", "init", "estimator", "log_uniform_horizons", "frozen"
)  # fmt: skip


def test_every_arm_is_one_lever_from_an_arm_it_is_compared_with():
    # Each arm is compared with an arm that differs in one lever (PES with truncated BPTT on
    # the same horizons and variant; a variant's arms with its base), and every arm reaches
    # the first through such steps: each table row isolates one lever (a declared bundle,
    # changed together by design, counts as one).
    def levers_apart(a, b) -> int:
        apart = {f for f in LEVERS if getattr(a, f) != getattr(b, f)}
        for bundle in LEVER_BUNDLES:
            if set(bundle) <= apart:
                apart -= set(bundle[1:])
        return len(apart)

    reached, frontier = {"tensor-small-log"}, ["tensor-small-log"]
    while frontier:
        arm = ARMS[frontier.pop()]
        for other in ARMS.values():
            if other.name not in reached and levers_apart(arm, other) == 1:
                reached.add(other.name)
                frontier.append(other.name)
    assert reached == set(ARMS)
    assert {arm.estimator for arm in ARMS.values()} == {"tbptt", "pes"}
    # The estimator is compared where PES came in: each such PES arm has a truncated-BPTT twin
    # (the same horizons and variant). A later PES arm changes one other lever of a PES arm
    # (e.g. the trend variant, its longer horizons), which the chain below traces back to one
    # with a twin.
    pes_arms = [arm for arm in ARMS.values() if arm.estimator == "pes"]

    def has_twin(pes) -> bool:
        tbptt = dataclasses.replace(
            pes, estimator="tbptt", sigma=ArmConfig.sigma, pairs=ArmConfig.pairs
        )  # σ and the pairs are PES's own settings
        return any(levers_apart(tbptt, arm) == 0 for arm in ARMS.values())

    compared = {arm.name for arm in pes_arms if has_twin(arm)}
    assert compared, "no PES arm is compared with truncated BPTT"
    grown = True
    while grown:
        later = {
            arm.name
            for arm in pes_arms
            if arm.name not in compared
            and any(levers_apart(arm, ARMS[name]) == 1 for name in compared)
        }
        compared |= later
        grown = bool(later)
    assert compared == {arm.name for arm in pes_arms}


def test_an_arm_is_the_run_config_that_hyperadam_meta_train_takes(tmp_path):
    pes = ARMS["tensor-small-log-pes"]
    config = pes.run_config()
    assert (config.task, config.experimental.variant, config.unroll.meta_loss) == (
        "small", "tensor", "log"
    )
    assert config.experimental.estimator == EstimatorConfig("pes", sigma=0.01, pairs=1)
    assert config.experimental.horizons == HorizonConfig(
        "log_uniform", min_steps=100, max_steps=2000, offsets=True
    )
    assert config.experimental.adam_start.lr == config.make_optimizer().default_lr
    path = tmp_path / "pes.json"
    assert main(["--arm", pes.name, "--write-config", str(path)]) == 0
    assert build_config(load_config_file(path)) == config
    paper = ARMS["tensor-paperfamily-log"].run_config()
    assert paper.task == "mnist" and paper.experimental.estimator.kind == "tbptt"


def test_a_pes_arm_with_log_uniform_horizons_trains(tmp_path):
    arm = ArmConfig("pes-probe", truncation=5, horizon=10, meta_batch=2, seed=1,
                    estimator="pes", sigma=0.05, pairs=2, log_uniform_horizons=(5, 40))
    summary = train_arm(arm, minutes=0.02, out=tmp_path / "runs", tracking_uri=None)
    assert summary["updates"] >= 1
    artifact = load_theta(tmp_path / "runs" / "pes-probe" / "theta.npz")
    assert artifact.meta["arm"]["estimator"] == "pes"
    assert artifact.meta["config_digest"] == config_digest(arm.run_config())
    optimizer, config = arm.run_config().make_optimizer(), arm.run_config()
    start = init_theta_flat(optimizer, 1, experimental=config.experimental)
    trained = optimizer.flatten({k: torch.from_numpy(v) for k, v in artifact.theta.items()})
    assert not torch.equal(trained, start)  # θ moved


@pytest.mark.parametrize(
    ("suffix", "trained"),
    [
        ("schedule-decays", {"decay_bias", "weight_bias", "scale_rate", "scale_rate_early"}),
        ("decays", {"decay_bias", "scale_rate", "scale_rate_early"}),
    ],
)
def test_the_decay_arms_train_constants_the_cells_cannot_move_per_coordinate(suffix, trained):
    arm = ARMS[f"tensor-trend-annealed-wide-log-pes10k-{suffix}"]
    config = arm.run_config()
    optimizer = config.make_optimizer()
    assert set(optimizer.theta_shapes()) - set(arm.frozen) == trained
    start = optimizer.unflatten(init_theta_flat(optimizer, 1, experimental=config.experimental))
    # Frozen at 0, the kernels leave the decay rates σ(decay_bias) and the weights ρ(weight_bias)
    # the same in every coordinate, whatever the cells compute.
    assert not start["decay_kernel"].any() and not start["weight_kernel"].any()
    schedule = ARMS["tensor-trend-annealed-wide-log-pes10k-schedule"]
    assert dataclasses.replace(arm, name=schedule.name, frozen=schedule.frozen) == schedule


def test_an_arm_started_from_a_theta_file_starts_exactly_there_and_refuses_a_changed_file(
    tmp_path, monkeypatch, capsys
):
    arm = ARMS["tensor-trend-annealed-wide-log-pes10k-cells-from-decays"]
    config = arm.run_config()
    assert config.init.kind == "theta" and config.experimental.adam_start is None
    assert config.init.theta_sha256 == arm.start_theta_sha256
    optimizer = config.make_optimizer()
    start = init_theta_flat(optimizer, 7, config.init, config.experimental)
    _, given = load_theta_source(arm.start_theta)
    assert torch.equal(start, optimizer.flatten(given))  # no Adam reduction on top
    # The file the arm names must still be the bytes it was pinned to.
    artifact = load_theta(arm.start_theta)
    changed = {**artifact.theta, "scale_rate": artifact.theta["scale_rate"] * 2}
    save_theta(tmp_path / "changed.npz", artifact.method, changed)
    moved = dataclasses.replace(arm, start_theta=str(tmp_path / "changed.npz"))
    with pytest.raises(ValueError, match="has changed"):
        init_theta_flat(optimizer, 7, moved.run_config().init, config.experimental)
    # Run from elsewhere, the command says where the start is expected, before training.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--arm", arm.name, "--minutes", "1", "--out", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    assert "run it from the repository root" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    # The paper-weighted arm differs from it in the family's weights only.
    paper = ARMS["tensor-trend-annealed-widepaper-log-pes10k-cells-from-decays"]
    assert dataclasses.replace(paper, name=arm.name, family=arm.family) == arm
    assert paper.run_config().family.model_weights != config.family.model_weights
    # The deep arm differs from the paper-weighted one in the 28×28 MLPs' depth only.
    deep = ARMS["tensor-trend-annealed-widepaperdeep-log-pes10k-cells-from-decays"]
    assert dataclasses.replace(deep, name=paper.name, family=paper.family) == paper
    deep_family, paper_family = deep.run_config().family, paper.run_config().family
    assert dataclasses.replace(deep_family, mnist28_max_depth=3) == paper_family
    assert deep_family.mnist28_max_depth == 10
    # The directions arm differs from the deep one in ρ's kernel, frozen, only.
    directions = ARMS["tensor-trend-annealed-widepaperdeep-log-pes10k-directions-from-decays"]
    assert dataclasses.replace(directions, name=deep.name, frozen=deep.frozen) == deep
    assert set(directions.frozen) - set(deep.frozen) == {"weight_kernel"}
    # The excess arm differs from the deep one in how the family scores its convex problems.
    excess = ARMS["tensor-trend-annealed-widepaperdeepexcess-log-pes10k-cells-from-decays"]
    assert dataclasses.replace(excess, name=deep.name, family=deep.family) == deep
    excess_family = excess.run_config().family
    assert dataclasses.replace(excess_family, convex_excess_floor=None) == deep_family
    assert excess_family.convex_excess_floor == 1e-5


def test_bad_arms_are_refused():
    with pytest.raises(ValueError, match="variant"):
        ArmConfig("x", variant="nope")
    with pytest.raises(ValueError, match="truncation"):
        ArmConfig("x", horizon=30, truncation=20)
    with pytest.raises(ValueError, match="estimator must be one of"):
        ArmConfig("x", estimator="es")
    with pytest.raises(ValueError, match="sigma and pairs apply to estimator 'pes' only"):
        ArmConfig("x", sigma=0.1)
    with pytest.raises(ValueError, match="experimental.estimator.pairs must be an integer >= 1"):
        ArmConfig("x", estimator="pes", pairs=0)
    with pytest.raises(ValueError, match=r"no multiple of unroll.truncation \(20\)"):
        ArmConfig("x", log_uniform_horizons=(5, 15))
    with pytest.raises(ValueError, match="init 'theta' needs start_theta"):
        ArmConfig("x", init="theta")
    with pytest.raises(ValueError, match="init 'theta' needs start_theta"):
        ArmConfig("x", start_theta="theta.npz", start_theta_sha256="0" * 64)
    with pytest.raises(ValueError, match="init 'theta' needs start_theta"):
        ArmConfig("x", init="theta", start_theta="theta.npz")
    with pytest.raises(ValueError, match="theta_sha256 must be 64 lowercase hex"):
        ArmConfig("x", init="theta", start_theta="theta.npz", start_theta_sha256="abc")


def test_snapshots_are_saved_on_the_wall_clock_and_load_like_the_final_theta(tmp_path):
    arm = ArmConfig("probe", horizon=20, truncation=10, meta_batch=2)
    summary = train_arm(
        arm, minutes=0.05, out=tmp_path, tracking_uri=None, snapshot_minutes=0.01
    )
    snapshots = sorted((tmp_path / "probe" / "snapshots").glob("theta-*.npz"))
    assert len(snapshots) >= 2  # every 0.6 s over 3 s
    updates = [load_theta(path).meta["updates"] for path in snapshots]
    assert updates == sorted(updates) and updates[-1] <= summary["updates"]
    assert [int(path.stem.split("-")[1]) for path in snapshots] == updates
    for path in snapshots:
        optimizer, theta = load_theta_source(path)
        assert set(theta) == set(optimizer.theta_shapes())


@pytest.mark.parametrize("minutes", [0.0, -1.0, float("nan")])
def test_a_snapshot_period_that_is_not_positive_is_refused(tmp_path, minutes):
    with pytest.raises(ValueError, match="snapshot_minutes"):
        train_arm(ARMS["tensor-small-log"], minutes=0.01, out=tmp_path, snapshot_minutes=minutes)
    assert not (tmp_path / "tensor-small-log").exists()
