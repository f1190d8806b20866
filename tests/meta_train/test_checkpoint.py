"""Checkpoints and θ artifacts: exact round trip, atomic writes, refusal of damaged files."""

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from meta_train import checkpoint as ckpt
from meta_train.checkpoint import BestTheta, Checkpoint, CheckpointError, History
from meta_train.learner import LearnerState
from meta_train.optimizers.hyperadam import HyperAdam
from meta_train.worker import TrajectoryArrays

RNG = np.random.default_rng(0)


def sample_checkpoint() -> Checkpoint:
    fields = ("h", "c", "m", "v", "b", "gamma")
    trajectory = TrajectoryArrays(
        seed=123,
        step=40,
        params=RNG.standard_normal(7).astype(np.float32),
        state=tuple(RNG.standard_normal((7, 4)).astype(np.float32) for _ in fields),
        state_fields=fields,
    )
    learner = LearnerState(
        step=12,
        theta=RNG.standard_normal(30).astype(np.float32),
        adam={
            "step": np.array(12.0, dtype=np.float32),
            "exp_avg": RNG.standard_normal(30).astype(np.float32),
            "exp_avg_sq": RNG.random(30).astype(np.float32),
        },
        trajectories=(trajectory, None),
        rejected_total=2,
        worker_restarts=1,
        versions=((), (10, 11)),
        theta_history={10: RNG.standard_normal(30).astype(np.float32),
                       11: RNG.standard_normal(30).astype(np.float32)},
        stale_rejected_total=3,
    )
    history = History((0.5, 0.4, float("nan")), (10,), (2.25,))
    best = BestTheta(10, 2.25, RNG.standard_normal(30).astype(np.float32))
    return Checkpoint({"seed": 0, "optimizer": "hyperadam"}, learner, history, best, "run1", "d")


def assert_same(a: Checkpoint, b: Checkpoint) -> None:
    assert a.config == b.config and a.run_id == b.run_id and a.family_digest == b.family_digest
    assert a.step == b.step
    assert np.array_equal(a.learner.theta, b.learner.theta)
    assert a.learner.adam.keys() == b.learner.adam.keys()
    for key in a.learner.adam:
        assert np.array_equal(a.learner.adam[key], b.learner.adam[key])
        assert a.learner.adam[key].dtype == b.learner.adam[key].dtype
    ta, tb = a.learner.trajectories[0], b.learner.trajectories[0]
    assert (ta.seed, ta.step, ta.state_fields) == (tb.seed, tb.step, tb.state_fields)
    assert np.array_equal(ta.params, tb.params)
    assert all(np.array_equal(x, y) for x, y in zip(ta.state, tb.state, strict=True))
    assert b.learner.trajectories[1] is None
    assert (a.learner.rejected_total, a.learner.worker_restarts) == (2, 1)
    assert a.learner.versions == b.learner.versions
    assert a.learner.stale_rejected_total == b.learner.stale_rejected_total
    assert a.learner.theta_history.keys() == b.learner.theta_history.keys()
    for version, theta in a.learner.theta_history.items():
        assert np.array_equal(theta, b.learner.theta_history[version])
    np.testing.assert_array_equal(a.history.meta_loss, b.history.meta_loss)
    assert a.history.validation_steps == b.history.validation_steps
    assert (a.best.step, a.best.loss) == (b.best.step, b.best.loss)
    assert np.array_equal(a.best.theta, b.best.theta)


def test_round_trip_is_exact(tmp_path):
    original = sample_checkpoint()
    path = ckpt.save(tmp_path / ckpt.checkpoint_name(12), original)
    assert path.name == "step-00000012.ckpt" and ckpt.step_of(path.name) == 12
    assert_same(original, ckpt.load(path))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def damage_truncate(data: bytes) -> bytes:
    return data[: len(data) - 100]


def damage_flip_payload_byte(data: bytes) -> bytes:
    i = len(data) - 500
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]


def damage_header_version(data: bytes) -> bytes:
    return data.replace(b'"version": 2', b'"version": 9', 1)


def damage_magic(data: bytes) -> bytes:
    return b"PK" + data[2:]


def damage_header_json(data: bytes) -> bytes:
    return data.replace(b'"format"', b'"form\x00t"', 1)


def damage_header_format(data: bytes) -> bytes:
    return data.replace(b'"hyperadam-checkpoint"', b'"hyperadam-checkpoinX"', 1)


def damage_empty(data: bytes) -> bytes:
    return data[:10]


@pytest.mark.parametrize(
    "damage, message",
    [
        (damage_truncate, r"is truncated or altered: expected \d+ payload bytes, found \d+"),
        (damage_flip_payload_byte, r"is corrupt: payload sha256 [0-9a-f]+ does not match"),
        (damage_header_version, r"has format version 9; this hyperadam reads version 1 and 2"),
        (damage_magic, r"is not a hyperadam checkpoint \(bad magic bytes\)"),
        (damage_header_json, r"is altered: its header is not valid JSON"),
        (damage_header_format, r"is not a hyperadam-checkpoint file"),
        (damage_empty, r"is not a hyperadam checkpoint"),
    ],
    ids=["truncated", "flipped-byte", "version", "magic", "header-json", "format", "empty"],
)
def test_damaged_checkpoints_are_refused(tmp_path, damage, message):
    path = ckpt.save(tmp_path / "c.ckpt", sample_checkpoint())
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message):
        ckpt.load(path)


def test_a_pickled_array_is_refused_even_with_a_matching_hash(tmp_path):
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array([{"evil": 1}], dtype=object))
    payload = buffer.getvalue()
    header = json.dumps(
        {
            "format": ckpt.FORMAT,
            "version": ckpt.VERSION,
            "payload_bytes": len(payload),
            "payload_sha256": __import__("hashlib").sha256(payload).hexdigest(),
        }
    ).encode()
    data = ckpt.MAGIC + ckpt._HEADER_LEN.pack(len(header)) + header + payload
    with pytest.raises(CheckpointError, match="is malformed: ValueError: Object arrays"):
        ckpt.decode(data)


def test_a_crash_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = ckpt.save(tmp_path / "c.ckpt", sample_checkpoint())
    before = path.read_bytes()

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_write_bytes(path, b"half a checkpoint")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]


def test_theta_artifact_is_written_in_the_export_format(tmp_path):
    from export.theta_io import load_theta

    optimizer = HyperAdam(num_candidates=4)
    theta = RNG.standard_normal(optimizer.num_meta_parameters()).astype(np.float32)
    path = ckpt.save_theta(
        tmp_path / "theta" / ckpt.THETA_FILE, optimizer=optimizer, theta=theta, lr=None,
        lineage={"mlflow_run_id": "r", "step": 3},
    )
    artifact = load_theta(path)
    assert artifact.method == "hyperadam"
    assert artifact.meta == {"mlflow_run_id": "r", "step": 3, "lr": 0.005, "num_candidates": 4}
    assert list(artifact.theta) == list(optimizer.theta_shapes())
    flat = np.concatenate([artifact.theta[name].reshape(-1) for name in optimizer.theta_shapes()])
    assert np.array_equal(flat, theta)


def test_history_keeps_one_value_per_step():
    history = History().with_step(0, 1.0).with_step(1, 0.9).with_step(1, 0.8)
    assert history.meta_loss == (1.0, 0.8)
    history = history.with_validation(5, 2.0).with_validation(10, 1.5).with_validation(5, 1.9)
    assert history.validation_steps == (5,) and history.validation_loss == (1.9,)


REPO_CHECKPOINTS = sorted((Path(__file__).parents[2] / "checkpoints").glob("*.ckpt"))


@pytest.mark.parametrize("path", REPO_CHECKPOINTS, ids=lambda p: p.name)
def test_format_1_checkpoints_load_with_their_trajectories_as_replay_bases(path):
    """The repository's checkpoints stored every slot's trajectory (format 1)."""
    from meta_train.learner import _check_replay_records
    from meta_train.run_config import RunConfig

    loaded = ckpt.load(path)
    config = RunConfig.from_dict(loaded.config)
    assert loaded.learner.versions == () and loaded.learner.theta_history == {}
    mid_trajectory = loaded.step % config.unroll.truncations_per_trajectory != 0
    assert all((t is not None) == mid_trajectory for t in loaded.learner.trajectories)
    _check_replay_records(loaded.learner, config)  # what the learner checks before resuming


@pytest.mark.slow  # a real Ray cluster and workers
def test_a_learner_checkpoint_holds_no_optimizee_or_optimizer_state(ray_address, tmp_path):
    """HyperAdam (J = 20) on a 2 000-dimensional quadratic, stopped mid-trajectory."""
    import dataclasses

    from meta_train.learner import Learner
    from meta_train.run_config import build_config

    config = dataclasses.replace(
        build_config({"task": "quadratic", "family": {"dim": 2000}, "meta_batch": 2,
                      "unroll": {"horizon": 6, "truncation": 2}, "validation": {"every": 0}}),
        workers=1,
    )
    learner = Learner(config)
    try:
        learner.run(2)
    finally:
        learner.close()
    path = ckpt.save(tmp_path / "c.ckpt", Checkpoint(config.to_dict(), learner.state()))
    _, payload = ckpt._verified_payload(path.read_bytes(), "c", ckpt.FORMAT, (ckpt.VERSION,))
    with np.load(io.BytesIO(payload)) as npz:
        sizes = {name: npz[name].size for name in npz.files}
    theta_size = sizes["theta"]
    assert theta_size == 5380 and not any(name.startswith("slot/") for name in sizes)
    assert {name for name in sizes if name.startswith("theta_history/")} == {
        "theta_history/0", "theta_history/1"}
    assert max(sizes.values()) <= theta_size  # nothing of size p·J (40 000 per state tensor)
    assert path.stat().st_size < 10 * 4 * theta_size


@pytest.mark.parametrize("where", ["theta", "adam", "best"])
def test_a_non_finite_theta_or_adam_state_is_refused(tmp_path, where):
    """A NaN θ would train to "finished" with every meta-gradient rejected: refused at load,
    even when the file's hash is consistent."""
    import dataclasses

    good = sample_checkpoint()
    learner, best = good.learner, good.best
    if where == "theta":
        theta = learner.theta.copy()
        theta[3] = np.nan
        learner = dataclasses.replace(learner, theta=theta)
    elif where == "adam":
        moment = learner.adam["exp_avg"].copy()
        moment[:2] = np.inf
        learner = dataclasses.replace(learner, adam={**learner.adam, "exp_avg": moment})
    else:
        best = BestTheta(best.step, best.loss, np.full_like(best.theta, np.nan))
    path = ckpt.save(tmp_path / "bad.ckpt", dataclasses.replace(good, learner=learner, best=best))
    key = {"theta": "'theta'", "adam": "'adam/exp_avg'", "best": "'best/theta'"}[where]
    count = {"theta": 1, "adam": 2, "best": 30}[where]
    with pytest.raises(CheckpointError, match=rf"holds {count} non-finite values in {key}"):
        ckpt.load(path)
