"""onnxruntime sessions for the graphs of an exported optimizer, checked against the manifest."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from . import manifest as mf
from .subnormals import preserved_float_mode

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)
_ORT_FLOAT = "tensor(float)"


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    """Sequential execution with ``intra_op_threads`` threads and no busy-waiting.

    Spinning is off: the runtime parallelises over chunks itself, and spinning pool threads
    steal the cores of everything else on a shared machine or inside a Ray actor.
    """
    if not isinstance(intra_op_threads, int) or intra_op_threads < 1:
        raise ValueError(f"intra_op_threads must be an integer >= 1, got {intra_op_threads!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Subnormals as zero in onnxruntime's own pool threads (runtime/subnormals.py does the
    # threads that call run).
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    options.log_severity_level = 3
    return options


def check_providers(providers: Sequence[str]) -> tuple[str, ...]:
    """Validates a provider list against what this onnxruntime build offers."""
    if isinstance(providers, str) or not providers:
        raise ValueError(f"providers must be a non-empty list of names, got {providers!r}")
    available = ort.get_available_providers()
    unknown = [p for p in providers if p not in available]
    if unknown:
        raise ValueError(f"providers {unknown} are not available in this onnxruntime ({available})")
    return tuple(providers)


def _signature_error(role: str, what: str, got: object, expected: object) -> mf.ManifestError:
    return mf.ManifestError(f"graph {role!r}: {what} are {got}, the manifest says {expected}")


def check_signature(session: ort.InferenceSession, role: str, spec: mf.GraphSpec) -> None:
    """The session's inputs and outputs must be exactly the manifest's (names, ranks, dtype)."""
    for what, actual, expected in (
        ("inputs", session.get_inputs(), spec.inputs),
        ("outputs", session.get_outputs(), spec.outputs),
    ):
        got = [(a.name, len(a.shape), a.type) for a in actual]
        want = [(e.name, len(e.shape), _ORT_FLOAT) for e in expected]
        if got != want:
            raise _signature_error(role, what, got, want)


def open_sessions(
    folder: Path,
    manifest: mf.Manifest,
    *,
    providers: Sequence[str],
    intra_op_threads: int,
) -> tuple[dict[str, ort.InferenceSession], tuple[str, ...]]:
    """Opens one session per graph role; returns them and the providers actually in use.

    The providers are read back from each session (``get_providers()``), not assumed: if the
    first requested provider is not among them (e.g. CUDA requested but unusable, so onnxruntime
    fell back to the CPU), this raises instead of running somewhere unexpected.
    """
    providers = check_providers(providers)
    options = session_options(intra_op_threads)
    sessions: dict[str, ort.InferenceSession] = {}
    used: tuple[str, ...] = ()
    for role, spec in manifest.graphs.items():
        # The first session of a process also sets the creating thread's mode, for good: the
        # caller's thread keeps the mode it had.
        with preserved_float_mode():
            session = ort.InferenceSession(
                str(folder / spec.file), sess_options=options, providers=list(providers)
            )
        check_signature(session, role, spec)
        used = tuple(session.get_providers())
        if providers[0] not in used:
            raise RuntimeError(
                f"graph {role!r}: requested provider {providers[0]} but onnxruntime uses {used}"
            )
        sessions[role] = session
    return sessions, used
