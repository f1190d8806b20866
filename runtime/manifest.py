"""The exported-optimizer folder format: every name, each method's state layout, the manifest.

This module is the single source of names (style §6.5): method names, graph roles and file
names, the input/output names and shapes of every graph, each method's state layout, how a step
is split into phases, and the manifest format version. ``export`` writes folders with these names
and ``runtime`` reads them; neither spells a name itself.

An exported optimizer is a folder (design §3.1)::

    manifest.json       ``Manifest.to_json()``
    fused.onnx          one whole step of a chunk (HyperAdam: only valid for a one-chunk model)
    state_stage.onnx    HyperAdam: (g, h, c, Σg²) → (h', c', Σ_rows h'² per column)
    update_stage.onnx   HyperAdam: (w, g, h', M, V, B, Γ, Σh'², ΣM², lr) → (w', M', …, Σ M'²)
    array_terms.onnx    per-array methods (tensor-wise HyperAdam): per-coordinate terms whose
                        mean over each bound array the step graph reads (``array_means``)
    theta.npz           θ in ``runtime.theta``'s format (not needed to run)

Graph tensors are **feature-major**: a per-coordinate state field with k features per coordinate
(the reference's ``[p, k]`` tensor) is a ``[k, n]`` graph tensor, so each feature is a contiguous
row. That makes the Split/Concat/broadcasts of the step contiguous copies and row broadcasts,
about 2× faster in onnxruntime than the coordinate-major ``[n, k]``. Checkpoints
(``state_dict``) keep the reference's coordinate-major layout.

``load_manifest`` checks the format version and the sha256 of every listed file before it reads
anything else, refuses files the manifest does not list and a folder without θ or one of its
graphs; with ``sha256=`` it first checks the manifest itself against a digest the caller trusts
(a registry's ``manifest_sha256`` tag, a pinned value), since nothing inside the folder can
vouch for ``manifest.json``. Standard library only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

FORMAT_NAME = "hyperadam.exported-optimizer"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST_FILE = "manifest.json"

DTYPE = "float32"  # every tensor; ε = 1e-24 underflows in fp16/bf16 (spec §8 #16)
COORDS = "n"  # symbolic name of the dynamic coordinate axis in graphs and manifest
OPSET = 18  # ≥ 18 (design §3.1 traps); Reduce* take their axes as inputs from 18 on
IR_VERSION = 8  # the IR of opset 18; onnxruntime(-gpu) 1.31 loads IR ≤ 13, onnx 1.23 writes 14
MAX_IR_VERSION = 13

# -- methods: the names meta_train.optimizers.make_learned_optimizer takes -----------------------
HYPERADAM = "hyperadam"
DM = "dm"
RNNPROP = "rnnprop"
# The tensor-wise HyperAdam variant (``meta_train.optimizers.hyperadam_tensor``, issue 15): its
# cells see g / rms_T(g) over the gradient's own bound array T; bounded or ELU weights.
HYPERADAM_TENSOR = "hyperadam-tensor"
HYPERADAM_TENSOR_UNBOUNDED = "hyperadam-tensor-unbounded"
# The bounded variant with an adaptive per-tensor step scale ℓ_T, moved each step by the cosine
# between the array's gradient and its previous step direction.
HYPERADAM_TENSOR_ADAPTIVE = "hyperadam-tensor-adaptive"
# The same step scale, its cosine taken between the gradient and the gradient's long-run trend
# (the β = 0.99 momentum feature of the incoming state) instead of the previous step direction.
HYPERADAM_TENSOR_TREND = "hyperadam-tensor-trend"
# The trend rule at a rate that starts fast and settles, κ_t = κ + (κ₀ − κ)·exp(−t/100); the
# same state and statistics as the trend variant (the rate is a function of the step count).
HYPERADAM_TENSOR_TREND_ANNEALED = "hyperadam-tensor-trend-annealed"

# -- graph roles and their files -------------------------------------------------------------
FUSED = "fused"
STATE_STAGE = "state_stage"
UPDATE_STAGE = "update_stage"
ARRAY_TERMS = "array_terms"  # per-array methods: the per-coordinate terms of their statistics
GRAPH_FILES = {
    FUSED: "fused.onnx",
    STATE_STAGE: "state_stage.onnx",
    UPDATE_STAGE: "update_stage.onnx",
    ARRAY_TERMS: "array_terms.onnx",
}
# θ itself (runtime.theta format), kept beside the graphs for lineage and for the torch
# reference; the runtime only checks its hash.
THETA_FILE = "theta.npz"

# -- tensor names ------------------------------------------------------------------------------
PARAM = "w"  # [n] parameters of the chunk, flattened
GRAD = "grad"  # [n] gradient of the chunk
LR = "lr"  # [] step size α
GRAD_SUM_SQ = "grad_sum_sq"  # [] Σ g² over ALL coordinates of the model
H_COL_SUM_SQ = "h_col_sum_sq"  # [J] Σ_rows h'² per column (a chunk's partial out, global in)
M_COL_SUM_SQ = "m_col_sum_sq"  # [J] Σ_rows M² per column, carried from the previous step
STEP = "step"  # [1] RNNprop's step count t (float, as RNNpropState.step)
STEP_COUNT = "t"  # [1] the tensor-wise variant's step count (float, as TensorwiseState.t)
# Per-array statistics (design: a statistic is the mean of a per-coordinate term over the
# coordinate's bound array, over every shard of it). ``array_terms.onnx`` writes the S terms of
# each coordinate as ARRAY_TERMS [S, n]; the runtime sums them per array (float64), all-reduces
# the sums and the arrays' sizes across shards, divides, and feeds each coordinate its arrays'
# means as ARRAY_MEANS [S, n] to the step graph. A method may name some statistics "summed"
# (``MethodInfo.summed_statistics``): their rows hold the sum over the array, not the mean.
ARRAY_TERMS_OUT = "array_terms"
ARRAY_MEANS = "array_means"

# The fields of the reference's state NamedTuples, in their order.
HYPERADAM_FIELDS = ("h", "c", "m", "v", "b", "gamma")  # HyperAdamState, each [p, J]
DM_FIELDS = ("h1", "c1", "h2", "c2")  # DMState, each [p, H]
RNNPROP_FIELDS = ("m", "v", "step", "h1", "c1", "h2", "c2")  # RNNpropState
# TensorwiseState's per-coordinate fields (its ``t`` is carried; ``segment`` and
# ``segment_size`` are the tensor layout, which the runtime knows from the bound arrays).
TENSORWISE_FIELDS = ("h", "c", "m", "v", "b", "gamma", "feat_m", "feat_v")
TENSORWISE_FEATURE_MOMENTA = 3  # feat_m: momenta at 3 fixed timescales (FEATURE_BETAS)
# The tensor-wise variant's per-array statistics, in the rows of ARRAY_TERMS / ARRAY_MEANS:
# g², whose mean over the array is rms_T(g)².
TENSORWISE_STATISTICS = ("grad_sq",)
# The adaptive variant's state adds ℓ_T (TensorwiseState.log_scale), one value per coordinate
# (every coordinate of a tensor holds its tensor's).
TENSORWISE_ADAPTIVE_FIELDS = (*TENSORWISE_FIELDS, "log_scale")
# Its statistics: rms_T(g)² as above, then the three sums of the cosine between the gradient and
# the previous step direction D = Σ_j ρ_j(h) M̂_j of the incoming state, cos_T(g, D) =
# Σ g·D / (√Σ g² · √Σ D² + 1e-30). Sums, not means: the reference adds its 1e-30 to the product
# of the norms, which the means would scale by the array's size.
TENSORWISE_ADAPTIVE_STATISTICS = (
    "grad_sq",
    "grad_sq_sum",
    "grad_dot_last_step_sum",
    "last_step_sq_sum",
)
TENSORWISE_ADAPTIVE_SUMMED = TENSORWISE_ADAPTIVE_STATISTICS[1:]
TENSORWISE_TERMS_STATE = ("h", "m", "v", "b", "gamma")  # what D is recomputed from
# The trend variant's: the same layout and the same four rows, the cosine's other side being the
# trend y = feat_m's β = 0.99 row (the reference's TREND_FEATURE) of the incoming state,
# cos_T(g, y) = Σ g·y / (√Σ g² · √Σ y² + 1e-30); its terms graph reads only feat_m.
TENSORWISE_TREND_STATISTICS = ("grad_sq", "grad_sq_sum", "grad_dot_trend_sum", "trend_sq_sum")
TENSORWISE_TREND_SUMMED = TENSORWISE_TREND_STATISTICS[1:]
TENSORWISE_TREND_TERMS_STATE = ("feat_m",)
# What the step scale's cosine compares the gradient with (the reference's ``scale_reference``)
# → its statistics and the state fields its terms graph reads.
TENSORWISE_SCALE_REFERENCES = {
    "step": (TENSORWISE_ADAPTIVE_STATISTICS, TENSORWISE_TERMS_STATE),
    "trend": (TENSORWISE_TREND_STATISTICS, TENSORWISE_TREND_TERMS_STATE),
}


def updated(name: str) -> str:
    """Name of the output that replaces input ``name`` after a step (``h`` → ``h_new``)."""
    return f"{name}_new"


class ManifestError(ValueError):
    """An exported-optimizer folder that this runtime must not use (named file and reason)."""


# -- layouts and graph signatures ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, shape (``"n"`` = coordinate axis), dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = DTYPE

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    """The file and the signature of one graph role."""

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }


@dataclasses.dataclass(frozen=True)
class Field:
    """A per-coordinate state field: ``shape`` features per coordinate (``()`` or ``(k,)``)."""

    name: str
    shape: tuple[int, ...]

    @property
    def graph_shape(self) -> tuple[int | str, ...]:
        return (*self.shape, COORDS)  # feature-major

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class Carried:
    """A small global quantity a step hands to the next one.

    ``combine`` says how the values that chunks (or shards) emit become the global one: ``"sum"``
    adds partial sums (HyperAdam's Σ M'²), ``"same"`` takes the value every chunk emits alike
    (RNNprop's step count).
    """

    name: str
    shape: tuple[int, ...]
    combine: str


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Optimizer state: per-coordinate fields and carried global quantities, all fp32."""

    fields: tuple[Field, ...]
    carried: tuple[Carried, ...]

    @property
    def bytes_per_coordinate(self) -> int:
        return 4 * sum(f.size for f in self.fields)

    def to_json(self) -> dict[str, Any]:
        return {
            "per_coordinate": [{"name": f.name, "shape": list(f.shape)} for f in self.fields],
            "carried": [
                {"name": c.name, "shape": list(c.shape), "combine": c.combine} for c in self.carried
            ],
            "dtype": DTYPE,
            "graph_layout": "feature-major: a field of shape [k] is a [k, n] graph tensor",
            "checkpoint_layout": "coordinate-major: a field of shape [k] is a [p, k] array",
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> StateLayout:
        return cls(
            tuple(Field(f["name"], tuple(f["shape"])) for f in raw["per_coordinate"]),
            tuple(Carried(c["name"], tuple(c["shape"]), c["combine"]) for c in raw["carried"]),
        )


@dataclasses.dataclass(frozen=True)
class Phase:
    """One pass over all chunks with graph ``role``; ``reductions`` are outputs that are summed
    over chunks (and all-reduced over shards) and then fed, under the same name, to later phases.
    """

    role: str
    reductions: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    """What a method's folder contains and how a runtime runs one step of it.

    ``array_statistics`` names the per-array statistics the step graphs read (rows of
    ``ARRAY_MEANS``); when there are any, the ``ARRAY_TERMS`` graph runs over every chunk
    before ``phases`` (see ``ARRAY_MEANS``), in the fused path too. ``summed_statistics`` are
    those among them whose row holds the term's sum over the array instead of its mean.
    """

    config_keys: tuple[str, ...]
    layout: Callable[..., StateLayout]  # (**config) -> StateLayout
    graphs: Callable[..., dict[str, GraphSpec]]  # (**config) -> {role: GraphSpec}
    phases: tuple[Phase, ...]  # the chunked / sharded step, in order (Σg² is computed first)
    array_statistics: tuple[str, ...] = ()
    summed_statistics: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.summed_statistics) - set(self.array_statistics)
        if unknown:
            raise ValueError(f"summed statistics {sorted(unknown)} are not array statistics")


def _fused(layout: StateLayout, statistics: int = 0) -> GraphSpec:
    """w, g, [the per-array means,] every state field, every carried value, lr → their updated
    versions."""
    fields = [TensorSpec(f.name, f.graph_shape) for f in layout.fields]
    carried = [TensorSpec(c.name, c.shape) for c in layout.carried]
    w, g, lr = TensorSpec(PARAM, (COORDS,)), TensorSpec(GRAD, (COORDS,)), TensorSpec(LR, ())
    means = (TensorSpec(ARRAY_MEANS, (statistics, COORDS)),) if statistics else ()
    outs = [TensorSpec(updated(t.name), t.shape) for t in (w, *fields, *carried)]
    return GraphSpec(GRAPH_FILES[FUSED], (w, g, *means, *fields, *carried, lr), tuple(outs))


def hyperadam_layout(num_candidates: int) -> StateLayout:
    j = num_candidates
    return StateLayout(
        tuple(Field(name, (j,)) for name in HYPERADAM_FIELDS),
        (Carried(M_COL_SUM_SQ, (j,), "sum"),),
    )


def hyperadam_graphs(num_candidates: int) -> dict[str, GraphSpec]:
    """Fused, state-stage and update-stage graphs of design §3.1."""
    j = num_candidates
    layout = hyperadam_layout(j)
    w, g, lr = TensorSpec(PARAM, (COORDS,)), TensorSpec(GRAD, (COORDS,)), TensorSpec(LR, ())
    per = {f.name: TensorSpec(f.name, f.graph_shape) for f in layout.fields}
    new = {f.name: TensorSpec(updated(f.name), f.graph_shape) for f in layout.fields}
    h_cols, m_cols = TensorSpec(H_COL_SUM_SQ, (j,)), TensorSpec(M_COL_SUM_SQ, (j,))
    moments = HYPERADAM_FIELDS[2:]
    return {
        FUSED: _fused(layout),
        STATE_STAGE: GraphSpec(
            GRAPH_FILES[STATE_STAGE],
            (g, per["h"], per["c"], TensorSpec(GRAD_SUM_SQ, ())),
            (new["h"], new["c"], h_cols),
        ),
        UPDATE_STAGE: GraphSpec(
            GRAPH_FILES[UPDATE_STAGE],
            (w, g, new["h"], *(per[m] for m in moments), h_cols, m_cols, lr),
            (
                TensorSpec(updated(PARAM), (COORDS,)),
                *(new[m] for m in moments),
                TensorSpec(updated(M_COL_SUM_SQ), (j,)),
            ),
        ),
    }


def dm_layout(hidden_size: int) -> StateLayout:
    return StateLayout(tuple(Field(name, (hidden_size,)) for name in DM_FIELDS), ())


def rnnprop_layout(hidden_size: int) -> StateLayout:
    fields = tuple(
        Field(name, () if name in ("m", "v") else (hidden_size,))
        for name in RNNPROP_FIELDS
        if name != STEP
    )
    return StateLayout(fields, (Carried(STEP, (1,), "same"),))


def tensorwise_layout(num_candidates: int, *, adaptive: bool = False) -> StateLayout:
    j = num_candidates
    shapes = {"feat_m": (TENSORWISE_FEATURE_MOMENTA,), "feat_v": (1,), "log_scale": ()}
    names = TENSORWISE_ADAPTIVE_FIELDS if adaptive else TENSORWISE_FIELDS
    return StateLayout(
        tuple(Field(name, shapes.get(name, (j,))) for name in names),
        (Carried(STEP_COUNT, (1,), "same"),),
    )


def tensorwise_graphs(
    num_candidates: int, *, adaptive: bool = False, scale_reference: str = "step"
) -> dict[str, GraphSpec]:
    """The per-coordinate terms graph and one fused step graph, which (given the per-array
    statistics) is coordinate-wise and so runs on any chunk.

    The terms graph reads g (g → g²); the adaptive variant's also reads the StateCell state h
    and the moments (m, v, b, γ) of the incoming state, from which it recomputes the previous
    step direction D (g → g², g², g·D, D²); with ``scale_reference="trend"`` (the trend
    variant) it reads feat_m instead, whose β = 0.99 row is the trend y (g → g², g², g·y, y²)."""
    if scale_reference not in TENSORWISE_SCALE_REFERENCES:
        raise ValueError(
            f"scale_reference must be one of {sorted(TENSORWISE_SCALE_REFERENCES)}, "
            f"got {scale_reference!r}"
        )
    if scale_reference != "step" and not adaptive:
        raise ValueError("scale_reference applies to the adaptive step scale only")
    statistics, read = (
        TENSORWISE_SCALE_REFERENCES[scale_reference] if adaptive else (TENSORWISE_STATISTICS, ())
    )
    layout = tensorwise_layout(num_candidates, adaptive=adaptive)
    s = len(statistics)
    state = tuple(TensorSpec(f.name, f.graph_shape) for f in layout.fields if f.name in read)
    return {
        ARRAY_TERMS: GraphSpec(
            GRAPH_FILES[ARRAY_TERMS],
            (TensorSpec(GRAD, (COORDS,)), *state),
            (TensorSpec(ARRAY_TERMS_OUT, (s, COORDS)),),
        ),
        FUSED: _fused(layout, s),
    }


_TENSORWISE = MethodInfo(
    ("num_candidates",),
    tensorwise_layout,
    tensorwise_graphs,
    (Phase(FUSED),),
    TENSORWISE_STATISTICS,
)
_TENSORWISE_TREND = MethodInfo(
    ("num_candidates",),
    partial(tensorwise_layout, adaptive=True),
    partial(tensorwise_graphs, adaptive=True, scale_reference="trend"),
    (Phase(FUSED),),
    TENSORWISE_TREND_STATISTICS,
    TENSORWISE_TREND_SUMMED,
)

METHODS: dict[str, MethodInfo] = {
    HYPERADAM: MethodInfo(
        ("num_candidates",),
        hyperadam_layout,
        hyperadam_graphs,
        (Phase(STATE_STAGE, (H_COL_SUM_SQ,)), Phase(UPDATE_STAGE)),
    ),
    DM: MethodInfo(
        ("hidden_size",),
        dm_layout,
        lambda hidden_size: {FUSED: _fused(dm_layout(hidden_size))},
        (Phase(FUSED),),
    ),
    RNNPROP: MethodInfo(
        ("hidden_size",),
        rnnprop_layout,
        lambda hidden_size: {FUSED: _fused(rnnprop_layout(hidden_size))},
        (Phase(FUSED),),
    ),
    HYPERADAM_TENSOR: _TENSORWISE,
    HYPERADAM_TENSOR_UNBOUNDED: _TENSORWISE,
    HYPERADAM_TENSOR_ADAPTIVE: MethodInfo(
        ("num_candidates",),
        partial(tensorwise_layout, adaptive=True),
        partial(tensorwise_graphs, adaptive=True),
        (Phase(FUSED),),
        TENSORWISE_ADAPTIVE_STATISTICS,
        TENSORWISE_ADAPTIVE_SUMMED,
    ),
    HYPERADAM_TENSOR_TREND: _TENSORWISE_TREND,
    HYPERADAM_TENSOR_TREND_ANNEALED: _TENSORWISE_TREND,
}


def method_info(method: str) -> MethodInfo:
    if method not in METHODS:
        raise ManifestError(
            f"method must be one of {sorted(METHODS)}, got {method!r}: this runtime does not "
            "know that optimizer (variant); upgrade hyperadam to run it"
        )
    return METHODS[method]


# -- the manifest ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to know about an exported optimizer (``manifest.json``).

    ``files`` maps every file of the folder except the manifest to its sha256. ``lineage`` holds
    ``mlflow_run_id``, ``step``, ``task_digest`` (each may be None) and ``theta_sha256``;
    ``parity`` the export-time parity check (metric, tolerances, per-case errors).
    """

    method: str
    config: Mapping[str, int]
    default_lr: float
    state: StateLayout
    graphs: Mapping[str, GraphSpec]
    files: Mapping[str, str]
    lineage: Mapping[str, Any]
    versions: Mapping[str, str | None]  # None: not installed as a distribution
    parity: Mapping[str, Any]
    opset: int = OPSET
    ir_version: int = IR_VERSION
    format_version: int = FORMAT_VERSION

    @property
    def info(self) -> MethodInfo:
        return method_info(self.method)

    def to_json(self) -> dict[str, Any]:
        statistics = statistics_json(self.info)
        return {
            **({"per_array_statistics": statistics} if statistics else {}),
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "method": self.method,
            "config": dict(self.config),
            "default_lr": self.default_lr,
            "dtype": DTYPE,
            "coordinate_axis": COORDS,
            "opset": self.opset,
            "ir_version": self.ir_version,
            "state": self.state.to_json(),
            "graphs": {role: spec.to_json() for role, spec in self.graphs.items()},
            "files": dict(self.files),
            "lineage": dict(self.lineage),
            "versions": dict(self.versions),
            "parity": dict(self.parity),
        }

    def write(self, folder: str | Path) -> Path:
        """Writes ``manifest.json`` into ``folder`` (sorted keys, stable bytes)."""
        path = Path(folder) / MANIFEST_FILE
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        return path


def statistics_json(info: MethodInfo) -> dict[str, Any] | None:
    """The manifest's ``per_array_statistics`` entry of a method (None: it has none, and its
    manifest has no such key, as before per-array methods existed)."""
    if not info.array_statistics:
        return None
    if not info.summed_statistics:  # as the entry was before summed statistics existed
        return {
            "terms": list(info.array_statistics),
            "graph": ARRAY_TERMS,
            "input": ARRAY_MEANS,
            "reduce": "mean of each term over the coordinate's bound array (all its chunks and "
            "shards), fed per coordinate as a row of array_means",
        }
    return {
        "terms": list(info.array_statistics),
        "summed": list(info.summed_statistics),
        "graph": ARRAY_TERMS,
        "input": ARRAY_MEANS,
        "reduce": "mean of each term over the coordinate's bound array (all its chunks and "
        "shards), its sum for the terms under 'summed', fed per coordinate as a row of "
        "array_means",
    }


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(folder: str | Path, *, sha256: str | None = None) -> Manifest:
    """Reads and verifies ``folder/manifest.json``.

    Order of checks: the manifest exists (and has ``sha256`` when one is given) and is JSON; its
    format name and version are known; the folder holds nothing the manifest does not list;
    every listed file is present with the listed sha256; only then the rest (method, config,
    state layout, graph signatures, θ and every graph listed) is parsed and compared with what
    this runtime expects.

    Args:
      folder: an exported-optimizer folder.
      sha256: the expected sha256 of ``manifest.json`` (pins the whole folder: the manifest
        lists every other file's sha256). Without it, an edited manifest whose own listing is
        consistent (e.g. a changed ``default_lr``) cannot be told from the exported one.

    Raises:
      ManifestError: naming the file and what is wrong with it.
    """
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{folder} has no {MANIFEST_FILE}: not an exported optimizer folder")
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256.lower():
            raise ManifestError(
                f"{path} has sha256 {actual}, expected {sha256}: the manifest was modified "
                "or this is another exported optimizer"
            )
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ManifestError(f"{path}: format must be {FORMAT_NAME!r}, got {got!r}")
    version = raw.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ManifestError(
            f"{path}: format_version {version!r} is not supported by this runtime "
            f"(supported: {list(SUPPORTED_FORMAT_VERSIONS)}); upgrade hyperadam or re-export"
        )
    files = _check_files(folder, raw.get("files"))
    return _parse(raw, files, path)


def _check_files(folder: Path, files: Any) -> dict[str, str]:
    if not isinstance(files, dict) or not files:
        raise ManifestError(f"{folder / MANIFEST_FILE}: 'files' must map file names to sha256")
    # Nothing the manifest does not vouch for: a stray file may be a swapped-in graph or θ that
    # some other reader of the folder picks up.
    unlisted = sorted(p.name for p in folder.iterdir() if p.name not in (*files, MANIFEST_FILE))
    if unlisted:
        raise ManifestError(
            f"{folder} holds files that {MANIFEST_FILE} does not list: {', '.join(unlisted)}"
        )
    for name, expected in files.items():
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ManifestError(f"{folder / MANIFEST_FILE}: file name {name!r} is not a plain name")
        path = folder / name
        if not path.is_file():
            raise ManifestError(f"{name} is listed in {MANIFEST_FILE} but missing from {folder}")
        actual = sha256_file(path)
        if actual != expected:
            raise ManifestError(
                f"{name} does not match its sha256 in {MANIFEST_FILE} (expected {expected}, "
                f"file has {actual}): the folder was modified after export"
            )
    return dict(files)


def _tensor(raw: Mapping[str, Any]) -> TensorSpec:
    return TensorSpec(raw["name"], tuple(raw["shape"]), raw["dtype"])


def _parse(raw: dict[str, Any], files: dict[str, str], path: Path) -> Manifest:
    try:
        info = method_info(raw["method"])
        config = raw["config"]
        if not isinstance(config, dict) or sorted(config) != sorted(info.config_keys):
            raise ManifestError(f"config must have keys {list(info.config_keys)}, got {config!r}")
        if not all(type(v) is int and v >= 1 for v in config.values()):
            raise ManifestError(f"config values must be integers >= 1, got {config!r}")
        graphs = {
            role: GraphSpec(
                g["file"],
                tuple(_tensor(t) for t in g["inputs"]),
                tuple(_tensor(t) for t in g["outputs"]),
            )
            for role, g in raw["graphs"].items()
        }
        manifest = Manifest(
            method=raw["method"],
            config=config,
            default_lr=float(raw["default_lr"]),
            state=StateLayout.from_json(raw["state"]),
            graphs=graphs,
            files=files,
            lineage=raw["lineage"],
            versions=raw["versions"],
            parity=raw["parity"],
            opset=int(raw["opset"]),
            ir_version=int(raw["ir_version"]),
            format_version=raw["format_version"],
        )
    except ManifestError as err:
        raise ManifestError(f"{path}: {err}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ManifestError(f"{path}: malformed manifest ({type(err).__name__}: {err})") from None
    _check_contents(manifest, info, path)
    if raw.get("per_array_statistics") != statistics_json(info):
        raise ManifestError(
            f"{path}: per_array_statistics {raw.get('per_array_statistics')!r} differ from what "
            f"this runtime computes for {manifest.method} ({statistics_json(info)!r})"
        )
    return manifest


def _check_contents(manifest: Manifest, info: MethodInfo, path: Path) -> None:
    expected_layout = info.layout(**manifest.config)
    if manifest.state != expected_layout:
        raise ManifestError(
            f"{path}: state layout {manifest.state.to_json()} differs from the "
            f"{manifest.method} layout this runtime expects {expected_layout.to_json()}"
        )
    expected_graphs = info.graphs(**manifest.config)
    if dict(manifest.graphs) != expected_graphs:
        raise ManifestError(
            f"{path}: graphs {sorted(manifest.graphs)} do not have the names, files and shapes "
            f"this runtime expects for {manifest.method} (roles {sorted(expected_graphs)})"
        )
    for role, spec in manifest.graphs.items():
        if spec.file not in manifest.files:
            raise ManifestError(f"{path}: graph {role!r} file {spec.file} has no sha256 in 'files'")
    if THETA_FILE not in manifest.files:
        raise ManifestError(f"{path}: {THETA_FILE} has no sha256 in 'files' (θ is required)")
    if not (math.isfinite(manifest.default_lr) and manifest.default_lr > 0):
        raise ManifestError(
            f"{path}: default_lr must be a finite number > 0, got {manifest.default_lr}"
        )
    if manifest.opset < OPSET or not 1 <= manifest.ir_version <= MAX_IR_VERSION:
        raise ManifestError(
            f"{path}: need opset >= {OPSET} and IR version <= {MAX_IR_VERSION}, got opset "
            f"{manifest.opset}, IR {manifest.ir_version}"
        )
