"""export.registry and export.promotion: log → register → promote → load by alias, on sqlite and
on a real server."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import torch

import runtime
from export import export_optimizer, promotion, registry
from meta_train.optimizers import HyperAdam
from meta_train.seeding import generator
from meta_train.tasks.suite import TEST_TASKS
from runtime import manifest as mf
from runtime import sources

EXPERIMENT = "hyperadam-tests"  # made by the tracking_uri fixture, artifacts under tmp_path
TASK = "mnist-nn-relu-100"  # held out: not the sigmoid MLP of meta-training
ADAM_LR = TEST_TASKS[TASK].adam_lr
QUICK = {"tasks": [TASK], "runs": 1, "steps": 5}  # a promotion in ~1 s once MNIST is loaded
LINEAGE = {
    "mlflow_run_id": None,  # filled with the test's run
    "step": 40,
    "task_digest": "d" * 64,
    "config_digest": "c" * 64,
}


def adam_theta() -> dict:
    """θ whose HyperAdam step is Adam(β1 = 0.9, β2 = 0.999) (spec §2.2, test_adam_reduction)."""
    theta = HyperAdam().init_theta(generator(0))
    theta["decay_kernel"].zero_()
    theta["decay_bias"] = torch.cat(
        [torch.full((20,), math.log(0.9 / 0.1)), torch.full((20,), math.log(0.999 / 0.001))]
    )
    theta["weight_kernel"].zero_()
    theta["weight_bias"] = torch.zeros(20)
    theta["weight_bias"][0] = 1.0
    return theta


def export_and_log(client, run_id, folder, theta, **kwargs):
    export_optimizer(
        "hyperadam",
        theta,
        folder,
        lineage={**LINEAGE, "mlflow_run_id": run_id},
        parity_sizes=(2,),
        trajectory_steps=2,
        **kwargs,
    )
    return registry.log_exported(client, run_id, folder)


def same_files(a, b) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def new_run(client) -> str:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
    return client.create_run(experiment_id).info.run_id


def check_round_trip(uri, tmp_path, monkeypatch):
    """Export → log → register → download by alias and by version → runtime.load by alias."""
    client = registry.make_client(uri)
    run_id = new_run(client)
    folder = tmp_path / "adam"
    # Adam at the task's tuned lr: promotion ties with Adam and passes a 1.01 gate.
    logged = export_and_log(client, run_id, folder, adam_theta(), default_lr=ADAM_LR)
    version = registry.register(client, "opt", logged)
    assert str(version.version) == "1" and version.aliases == [registry.CANDIDATE]
    tags = version.tags
    assert tags["method"] == "hyperadam" and tags["J"] == "20" and tags["opset"] == "18"
    assert float(tags["parity.max_error.step"]) <= 2e-5 and tags["parity.passed"] == "True"
    assert tags["lineage.mlflow_run_id"] == run_id and tags["lineage.step"] == "40"
    assert tags["lineage.task_digest"] == "d" * 64 and tags["lineage.config_digest"] == "c" * 64
    assert tags["manifest_sha256"] == mf.sha256_file(folder / mf.MANIFEST_FILE)
    requirements = client.download_artifacts(
        run_id, f"{logged.artifact_path}/requirements.txt", str(tmp_path)
    )
    assert Path(requirements).read_text().split() == ["numpy>=1.24", "onnxruntime>=1.20"]

    # Nothing temporary survives a download: not in the system temp folder, not in the cache.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    cache = tmp_path / "cache"
    got = registry.download("models:/opt@candidate", tracking_uri=uri, cache_dir=cache)
    assert got == cache / "opt" / "1" and same_files(got, folder)
    assert registry.download("models:/opt/1", tracking_uri=uri, cache_dir=cache) == got
    assert [p.name for p in (cache / "opt").iterdir()] == ["1"] and not any(scratch.iterdir())
    explicit = registry.download(logged.uri, tmp_path / "explicit", tracking_uri=uri)
    assert same_files(explicit, folder)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(sources.CACHE_ENV, str(cache))
    assert runtime.load("models:/opt@candidate").folder == got
    return client, folder


def test_round_trip_and_promotion_on_sqlite(tracking_uri, tmp_path, monkeypatch):
    client, _ = check_round_trip(tracking_uri, tmp_path, monkeypatch)
    result = promotion.promote(
        tracking_uri, "opt", 1, gate=1.01, cache_dir=tmp_path / "cache", **QUICK
    )
    assert result.passed
    assert str(client.get_model_version_by_alias("opt", "champion").version) == "1"


@pytest.mark.slow  # starts an `mlflow server` (≈ 15 s)
def test_round_trip_and_promotion_on_a_real_server(mlflow_server, tmp_path, monkeypatch):
    client, _ = check_round_trip(mlflow_server.url, tmp_path, monkeypatch)
    result = promotion.promote(
        mlflow_server.url, "opt", 1, gate=1.01, cache_dir=tmp_path / "cache", **QUICK
    )
    assert result.passed
    assert str(client.get_model_version_by_alias("opt", "champion").version) == "1"
    evaluation = client.get_run(result.evaluation_run_id)
    assert evaluation.data.tags["hyperadam.gate_passed"] == "True"
    # Artifacts went through the server's proxy into its --artifacts-destination.
    assert any((mlflow_server.root / "artifacts").rglob(mf.MANIFEST_FILE))


def test_gate_moves_champion_for_a_tie_with_adam_and_not_for_random_theta(tracking_uri, tmp_path):
    client = registry.make_client(tracking_uri)
    run_id = new_run(client)
    tie = export_and_log(client, run_id, tmp_path / "tie", adam_theta(), default_lr=ADAM_LR)
    rand = export_and_log(client, run_id, tmp_path / "rand", HyperAdam().init_theta(generator(1)))
    assert str(registry.register(client, "opt", tie).version) == "1"
    assert str(registry.register(client, "opt", rand).version) == "2"
    cache = tmp_path / "cache"

    passed = promotion.promote(tracking_uri, "opt", 1, gate=1.01, cache_dir=cache, **QUICK)
    assert passed.passed and passed.champion_before is None and passed.champion_after == 1
    (tie_cmp,) = passed.comparisons
    assert tie_cmp.candidate_lr == ADAM_LR == tie_cmp.adam_lr
    assert abs(tie_cmp.ratio - 1) < 0.01  # Adam up to ε placement and fp32 β

    failed = promotion.promote(tracking_uri, "opt", 2, gate=1.01, cache_dir=cache, **QUICK)
    assert not failed.passed and failed.champion_after == 1 and failed.mean_ratio > 1.01
    assert str(client.get_model_version_by_alias("opt", "champion").version) == "1"

    rows = registry.list_versions(client, "opt")
    assert [(r.version, r.aliases) for r in rows] == [(1, ("champion",)), (2, ("candidate",))]
    assert rows[0].evaluation["passed"] == "True" and rows[1].evaluation["passed"] == "False"
    assert rows[1].evaluation["run_id"] == failed.evaluation_run_id
    evaluation = client.get_run(failed.evaluation_run_id)
    assert evaluation.data.params["tasks"] == TASK and evaluation.info.status == "FINISHED"
    assert evaluation.data.metrics[f"{TASK}/ratio"] == pytest.approx(failed.mean_ratio)
    assert "evaluation.json" in [a.path for a in client.list_artifacts(failed.evaluation_run_id)]


@pytest.mark.parametrize(
    ("uri", "error", "match"),
    [
        ("models:/opt/Production", ValueError, r"must be models:/NAME@ALIAS, models:/NAME/VER"),
        ("runs:/abc", ValueError, r"must be models:/NAME@ALIAS"),
        ("models:/nothing@candidate", LookupError, r"models:/nothing@candidate: .*nothing"),
        ("models:/opt@champion", LookupError, r"models:/opt@champion: .*champion"),
        ("models:/opt/7", LookupError, r"models:/opt/7: "),
        ("runs:/0123abc/exported", LookupError, r"runs:/0123abc/exported: Run .*not found"),
        ("runs:/{run}/nothing", LookupError, r"Failed to download artifacts from path 'nothing'"),
        ("runs:/{run}/exported", LookupError, r"holds no exported optimizer \(no manifest.json"),
    ],
    ids=["stage", "run-without-path", "unknown-model", "unknown-alias", "unknown-version",
         "unknown-run", "missing-path", "not-an-export"],
)
def test_bad_uris_are_refused_with_one_line(tracking_uri, tmp_path, uri, error, match):
    client = registry.make_client(tracking_uri)
    run_id = new_run(client)
    registry.register(client, "opt", export_and_log(client, run_id, tmp_path / "a", adam_theta()))
    with pytest.raises(error, match=match) as raised:
        registry.download(
            uri.format(run=run_id), tracking_uri=tracking_uri, cache_dir=tmp_path / "cache"
        )
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "cache").exists()  # no partial download, no empty cache folders


def test_download_refuses_a_foreign_folder_and_replaces_a_tampered_cache(tracking_uri, tmp_path):
    client = registry.make_client(tracking_uri)
    run_id = new_run(client)
    folder = tmp_path / "a"
    registry.register(client, "opt", export_and_log(client, run_id, folder, adam_theta()))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and does not hold models:/opt@candidate"):
        registry.download("models:/opt@candidate", foreign, tracking_uri=tracking_uri)
    assert (foreign / "notes.txt").read_text() == "mine"

    cache = tmp_path / "cache"
    got = registry.download("models:/opt@candidate", tracking_uri=tracking_uri, cache_dir=cache)
    graph = got / mf.GRAPH_FILES[mf.FUSED]
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")  # a changed byte: the cache is stale
    again = registry.download("models:/opt@candidate", tracking_uri=tracking_uri, cache_dir=cache)
    assert again == got and same_files(again, folder)


def test_list_and_promote_refuse_unknown_names(tracking_uri):
    client = registry.make_client(tracking_uri)
    with pytest.raises(LookupError, match="no registered model named 'nope'"):
        registry.list_versions(client, "nope")
    with pytest.raises(LookupError, match="no registered model named 'nope'"):
        promotion.promote(tracking_uri, "nope", 1, **QUICK)
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['mnist-nope'\]"):
        promotion.promote(tracking_uri, "nope", 1, tasks=["mnist-nope"])
    with pytest.raises(ValueError, match="model name must start with a letter or digit"):
        registry.check_model_name("a/b")


def test_a_fresh_download_is_held_to_the_registered_manifest_digest(tracking_uri, tmp_path):
    """The artifact store's copy was edited consistently (default_lr 100× larger, its own file
    list intact): the registry's manifest_sha256 refuses it on the first download too."""
    import json

    client = registry.make_client(tracking_uri)
    run_id = new_run(client)
    registry.register(client, "opt", export_and_log(client, run_id, tmp_path / "a", adam_theta()))
    (stored,) = (tmp_path / "artifacts").rglob(mf.MANIFEST_FILE)
    raw = json.loads(stored.read_text())
    raw["default_lr"] = 0.5
    stored.write_text(json.dumps(raw))
    cache = tmp_path / "cache"
    with pytest.raises(mf.ManifestError, match=r"manifest\.json has sha256 [0-9a-f]{64}, expected"):
        registry.download("models:/opt@candidate", tracking_uri=tracking_uri, cache_dir=cache)
    assert not cache.exists()  # nothing kept


def test_promotion_gates_on_held_out_benchmark_tasks(tracking_uri, tmp_path, monkeypatch):
    from meta_train.benchmark import grid_lr
    from meta_train.tasks.heldout import HELDOUT_FAST

    assert promotion.check_tasks(["heldout-fast"]) == HELDOUT_FAST
    client, _ = check_round_trip(tracking_uri, tmp_path, monkeypatch)
    tasks = ["leastsq-cond1e6-10000", "spirals-noisy-mlp-silu-10000"]
    result = promotion.promote(
        tracking_uri, "opt", 1, tasks=tasks, runs=2, steps=40, gate=100.0,
        cache_dir=tmp_path / "cache",
    )  # fmt: skip
    assert [c.task for c in result.comparisons] == tasks
    for c in result.comparisons:
        # Adam's lr is the tuned grid value of that task, not the candidate's α.
        assert any(c.adam_lr == pytest.approx(grid_lr(k)) for k in range(-14, 1))
        assert c.candidate_lr == pytest.approx(ADAM_LR) and math.isfinite(c.ratio)
    assert result.passed and result.diverged == 0
    with pytest.raises(ValueError, match="heldout-fast"):
        promotion.check_tasks(["no-such-task"])
