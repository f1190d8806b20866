"""The MLflow model registry for exported optimizers: log, register, list, download.

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

Promotion (gating ``champion`` on an evaluation against Adam) lives in ``export.promotion``.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Mapping
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
EVAL_TAG = "eval."  # version tags of the latest promotion evaluation
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
    """An ``MlflowClient``; an unusable URI raises ``ValueError`` in one line."""
    from mlflow import MlflowClient

    try:
        return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)
    except Exception as error:  # noqa: BLE001 - MLflow raises several types for a bad URI
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"cannot open the MLflow store {tracking_uri}: {first}") from None


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
        names = [registered_model(client, name).name]
    else:
        names = sorted(m.name for m in _all_registered_models(client))
    rows = []
    for model_name in names:
        by_version: dict[str, list[str]] = {}
        for alias, version in registered_model(client, model_name).aliases.items():
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
    models: list[Any] = []
    token = None
    while True:
        page = client.search_registered_models(max_results=100, page_token=token)
        models.extend(page)
        token = page.token
        if not token:
            return models


def registered_model(client: MlflowClient, name: str) -> Any:
    """The registered model ``name``; LookupError if there is none."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise LookupError(f"no registered model named {name!r}") from None
        raise


def model_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    """Version ``version`` of ``name``; LookupError if either is missing."""
    from mlflow.exceptions import MlflowException

    registered_model(client, name)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise LookupError(f"registered model {name!r} has no version {version}") from None
        raise


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
