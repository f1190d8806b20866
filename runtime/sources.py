"""Where an exported optimizer comes from: a folder, a built-in name, or an MLflow URI.

``resolve_source`` turns what a user passes to ``runtime.load`` into a local folder. MLflow is
imported only when a ``models:/`` or ``runs:/`` URI is given (style §6.15), through
``resolve_mlflow_uri``, the hook the registry work fills in.
"""

from __future__ import annotations

import os
from pathlib import Path

MLFLOW_SCHEMES = ("models:/", "runs:/")
BUILTIN_DIR = Path(__file__).parent / "builtin"


def builtin_names() -> list[str]:
    """Names of the exported optimizers shipped inside the package (``runtime/builtin/NAME``)."""
    if not BUILTIN_DIR.is_dir():
        return []
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "manifest.json").is_file())


def resolve_mlflow_uri(uri: str) -> Path:
    """Downloads the exported-optimizer folder behind an MLflow URI to an explicit local place.

    Hook for the MLflow model registry (issue 4): imports mlflow lazily, resolves
    ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` / ``runs:/RUN_ID/PATH`` and returns the
    downloaded folder; ``runtime.load`` then verifies its manifest and hashes like any folder.

    Raises:
      ImportError: if mlflow is not installed.
      NotImplementedError: until the registry integration provides the download.
    """
    try:
        import mlflow  # noqa: F401  (lazy on purpose: the runtime must not need mlflow)
    except ImportError as err:
        raise ImportError(
            f"loading {uri!r} needs mlflow (pip install mlflow); a local exported folder does not"
        ) from err
    raise NotImplementedError(
        f"MLflow URIs ({', '.join(MLFLOW_SCHEMES)}) are resolved by the registry integration, "
        f"which is not installed in this version; download the folder and pass its path ({uri!r})"
    )


def resolve_source(source: str | os.PathLike[str]) -> Path:
    """Maps ``runtime.load``'s argument to a local folder (not yet verified).

    Accepts an existing folder path, an MLflow URI (``models:/…``, ``runs:/…``) or the name of a
    built-in optimizer (``"hyperadam"``).

    Raises:
      FileNotFoundError: naming the source and the built-in names when nothing matches.
    """
    if isinstance(source, str) and source.startswith(MLFLOW_SCHEMES):
        return resolve_mlflow_uri(source)
    path = Path(source)
    if path.is_dir():
        return path
    if isinstance(source, str) and source in builtin_names():
        return BUILTIN_DIR / source
    raise FileNotFoundError(
        f"source {str(source)!r} is neither an exported optimizer folder, an MLflow URI "
        f"({', '.join(MLFLOW_SCHEMES)}) nor a built-in optimizer (built-in: {builtin_names()})"
    )
