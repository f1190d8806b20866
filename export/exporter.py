"""``export_optimizer``: θ → an exported-optimizer folder (graphs, manifest, parity record).

The folder is assembled in a hidden sibling folder and renamed into place only after the parity
check passed, so ``out_dir`` either is a complete, verified export or does not exist.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

from meta_train.theta_source import reference_for_theta
from runtime import manifest as mf
from runtime.theta import as_numpy_theta, load_theta, save_theta, theta_sha256

from .methods import EXPORT_METHODS
from .parity import check_parity

# Where θ came from: the run and its step, the task distribution and run config it was trained
# on, and what the training cost (meta-updates, wall time, hardware; for a fine-tuned θ those
# of the θ it started at included), so that every shipped or registered optimizer says how it
# was made.
LINEAGE_KEYS = (
    "mlflow_run_id",
    "step",
    "task_digest",
    "config_digest",
    "trainer",
    "meta_updates",
    "wall_time_s",
    "hardware",
    "started_from",  # a fine-tuned θ: the sha256 of the θ its run started at
)
DEFAULT_PARITY_SIZES = (2, 1000)
FULL_PARITY_SIZES = (2, 1000, 1_000_000)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _versions() -> dict[str, str | None]:
    return {
        "hyperadam": _version("hyperadam"),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _lineage(given: Mapping[str, Any] | None, from_file: Mapping[str, Any]) -> dict[str, Any]:
    lineage = {key: from_file.get(key) for key in LINEAGE_KEYS}
    if given is not None:
        unknown = set(given) - set(LINEAGE_KEYS)
        if unknown:
            raise ValueError(
                f"lineage keys must be among {list(LINEAGE_KEYS)}, got {sorted(unknown)}"
            )
        lineage.update(given)
    return lineage


def export_optimizer(
    method: str,
    theta: Mapping[str, Any] | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    lineage: Mapping[str, Any] | None = None,
    parity_sizes: Sequence[int] = DEFAULT_PARITY_SIZES,
    trajectory_steps: int = 100,
    default_lr: float | None = None,
    overwrite: bool = False,
    seed: int = 0,
) -> mf.Manifest:
    """Exports a learned optimizer and verifies it against the torch reference.

    Args:
      method: ``"hyperadam"``, ``"dm"`` or ``"rnnprop"`` (``runtime.manifest`` names).
      theta: meta-parameters as a mapping of numpy arrays / torch tensors, or the path of a θ
        artifact written by ``export.save_theta`` (its method must match; its meta supplies
        lineage not given explicitly).
      out_dir: the folder to create.
      lineage: any of ``LINEAGE_KEYS`` (missing ones are None).
      parity_sizes: coordinate counts of the one-step parity cases; ``FULL_PARITY_SIZES`` adds
        10⁶ (about 10 s more).
      trajectory_steps: length of the parity trajectory (100).
      default_lr: α written to the manifest (default: the θ file's ``lr`` meta, else the
        method's: 0.005 for HyperAdam, 0.1 for DM and RNNprop).
      overwrite: replace an existing ``out_dir``.
      seed: seed of the parity cases.

    Returns:
      The ``Manifest`` written to ``out_dir/manifest.json``.

    Raises:
      FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
      ValueError: bad θ (names, shapes, NaN), method or lineage.
      ParityError: the graphs disagree with the reference beyond the tolerance (nothing written).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    file_meta: dict[str, Any] = {}
    if isinstance(theta, (str, os.PathLike)):
        artifact = load_theta(theta)
        if artifact.method != method:
            raise ValueError(f"{theta} holds θ of {artifact.method!r}, not {method!r}")
        theta, file_meta = artifact.theta, artifact.meta
    arrays = as_numpy_theta(theta)
    config, reference = reference_for_theta(method, arrays)
    if method not in EXPORT_METHODS:
        raise ValueError(f"{method} has no ONNX export yet; its θ file is evaluated in meta_train")
    if default_lr is None:  # the α θ was meta-trained with, else the method's
        default_lr = file_meta.get("lr", reference.default_lr)
    lr = float(default_lr)
    full_lineage = {**_lineage(lineage, file_meta), "theta_sha256": theta_sha256(arrays)}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    try:
        models = EXPORT_METHODS[method](arrays)
        for role, model in models.items():
            onnx.save_model(model, str(work / mf.GRAPH_FILES[role]))
        save_theta(work / mf.THETA_FILE, method, arrays, **full_lineage, lr=lr)
        names = [mf.GRAPH_FILES[role] for role in models] + [mf.THETA_FILE]
        files = {name: mf.sha256_file(work / name) for name in names}
        info = mf.method_info(method)
        manifest = mf.Manifest(
            method=method,
            config=config,
            default_lr=lr,
            state=info.layout(**config),
            graphs=info.graphs(**config),
            files=files,
            lineage=full_lineage,
            versions=_versions(),
            parity={"passed": False, "status": "running"},
        )
        manifest.write(work)
        parity = check_parity(
            str(work),
            reference,
            arrays,
            sizes=parity_sizes,
            trajectory_steps=trajectory_steps,
            seed=seed,
        )
        manifest = mf.Manifest(**{**manifest.__dict__, "parity": parity})
        manifest.write(work)
        mf.load_manifest(work)  # what the runtime will read back
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest
