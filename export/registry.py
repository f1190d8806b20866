"""The MLflow model registry for exported optimizers: log, register, list, promote, download.

An exported folder is logged to a run as a small MLflow model (design §3.4)::

    exported/<first 16 hex of sha256(manifest.json)>/
        MLmodel             flavour ``hyperadam_onnx``: where the folder is, method, format
        requirements.txt    numpy and onnxruntime, written explicitly: inferred requirements
                            would list both onnxruntime and onnxruntime-gpu
        python_env.yaml
        optimizer/          the exported folder, byte for byte (``runtime.sources`` layout)

and registered with ``create_model_version`` (source ``runs:/RUN_ID/exported/…``), tags that say
what it is (method, J, opset, parity error, lineage) and the alias ``candidate``. Not the
``onnx`` flavour (one graph per model, and its loader is DataFrame-shaped pyfunc) and not the
deprecated stages. Loading goes through ``runtime.sources.download_mlflow_uri``: an explicit
folder, hashes checked, no temporary copies left.

``promote`` evaluates a version against Adam with its tuned learning rates on held-out tasks
(same seeds, so the same inits and minibatches for both), logs the evaluation either way (an
MLflow run plus ``eval.*`` version tags) and moves ``champion`` only if the gate passes: no
diverged candidate run, and the mean over tasks of candidate/Adam mean final loss ≤ the gate
ratio (default 1.0).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime import manifest as mf
from runtime import sources

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

ARTIFACT_DIR = "exported"
FLAVOR = "hyperadam_onnx"
# What running an exported folder needs. Floors as in pyproject.toml; plain onnxruntime, since
# a requirements file cannot carry pyproject's markers (onnxruntime-gpu satisfies the import).
PIP_REQUIREMENTS = ("numpy>=1.24", "onnxruntime>=1.20")
CANDIDATE = "candidate"
CHAMPION = "champion"
# Held-out tasks of promotion: the meta-training task is the 784-20-10 sigmoid MLP
# (mnist-nn-sigmoid-100); these change the activation or the depth, and cost ~1 s per run.
DEFAULT_HELD_OUT_TASKS = ("mnist-nn-relu-100", "mnist-nn-tanh-100", "mnist-nn-l2-sigmoid-100")
DEFAULT_EVAL_RUNS = 5
DEFAULT_GATE = 1.0
DEFAULT_EXPERIMENT = "hyperadam"  # meta_train.run_config's; evaluation runs of orphan versions
EVAL_TAG = "eval."
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


# -- logging and registering ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoggedExport:
    """An exported folder logged to ``run_id`` at ``artifact_path``."""

    run_id: str
    artifact_path: str
    manifest: mf.Manifest
    manifest_sha256: str

    @property
    def uri(self) -> str:
        return f"runs:/{self.run_id}/{self.artifact_path}"


def check_model_name(name: str) -> str:
    """Registered-model names: letters, digits, ``.``, ``_``, ``-`` (they go into filters,
    cache paths and ``models:/`` URIs unquoted)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"model name must start with a letter or digit and hold only letters, digits, "
            f"'.', '_' and '-', got {name!r}"
        )
    return name


def make_client(tracking_uri: str, registry_uri: str | None = None) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)


def log_exported(client: MlflowClient, run_id: str, folder: str | os.PathLike[str]) -> LoggedExport:
    """Logs a verified exported folder to run ``run_id`` as an MLflow model (layout above).

    The artifact path is named by the manifest's sha256, so logging the same folder twice
    rewrites identical bytes and a different folder never overwrites a registered one.

    Raises:
      ManifestError: ``folder`` is not a verified exported folder (nothing is logged).
    """
    from mlflow.models import Model

    folder = Path(folder)
    manifest = mf.load_manifest(folder)
    digest = mf.sha256_file(folder / mf.MANIFEST_FILE)
    artifact_path = f"{ARTIFACT_DIR}/{digest[:16]}"
    with tempfile.TemporaryDirectory(prefix="hyperadam-log-") as tmp:
        model_dir = Path(tmp) / "model"
        optimizer_dir = model_dir / sources.MLFLOW_OPTIMIZER_DIR
        optimizer_dir.mkdir(parents=True)
        for name in (*manifest.files, mf.MANIFEST_FILE):  # exactly what the manifest covers
            shutil.copy2(folder / name, optimizer_dir / name)
        model = Model(artifact_path=artifact_path, run_id=run_id)
        model.add_flavor(
            FLAVOR,
            folder=sources.MLFLOW_OPTIMIZER_DIR,
            method=manifest.method,
            format_version=manifest.format_version,
            loader="runtime.load('models:/NAME@ALIAS') (pip install hyperadam)",
        )
        model.save(str(model_dir / sources.MLFLOW_MODEL_FILE))
        (model_dir / "requirements.txt").write_text("\n".join(PIP_REQUIREMENTS) + "\n")
        (model_dir / "python_env.yaml").write_text(
            f"python: {platform.python_version()}\nbuild_dependencies:\n- pip\n"
            "dependencies:\n- -r requirements.txt\n"
        )
        client.log_artifacts(run_id, str(model_dir), artifact_path)
    return LoggedExport(run_id, artifact_path, manifest, digest)


def version_tags(manifest: mf.Manifest, manifest_sha256: str) -> dict[str, str]:
    """The tags a registered version carries: what it is and where it came from."""
    tags = {
        "method": manifest.method,
        "opset": str(manifest.opset),
        "format_version": str(manifest.format_version),
        "default_lr": repr(manifest.default_lr),
        sources.MANIFEST_SHA256_TAG: manifest_sha256,
    }
    for key, value in manifest.config.items():
        tags["J" if key == "num_candidates" else key] = str(value)
    parity = manifest.parity
    tags["parity.passed"] = str(bool(parity.get("passed")))
    for kind, error in (parity.get("max_error") or {}).items():
        tags[f"parity.max_error.{kind}"] = repr(float(error))
    for key, value in manifest.lineage.items():
        if value is not None:
            tags[f"lineage.{key}"] = str(value)[:5000]  # MLflow's tag value limit
    return tags


def register(
    client: MlflowClient, name: str, logged: LoggedExport, *, alias: str = CANDIDATE
) -> ModelVersion:
    """Registers ``logged`` as a new version of ``name`` (created if new), tagged with
    ``version_tags``, and points ``alias`` at it."""
    from mlflow.exceptions import MlflowException

    check_model_name(name)
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(
            name, description="hyperadam exported optimizers (runtime.load('models:/…'))"
        )
    version = client.create_model_version(
        name,
        logged.uri,
        run_id=logged.run_id,
        tags=version_tags(logged.manifest, logged.manifest_sha256),
        description=f"{logged.manifest.method} exported optimizer, {logged.uri}",
    )
    client.set_registered_model_alias(name, alias, version.version)
    return client.get_model_version(name, version.version)


# -- listing ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VersionRow:
    """One registered version as ``registry list`` shows it."""

    name: str
    version: int
    aliases: tuple[str, ...]
    tags: Mapping[str, str]
    run_id: str | None

    @property
    def evaluation(self) -> dict[str, str]:
        return {k[len(EVAL_TAG) :]: v for k, v in self.tags.items() if k.startswith(EVAL_TAG)}


def list_versions(client: MlflowClient, name: str | None = None) -> list[VersionRow]:
    """Every version of ``name`` (or of every registered model), oldest first.

    Raises:
      LookupError: ``name`` is not a registered model.
    """
    if name is not None:
        check_model_name(name)
        names = [_registered_model(client, name).name]
    else:
        names = sorted(m.name for m in _all_registered_models(client))
    rows = []
    for model_name in names:
        by_version: dict[str, list[str]] = {}
        for alias, version in _registered_model(client, model_name).aliases.items():
            by_version.setdefault(str(version), []).append(alias)
        for v in client.search_model_versions(f"name = '{model_name}'"):
            rows.append(
                VersionRow(
                    model_name,
                    int(v.version),
                    tuple(sorted(by_version.get(str(v.version), []))),
                    dict(v.tags),
                    v.run_id,
                )
            )
    return sorted(rows, key=lambda r: (r.name, r.version))


def _all_registered_models(client: MlflowClient) -> list[Any]:
    models, token = [], None
    while True:
        page = client.search_registered_models(max_results=100, page_token=token)
        models.extend(page)
        token = page.token
        if not token:
            return models


def _registered_model(client: MlflowClient, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise LookupError(f"no registered model named {name!r}") from None
        raise


def _model_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    from mlflow.exceptions import MlflowException

    _registered_model(client, name)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise LookupError(f"registered model {name!r} has no version {version}") from None
        raise


# -- promotion --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskComparison:
    """Candidate vs tuned Adam on one task, over the same seeded runs."""

    task: str
    candidate_final_loss: float  # mean over runs (inf if any run diverged)
    adam_final_loss: float
    candidate_diverged: int  # runs
    adam_diverged: int
    candidate_lr: float
    adam_lr: float

    @property
    def ratio(self) -> float:
        if self.candidate_diverged:
            return math.inf
        if self.adam_diverged:  # the candidate finished where Adam did not
            return 0.0
        return self.candidate_final_loss / self.adam_final_loss


@dataclasses.dataclass(frozen=True)
class Promotion:
    """The outcome of ``promote``: the evaluation, the gate and where the alias points."""

    name: str
    version: int
    comparisons: tuple[TaskComparison, ...]
    runs: int
    steps: int | None
    seed: int
    gate: float
    evaluation_run_id: str
    champion_before: int | None
    champion_after: int | None

    @property
    def mean_ratio(self) -> float:
        return sum(c.ratio for c in self.comparisons) / len(self.comparisons)

    @property
    def diverged(self) -> int:
        return sum(c.candidate_diverged for c in self.comparisons)

    @property
    def passed(self) -> bool:
        return self.diverged == 0 and math.isfinite(self.mean_ratio) and (
            self.mean_ratio <= self.gate
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "gate": self.gate,
            "rule": "passed = no diverged candidate run and mean over tasks of "
            "(candidate mean final loss / Adam mean final loss) <= gate",
            "mean_ratio": self.mean_ratio,
            "passed": self.passed,
            "runs": self.runs,
            "steps": self.steps,
            "seed": self.seed,
            "tasks": [{**dataclasses.asdict(c), "ratio": c.ratio} for c in self.comparisons],
            "evaluation_run_id": self.evaluation_run_id,
            "champion_before": self.champion_before,
            "champion_after": self.champion_after,
        }


def compare_with_adam(
    folder: str | os.PathLike[str],
    tasks: Sequence[str],
    *,
    runs: int,
    steps: int | None,
    seed: int,
    data_dir: str | None = None,
) -> list[TaskComparison]:
    """Evaluates the exported optimizer in ``folder`` (at its manifest's α) and Adam (at each
    task's tuned lr, spec §5) with the same seeds: identical inits and minibatches.

    The candidate runs the torch reference of the folder's θ (hash-checked ``theta.npz``), which
    the export's recorded parity check ties to the graphs.
    """
    from meta_train.evaluate import evaluate
    from meta_train.resolve import resolve_optimizer
    from meta_train.tasks.suite import TEST_TASKS, build_test_task

    manifest = mf.load_manifest(folder)
    out = []
    for key in tasks:
        spec = TEST_TASKS[key]
        task = build_test_task(key, data_dir=data_dir)
        horizon = steps or spec.horizon
        results = {}
        for which, name, lr in (
            ("adam", "adam", None),
            ("candidate", str(folder), manifest.default_lr),
        ):
            rule, rule_lr = resolve_optimizer(name, spec, lr=lr)
            results[which] = (
                evaluate(task, rule, task_name=key, steps=horizon, runs=runs, seed=seed),
                rule_lr,
            )
        (cand, cand_lr), (adam, adam_lr) = results["candidate"], results["adam"]
        out.append(
            TaskComparison(
                key,
                cand.final_loss_mean,
                adam.final_loss_mean,
                cand.diverged_runs,
                adam.diverged_runs,
                float(cand_lr),
                float(adam_lr),
            )
        )
    return out


def check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    from meta_train.tasks.suite import TEST_TASKS

    if not tasks:
        raise ValueError("at least one held-out task is needed")
    unknown = [t for t in tasks if t not in TEST_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(sorted(TEST_TASKS))}")
    return tuple(dict.fromkeys(tasks))


def promote(
    tracking_uri: str,
    name: str,
    version: int | str,
    *,
    tasks: Sequence[str] = DEFAULT_HELD_OUT_TASKS,
    runs: int = DEFAULT_EVAL_RUNS,
    steps: int | None = None,
    seed: int = 0,
    gate: float = DEFAULT_GATE,
    experiment: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    data_dir: str | None = None,
    registry_uri: str | None = None,
) -> Promotion:
    """Evaluates version ``version`` of ``name`` against tuned Adam and gates ``champion``.

    Order: download and verify the version; evaluate (``compare_with_adam``); log an evaluation
    run (params, per-task metrics, ``evaluation.json``) in ``experiment`` (default: the
    experiment of the run the version came from); tag the version ``eval.*``; only then, if
    the gate passed, point ``champion`` at the version. A failed gate leaves ``champion``
    where it was, and the evaluation stays logged.

    Args:
      tasks: held-out test-task keys (``meta_train.tasks.suite``).
      runs / steps / seed: per task, runs of ``steps`` steps (default: the task's horizon)
        with run seeds derived from ``seed``, the same for both optimizers.
      gate: the largest mean final-loss ratio to Adam that passes.

    Raises:
      LookupError: unknown model or version. ValueError: bad tasks, runs, steps or gate.
      ManifestError: the version's folder fails verification.
    """
    check_model_name(name)
    tasks = check_tasks(tasks)
    if runs < 1 or (steps is not None and steps < 1):
        raise ValueError(f"runs and steps must be >= 1, got runs={runs}, steps={steps}")
    if not (math.isfinite(gate) and gate > 0):
        raise ValueError(f"gate must be a finite ratio > 0, got {gate}")
    client = make_client(tracking_uri, registry_uri)
    mv = _model_version(client, name, str(version))
    champion_before = _registered_model(client, name).aliases.get(CHAMPION)
    folder = sources.download_mlflow_uri(
        f"models:/{name}/{mv.version}",
        tracking_uri=tracking_uri,
        registry_uri=registry_uri or tracking_uri,
        cache_dir=cache_dir,
    )
    comparisons = compare_with_adam(
        folder, tasks, runs=runs, steps=steps, seed=seed, data_dir=data_dir
    )
    run_id = _start_evaluation_run(client, mv, experiment)
    before = None if champion_before is None else int(champion_before)
    result = Promotion(
        name, int(mv.version), tuple(comparisons), runs, steps, seed, gate, run_id, before, before
    )
    if result.passed:
        result = dataclasses.replace(result, champion_after=int(mv.version))
    _log_evaluation(client, result)
    if result.passed:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    return result


def _start_evaluation_run(client: MlflowClient, mv: ModelVersion, experiment: str | None) -> str:
    from mlflow.exceptions import MlflowException

    experiment_id = None
    if experiment is None and mv.run_id:
        try:
            experiment_id = client.get_run(mv.run_id).info.experiment_id
        except MlflowException:
            experiment_id = None  # the source run is gone: use the default experiment
    if experiment_id is None:
        found = client.get_experiment_by_name(experiment or DEFAULT_EXPERIMENT)
        experiment_id = (
            found.experiment_id
            if found is not None
            else client.create_experiment(experiment or DEFAULT_EXPERIMENT)
        )
    run = client.create_run(
        experiment_id,
        run_name=f"promote {mv.name} v{mv.version}",
        tags={
            "hyperadam.kind": "promotion",
            "hyperadam.registered_model": mv.name,
            "hyperadam.model_version": str(mv.version),
        },
    )
    return run.info.run_id


def _log_evaluation(client: MlflowClient, result: Promotion) -> None:
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    params = [
        Param("tasks", ",".join(c.task for c in result.comparisons)),
        Param("runs", str(result.runs)),
        Param("steps", "horizon" if result.steps is None else str(result.steps)),
        Param("seed", str(result.seed)),
        Param("gate", repr(result.gate)),
    ]
    metrics = [Metric("mean_ratio", _finite(result.mean_ratio), now, 0)]
    for c in result.comparisons:
        for key, value in (
            ("candidate_final_loss", c.candidate_final_loss),
            ("adam_final_loss", c.adam_final_loss),
            ("ratio", c.ratio),
            ("candidate_diverged_runs", c.candidate_diverged),
        ):
            metrics.append(Metric(f"{c.task}/{key}", _finite(value), now, 0))
    tags = [RunTag("hyperadam.gate_passed", str(result.passed))]
    client.log_batch(result.evaluation_run_id, metrics=metrics, params=params, tags=tags)
    client.log_dict(result.evaluation_run_id, result.to_json(), "evaluation.json")
    client.set_terminated(result.evaluation_run_id, "FINISHED")
    version_tags = {
        "mean_ratio": f"{result.mean_ratio:.6g}",
        "passed": str(result.passed),
        "gate": repr(result.gate),
        "tasks": ",".join(c.task for c in result.comparisons),
        "runs": str(result.runs),
        "steps": "horizon" if result.steps is None else str(result.steps),
        "seed": str(result.seed),
        "diverged_runs": str(result.diverged),
        "run_id": result.evaluation_run_id,
        "ratios": json.dumps({c.task: round(c.ratio, 6) for c in result.comparisons}),
    }
    for key, value in version_tags.items():
        client.set_model_version_tag(result.name, str(result.version), EVAL_TAG + key, value)


def _finite(value: float) -> float:
    # MLflow stores ±inf/NaN inconsistently across backends; a diverged run is logged as 1e308.
    return value if math.isfinite(value) else math.copysign(1e308, value)


# -- downloading ------------------------------------------------------------------------------


def download(
    uri: str,
    dest: str | os.PathLike[str] | None = None,
    *,
    tracking_uri: str,
    registry_uri: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` / ``runs:/ID/PATH`` → a verified local
    folder (see ``runtime.sources.download_mlflow_uri``)."""
    return sources.download_mlflow_uri(
        uri,
        dest,
        tracking_uri=tracking_uri,
        registry_uri=registry_uri or tracking_uri,
        cache_dir=cache_dir,
    )
