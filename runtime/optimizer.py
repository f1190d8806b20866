"""``runtime.load``: an exported optimizer folder → an ``ExportedOptimizer`` that binds arrays."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import onnxruntime as ort

from . import arrays
from . import manifest as mf
from .guard import GuardConfig, guard_config
from .guarded import GuardedStepper, GuardHook, active_mlflow_hook
from .plan import DEFAULT_CHUNK_SIZE
from .session import DEFAULT_PROVIDERS, check_signature, open_sessions, session_options
from .sources import resolve_source
from .stepper import AllReduce, Stepper


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class ExportedOptimizer:
    """A verified exported optimizer with one onnxruntime session per graph.

    Attributes:
      folder: the exported folder. manifest: its verified ``Manifest``.
      providers: the execution providers the sessions really use (read back, not assumed).
      threads: chunks run in parallel on this many threads.

    Arrays on the host always run on CPU-provider sessions and CUDA arrays on CUDA-provider
    sessions of their device; those are opened on first use and cached (``providers_for``).
    """

    def __init__(
        self,
        folder: Path,
        manifest: mf.Manifest,
        *,
        threads: int | None = None,
        intra_op_threads: int = 1,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
    ) -> None:
        threads = _available_cpus() if threads is None else threads
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        self.folder = folder
        self.manifest = manifest
        self.threads = threads
        self._sessions, self.providers = open_sessions(
            folder, manifest, providers=providers, intra_op_threads=intra_op_threads
        )
        self._intra_op_threads = intra_op_threads
        self._by_device: dict[str, tuple[dict[str, ort.InferenceSession], tuple[str, ...]]] = {}
        if self.providers[0] == "CPUExecutionProvider":
            self._by_device["cpu"] = (self._sessions, self.providers)
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(threads, "hyperadam-chunk") if threads > 1 else None

    @property
    def method(self) -> str:
        return self.manifest.method

    @property
    def default_lr(self) -> float:
        return self.manifest.default_lr

    def close(self) -> None:
        """Stops the chunk threads (steppers bound earlier then run their chunks inline)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> ExportedOptimizer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"ExportedOptimizer(method={self.method!r}, config={dict(self.manifest.config)}, "
            f"folder={str(self.folder)!r}, providers={list(self.providers)})"
        )

    def providers_for(self, device: str) -> tuple[str, ...]:
        """The providers the sessions for ``device`` (``"cpu"``, ``"cuda:N"``) really use."""
        return self._sessions_for(device)[1]

    def _sessions_for(self, device: str) -> tuple[dict[str, ort.InferenceSession], tuple[str, ...]]:
        with self._lock:
            if device not in self._by_device:
                self._by_device[device] = (
                    open_sessions(
                        self.folder,
                        self.manifest,
                        providers=DEFAULT_PROVIDERS,
                        intra_op_threads=self._intra_op_threads,
                    )
                    if device == "cpu"
                    else open_cuda_sessions(
                        self.folder, self.manifest, device, self._intra_op_threads
                    )
                )
            return self._by_device[device]

    def bind(
        self,
        params: Sequence[Any],
        *,
        lr: float | None = None,
        chunk_size: int | None = None,
        on_nonfinite: str = "raise",
        all_reduce: AllReduce | None = None,
        weight_decay: float = 0.0,
        guard: bool | GuardConfig | None = None,
        guard_hook: GuardHook | None = active_mlflow_hook,
        array_ids: Sequence[int] | None = None,
        num_arrays: int | None = None,
    ) -> Stepper:
        """Creates the state for ``params`` and returns the ``Stepper`` that owns it.

        Args:
          params: float32, C-contiguous, writeable arrays of one framework on one device,
            updated in place by each ``step``: numpy arrays, or torch/CuPy/other DLPack arrays
            on the CPU (bound through zero-copy numpy views), or torch/CuPy arrays on a CUDA
            device (bound through DLPack, run by the CUDA provider). One step covers all of
            them together (global normalisations included).
          lr: step size α (default: the manifest's, 0.005 for HyperAdam); settable later as
            ``stepper.lr``.
          chunk_size: coordinates per chunk (default ``runtime.plan.DEFAULT_CHUNK_SIZE`` on the
            CPU; on CUDA, the largest array, as kernel launches there cost more than cache
            misses). A model of at most one chunk runs the fused graph; a larger one runs the
            staged graphs chunk by chunk, so temporary memory scales with ``chunk_size ×
            threads``.
          on_nonfinite: ``"raise"`` (default) raises ``NonFiniteGradientError`` on a NaN/inf
            gradient; ``"skip"`` leaves everything unchanged and returns False from ``step``.
          all_reduce: sharded use. ``params`` are this process's shard of a model; the stepper
            calls ``all_reduce(partial)`` with each partial sum (a float64 numpy array: Σg²,
            then each stage's per-column sums, or a per-array method's per-array sums and sizes)
            and expects the sum over all shards back, e.g. through
            ``torch.distributed.all_reduce``. Every shard must call ``step`` together.
          weight_decay: decoupled weight decay λ (AdamW's: each step scales every array by
            ``1 − lr·λ`` before the learned update; default 0); settable later as
            ``stepper.weight_decay``.
          guard: ``True`` (the defaults) or a ``runtime.guard.GuardConfig`` returns a
            ``GuardedStepper``: ``step(grads, loss=...)`` restores the last good parameters and
            state and falls back to Adam for a while when the loss blows up (see
            ``runtime/guard.py``); default None, no guard.
          array_ids, num_arrays: for methods with per-array statistics (the tensor-wise
            HyperAdam's rms_T(g) of each coordinate's array): the index of each of ``params``
            among the whole model's ``num_arrays`` arrays. Bound arrays with the same id, here
            or on other shards (pieces of one tensor), are one array for the statistics.
            Default: each bound array is its own. Required for a sharded per-array method.
          guard_hook: called with a ``GuardEvent`` at each fallback (default: logs
            ``guard/fallbacks`` to MLflow's active run when the process uses MLflow;
            ``runtime.guarded.mlflow_hook(run_id)`` for an explicit run; None: nothing).

        Raises:
          TypeError / ValueError: on bad arguments, before any state is created.
          RuntimeError: CUDA arrays, but onnxruntime cannot run the CUDA provider here.
        """
        adopted = arrays.adopt_params(params)
        if chunk_size is None:
            chunk_size = (
                DEFAULT_CHUNK_SIZE
                if adopted.device == "cpu"
                else max(max(1, int(math.prod(s))) for s in adopted.shapes)
            )
        sessions, _ = self._sessions_for(adopted.device)
        config = guard_config(guard)
        extra: dict[str, Any] = {}
        if config is not None:
            extra = {"guard": config, "guard_hook": guard_hook}
        return (Stepper if config is None else GuardedStepper)(
            self.manifest,
            sessions,
            params,
            adopted=adopted,
            lr=self.default_lr if lr is None else lr,
            chunk_size=chunk_size,
            on_nonfinite=on_nonfinite,
            all_reduce=all_reduce,
            executor=lambda: self._executor,
            threads=self.threads,
            weight_decay=weight_decay,
            array_ids=array_ids,
            num_arrays=num_arrays,
            **extra,
        )


def open_cuda_sessions(
    folder: Path, manifest: mf.Manifest, device: str, intra_op_threads: int
) -> tuple[dict[str, ort.InferenceSession], tuple[str, ...]]:
    """One CUDA-provider session per graph on ``device`` (``"cuda:N"``), checked after creation.

    onnxruntime silently falls back to the CPU when the CUDA provider cannot start (no driver,
    mismatched CUDA/cuDNN); the provider list is read back and that case raises instead.
    """
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise RuntimeError(
            f"the arrays live on {device} but this onnxruntime has no CUDAExecutionProvider "
            f"({available}); install onnxruntime-gpu or move the arrays to the CPU"
        )
    device_id = int(device.split(":")[1])
    providers: list[Any] = [
        ("CUDAExecutionProvider", {"device_id": device_id}),
        "CPUExecutionProvider",
    ]
    options = session_options(intra_op_threads)
    sessions: dict[str, ort.InferenceSession] = {}
    used: tuple[str, ...] = ()
    for role, spec in manifest.graphs.items():
        session = ort.InferenceSession(
            str(folder / spec.file), sess_options=options, providers=providers
        )
        check_signature(session, role, spec)
        used = tuple(session.get_providers())
        if not used or used[0] != "CUDAExecutionProvider":
            raise RuntimeError(
                f"graph {role!r}: the arrays live on {device} but onnxruntime runs {used} "
                f"(the CUDA provider failed to start; see onnxruntime's log)"
            )
        sessions[role] = session
    return sessions, used


def load(
    source: str | os.PathLike[str],
    *,
    threads: int | None = None,
    intra_op_threads: int = 1,
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    sha256: str | None = None,
) -> ExportedOptimizer:
    """Loads an exported optimizer after verifying its manifest and file hashes.

    Args:
      source: an exported folder, a built-in name (``"hyperadam"`` once one ships in
        ``runtime/builtin/``), or an MLflow ``models:/…`` / ``runs:/…`` URI (needs mlflow).
      sha256: the expected sha256 of the folder's ``manifest.json``, which pins every file
        (a registered version's ``manifest_sha256`` tag; ``sha256sum manifest.json``). Without
        it, a folder is checked against its own manifest only.
      threads: threads that run chunks in parallel (default: the CPUs this process may use).
      intra_op_threads: onnxruntime's threads inside one graph call (default 1; chunks are the
        better unit of parallelism for these small-matrix graphs).
      providers: onnxruntime execution providers, in priority order (default CPU).

    Raises:
      ManifestError: unknown format version, missing or modified file, unexpected layout.
      FileNotFoundError: if ``source`` names nothing.
    """
    folder = resolve_source(source)
    manifest = mf.load_manifest(folder, sha256=sha256)
    return ExportedOptimizer(
        folder, manifest, threads=threads, intra_op_threads=intra_op_threads, providers=providers
    )
