"""Where an exported optimizer comes from: a folder, a built-in name, or an MLflow URI.

``resolve_source`` turns what a user passes to ``runtime.load`` into a local folder. MLflow is
imported only when a ``models:/`` or ``runs:/`` URI is given (style §6.15); ``download_mlflow_uri``
fetches the folder behind such a URI into an explicit place and verifies it. The registry
(``export.registry``) logs folders in the layout this module reads, and reuses this download.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from . import manifest as mf

MLFLOW_SCHEMES = ("models:/", "runs:/")
BUILTIN_DIR = Path(__file__).parent / "builtin"

# How an exported folder is logged to an MLflow run (export.registry writes this layout): an
# MLflow model folder whose MLmodel and requirements.txt sit beside an untouched copy of the
# exported folder, so that downloading gives back exactly the files the manifest lists.
MLFLOW_MODEL_FILE = "MLmodel"
MLFLOW_OPTIMIZER_DIR = "optimizer"
# The version tag that names the exact folder: the manifest lists every other file's sha256.
MANIFEST_SHA256_TAG = "manifest_sha256"
CACHE_ENV = "HYPERADAM_CACHE_DIR"

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
_RUN_URI = re.compile(r"^runs:/(?P<run_id>[^/]+)/(?P<path>.+)$")


def builtin_names() -> list[str]:
    """Names of the exported optimizers shipped inside the package (``runtime/builtin/NAME``)."""
    if not BUILTIN_DIR.is_dir():
        return []
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "manifest.json").is_file())


def default_cache_dir() -> Path:
    """``$HYPERADAM_CACHE_DIR``, else ``$XDG_CACHE_HOME/hyperadam/models`` (``~/.cache/…``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hyperadam" / "models"


@dataclasses.dataclass(frozen=True)
class MlflowSource:
    """A parsed MLflow URI: a registered version (by number or alias) or a run's artifact."""

    uri: str
    name: str | None = None
    alias: str | None = None
    version: str | None = None
    run_id: str | None = None
    path: str | None = None


def parse_mlflow_uri(uri: str) -> MlflowSource:
    """Parses ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``runs:/RUN_ID/PATH``.

    Raises:
      ValueError: for any other form (stages such as ``models:/NAME/Production`` included:
        the registry uses aliases).
    """
    if match := _MODEL_URI.match(uri):
        for part in (match["name"], match["alias"]):
            _check_plain_part(uri, part)
        return MlflowSource(uri, name=match["name"], alias=match["alias"], version=match["version"])
    if match := _RUN_URI.match(uri):
        path = match["path"].strip("/")
        for part in (match["run_id"], *path.split("/")):
            _check_plain_part(uri, part)
        return MlflowSource(uri, run_id=match["run_id"], path=path)
    raise ValueError(
        f"MLflow URI {uri!r} must be models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH"
    )


def _check_plain_part(uri: str, part: str | None) -> None:
    """Each part of a URI becomes a folder name under the cache: no ``..``, ``.``, empty or
    absolute parts (``runs:/ID/a/../../x`` would place or delete folders outside it)."""
    if part is None:
        return
    if part in ("", ".", "..") or "\\" in part or "\0" in part or Path(part).is_absolute():
        raise ValueError(
            f"MLflow URI {uri!r} has the part {part!r}; each part must be a plain name (no '..', "
            "'.', empty parts or backslashes)"
        )


def _contained(target: Path, root: Path, uri: str) -> Path:
    """``target`` if it lies inside ``root`` once symlinks and ``..`` are resolved."""
    resolved, base = target.resolve(), root.resolve()
    if resolved != base and base not in resolved.parents:
        raise ValueError(f"{uri} maps to {resolved}, outside the cache folder {base}")
    return target


def download_mlflow_uri(
    uri: str,
    dest: str | os.PathLike[str] | None = None,
    *,
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Downloads the exported-optimizer folder behind an MLflow URI and verifies its manifest.

    The download goes to a hidden sibling of the destination and is renamed into place only
    after ``load_manifest`` accepted it (format version and every sha256), so the destination
    is either a complete, verified folder or absent, and no temporary copy is left behind.

    Args:
      uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``runs:/RUN_ID/PATH`` (PATH: a
        logged exported optimizer, or an exported folder itself).
      dest: the folder to create. Default: ``cache_dir/NAME/VERSION`` for a registered version,
        ``cache_dir/runs/RUN_ID/PATH`` for a run's artifact. A registered version already
        there (its manifest's sha256 equals the version's tag) is reused; an explicit ``dest``
        holding anything else is refused, a stale cache entry is replaced.
      tracking_uri / registry_uri: the MLflow stores (default: MLflow's, i.e.
        ``$MLFLOW_TRACKING_URI``).
      cache_dir: default ``default_cache_dir()``.

    Returns:
      The verified local folder.

    Raises:
      ImportError: mlflow is not installed.
      ValueError: a malformed URI.
      LookupError: unknown registered model, version, alias or run artifact.
      FileExistsError: ``dest`` exists and is not this version.
      ManifestError: the downloaded folder fails verification (nothing is kept).
    """
    try:
        from mlflow import MlflowClient  # lazy on purpose: the runtime must not need mlflow
    except ImportError as err:
        raise ImportError(
            f"loading {uri!r} needs mlflow (pip install mlflow); a local exported folder does not"
        ) from err
    from mlflow.exceptions import MlflowException

    source = parse_mlflow_uri(uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        expected: str | None
        if source.name is not None:
            version = _model_version(client, source)
            run_id, path = _run_artifact(version.source, source)
            expected = version.tags.get(MANIFEST_SHA256_TAG)
            default = cache / source.name / str(version.version)
        else:
            assert source.run_id is not None and source.path is not None  # a runs:/ URI
            run_id, path, expected = source.run_id, source.path, None
            default = cache / "runs" / run_id / path
        # Checked before anything is created or removed under it.
        target = Path(dest) if dest is not None else _contained(default, cache, uri)
        if target.exists():
            if expected is not None and _verified_manifest_sha256(target) == expected:
                return target
            if dest is not None and (not target.is_dir() or any(target.iterdir())):
                raise FileExistsError(
                    f"{target} exists and does not hold {uri}; remove it or choose another folder"
                )
        return _download_into(client, run_id, path, target, uri, expected)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(err).lower():
            raise LookupError(f"{uri}: {_first_line(err)}") from None
        raise


def _model_version(client: Any, source: MlflowSource) -> Any:
    if source.alias is not None:
        return client.get_model_version_by_alias(source.name, source.alias)
    return client.get_model_version(source.name, source.version)


def _run_artifact(version_source: str, source: MlflowSource) -> tuple[str, str]:
    match = _RUN_URI.match(version_source or "")
    if match is None:
        raise LookupError(
            f"{source.uri} points to {version_source!r}, not to a run's artifact "
            "(versions made by `hyperadam export --register` do)"
        )
    return match["run_id"], match["path"].strip("/")


def _verified_manifest_sha256(folder: Path) -> str | None:
    try:
        digest = mf.sha256_file(folder / mf.MANIFEST_FILE)
        mf.load_manifest(folder, sha256=digest)  # the digest checked is the one returned
    except (OSError, mf.ManifestError):
        return None
    return digest


def _download_into(
    client: Any, run_id: str, path: str, target: Path, uri: str, expected: str | None
) -> Path:
    client.get_run(run_id)  # an unknown run fails here, before any folder is made
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    done = False
    try:
        local = Path(client.download_artifacts(run_id, path, str(work)))
        if (local / MLFLOW_MODEL_FILE).is_file():  # a logged model: the folder sits inside
            local = local / MLFLOW_OPTIMIZER_DIR
        if not (local / mf.MANIFEST_FILE).is_file():
            raise LookupError(f"{uri} holds no exported optimizer (no {mf.MANIFEST_FILE})")
        # The registry's manifest digest, format version and every sha256, before anything is
        # kept: a fresh download is held to the same digest as a cache hit.
        mf.load_manifest(local, sha256=expected)
        if target.is_dir():  # a stale or broken cache entry (explicit folders were refused)
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(local, target)
        done = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for folder in () if done else created:  # innermost first: leave no empty cache paths
            try:
                folder.rmdir()
            except OSError:
                break
    return target


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def resolve_mlflow_uri(uri: str) -> Path:
    """Downloads the exported-optimizer folder behind an MLflow URI (``download_mlflow_uri``
    with MLflow's default stores and the default cache folder) and returns it;
    ``runtime.load`` then verifies its manifest and hashes like any folder.

    Raises:
      ImportError: if mlflow is not installed.
      ValueError / LookupError / ManifestError: see ``download_mlflow_uri``.
    """
    return download_mlflow_uri(uri)


def resolve_source(source: str | os.PathLike[str]) -> Path:
    """Maps ``runtime.load``'s argument to a local folder (not yet verified).

    Accepts an existing folder path, an MLflow URI (``models:/…``, ``runs:/…``) or the name of a
    built-in optimizer (``"hyperadam"``). A built-in's bare name means the built-in even where
    the working directory holds a folder of that name (a clone of this repository is one):
    write ``"./hyperadam"`` for such a folder.

    Raises:
      FileNotFoundError: naming the source and the built-in names when nothing matches.
    """
    if isinstance(source, str) and source.startswith(MLFLOW_SCHEMES):
        return resolve_mlflow_uri(source)
    if isinstance(source, str) and source in builtin_names():
        return BUILTIN_DIR / source
    path = Path(source)
    if path.is_dir():
        return path
    raise FileNotFoundError(
        f"source {str(source)!r} is neither an exported optimizer folder, an MLflow URI "
        f"({', '.join(MLFLOW_SCHEMES)}) nor a built-in optimizer (built-in: {builtin_names()})"
    )
