"""The whole configuration of a meta-training run, as frozen dataclasses (house style §6.10).

A run is described by one ``RunConfig``. Its *identity* (everything that changes what θ becomes:
optimizer, recipe, task family, seed, meta-batch, ...) is logged as MLflow params and hashed into
the config digest; the *execution* fields (``MUTABLE_ON_RESUME``: step budget, worker count,
timeouts, checkpoint period, tracking location) may differ when a run is resumed.

The optimizer chooses its recipe (spec §3, §7): HyperAdam averages the meta-loss over the
truncation and trains with both tricks; RNNprop scores the last step and uses both tricks;
DMoptimizer averages and uses neither. ``build_config`` starts from that recipe and applies the
values of a config file and of command-line flags on top. Experiments beyond the recipe live in
one section, ``experimental`` (``experimental.ExperimentalConfig``).

The identity carries a schema version (``SCHEMA_VERSION``): at schema 2 it is the whole config
but the execution fields, with ``"schema": 2`` (fields added since are left out at the value
earlier runs used, ``_SCHEMA_2_OMITTED``). Runs recorded before schema versions (schema 1)
left out every field added after them at its recorded value, and kept the experiments inside
``init``, ``meta_optim`` and ``validation``; their identity is still computed exactly
(``identity(config, schema=1)``), so their logged params, digests and θ lineage still verify,
and their config files and checkpoints still load (``from_dict`` reads both layouts).

The task-family mixes (``experimental.family_mix``) were family settings (``family.activation``
a list, ``family.model``, ...) until issue 18; config files and checkpoints written so still load
(``mixes_in_experimental``), and every identity, at either schema, is computed with the mixes
back in ``family`` (``mixes_in_family``), as its runs logged them: their digests do not change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import config as config_lib
from .experimental import AdamStart, EstimatorConfig, ExperimentalConfig, HorizonConfig
from .optimizers.hyperadam import IMPLEMENTATIONS
from .smoke_family import QuadraticFamily, QuadraticFamilyConfig
from .tasks.base import TaskFamily
from .tasks.family import (
    DM_FAMILY,
    HYPERADAM_FAMILY,
    RNNPROP_FAMILY,
    MetaTaskFamily,
    MetaTaskFamilyConfig,
    check_mix,
    join_mixes,
    split_mixes,
)
from .tasks.small_family import SmallFamilyConfig, SmallTaskFamily
from .training import MetaOptimConfig, ThetaInitConfig
from .unroll import UnrollConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: JSON config files only
    tomllib = None

OPTIMIZERS = ("hyperadam", "rnnprop", "dm")
DEVICES = ("cpu", "cuda")  # where gradient workers meta-train
TASKS = ("mnist", "quadratic", "small")  # meta-training task families
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "hyperadam"
DEFAULT_VALIDATION_TASK = "mnist-nn-sigmoid-100"
SCHEMA_VERSION = 2  # of the identity; bump when a field's meaning or the layout changes
# Fields that may change when a run is resumed: they decide how and where the run executes,
# never what θ becomes. Everything else must match the run's logged params.
MUTABLE_ON_RESUME = (
    "steps",
    "workers",
    "checkpoint_every",
    "call_timeout_s",
    "worker_start_timeout_s",
    "max_worker_restarts",
    "tracking",
)
# Schema 1, frozen: the fields it left out of the identity at the value those runs used (added
# after runs were recorded), in its own layout. A dotted name reaches into a section.
_SCHEMA_1_INIT = {
    "kind": "spec",
    "adam_lr": 0.0220971,
    "beta1": 0.9,
    "beta2": 0.999,
    "theta": None,
    "theta_sha256": None,
    "pre_kernel_scale": 1.0,
}
# Fields added after schema 2 was introduced: its identity leaves them out at these values (what
# every run before them did), so the digests of the runs it recorded stay valid.
_SCHEMA_2_OMITTED: dict[str, Any] = {
    "device": "cpu",
    "batch_slots": False,
    "experimental.variant": "paper",
    "experimental.estimator": config_lib.to_plain(EstimatorConfig()),
    "experimental.horizons": config_lib.to_plain(HorizonConfig()),
    "experimental.frozen": [],
    # the small family's convex member (issue 15, session 16); the default is the family's own
    "family.convex_conditions": list(SmallFamilyConfig.convex_conditions),
    # the depth of its 28×28 MLPs (issue 15, session 19)
    "family.mnist28_max_depth": SmallFamilyConfig.mnist28_max_depth,
    # how its convex problems are scored (issue 15, session 20)
    "family.convex_excess_floor": SmallFamilyConfig.convex_excess_floor,
}
_SCHEMA_1_OMITTED: dict[str, Any] = {
    "init": _SCHEMA_1_INIT,
    "init.theta": None,
    "init.theta_sha256": None,
    "init.pre_kernel_scale": 1.0,
    "validation.score": "loss",
    "meta_optim.half_life": None,
    "family.model": "mlp",
    "family.lstm_layers": 1,
    "family.noise_std": 0.1,
    **_SCHEMA_2_OMITTED,
}
# Schema 1's places of the experiments: (section, field) → experimental field.
_SCHEMA_1_PLACES = {
    ("init", "pre_kernel_scale"): "pre_kernel_scale",
    ("meta_optim", "half_life"): "meta_lr_half_life",
    ("validation", "score"): "validation_score",
}
_SCHEMA_1_ADAM = {"adam_lr": "lr", "beta1": "beta1", "beta2": "beta2"}  # init.X → adam_start.Y

_RECIPES = {
    # optimizer → (meta-loss over a truncation, MNIST family with its tricks)
    "hyperadam": ("mean", HYPERADAM_FAMILY),
    "rnnprop": ("last", RNNPROP_FAMILY),
    "dm": ("mean", DM_FAMILY),
}


def _check_int(name: str, value: Any, minimum: int, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    """Periodic validation of θ (spec §3: 10 runs on mnist-nn-sigmoid-100, final loss).

    ``task`` may name several test tasks: θ is then scored by the mean over the tasks of their
    mean final loss (each task runs ``runs`` times), so that selecting the best θ guards
    against a θ that trades one task for another.
    """

    task: str | tuple[str, ...] = DEFAULT_VALIDATION_TASK  # key(s) of tasks.suite.TEST_TASKS
    runs: int = 10
    every: int = 50  # meta-steps between validations; 0 = never
    steps: int | None = None  # inner steps per run; None = the task's horizon
    # Not 0: `hyperadam reproduce` reports seed 0's runs, and the best θ is selected on these,
    # so the report's runs must not be the ones θ was selected on.
    seed: int = 1

    def __post_init__(self) -> None:
        from .tasks.suite import TEST_TASKS

        tasks = self.task if isinstance(self.task, (list, tuple)) else (self.task,)
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"validation.task: needs distinct tasks, got {list(tasks)!r}")
        for name in tasks:
            if name not in TEST_TASKS:
                raise ValueError(
                    f"validation.task: unknown task {name!r}; known: {', '.join(TEST_TASKS)}"
                )
        # One task is the plain setting: it means (and digests) the same as the string.
        object.__setattr__(self, "task", tasks[0] if len(tasks) == 1 else tuple(tasks))
        _check_int("validation.runs", self.runs, 1)
        _check_int("validation.every", self.every, 0)
        _check_int("validation.steps", self.steps, 1, allow_none=True)
        _check_int("validation.seed", self.seed, 0)

    @property
    def tasks(self) -> tuple[str, ...]:
        """The validation tasks, in order (one for the usual single-task setting)."""
        return self.task if isinstance(self.task, tuple) else (self.task,)


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """Where the run is recorded; only the learner talks to it."""

    uri: str = DEFAULT_TRACKING_URI
    experiment: str = DEFAULT_EXPERIMENT
    flush_timeout_s: float = 300.0  # how long the end of a run waits for an absent server

    def __post_init__(self) -> None:
        if not isinstance(self.uri, str) or not self.uri:
            raise ValueError(f"tracking.uri must be a non-empty string, got {self.uri!r}")
        if not isinstance(self.experiment, str) or not self.experiment:
            raise ValueError(
                f"tracking.experiment must be a non-empty string, got {self.experiment!r}"
            )
        _check_positive("tracking.flush_timeout_s", self.flush_timeout_s)


FamilyConfig = MetaTaskFamilyConfig | QuadraticFamilyConfig | SmallFamilyConfig
_FAMILY_CONFIGS = {
    "mnist": MetaTaskFamilyConfig,
    "quadratic": QuadraticFamilyConfig,
    "small": SmallFamilyConfig,
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A meta-training run. ``workers``/``meta_batch`` None are sized to the cluster at start.

    Attributes:
      optimizer: "hyperadam", "rnnprop" or "dm".
      task: the meta-training task family: "mnist" (spec §3), "quadratic" (smoke runs) or
        "small" (issue 15's broad, cheap family: ``tasks/small_family.py``).
      num_candidates: J of HyperAdam (20); the baselines have no J and require 20.
      implementation: HyperAdam's step, "fast" (fused CPU kernels) or "reference" (plain
        torch); they agree to round-off, so it is part of the run's identity. The other
        optimizers have only their reference.
      seed: the run seed; every task, initialisation and minibatch derives from it.
      steps: the number of meta-updates to reach.
      meta_batch: trajectories (slots) averaged per meta-update.
      workers: Ray gradient workers (one CPU each).
      staleness: bound on how many θ versions a gradient may lag; 0 = synchronous.
      checkpoint_every: meta-steps between checkpoints; 0 = only at the end and on Ctrl-C.
      unroll: horizon, truncation, meta-loss and inner step size.
      meta_optim: Adam on θ (lr 1e-4) and optional clipping.
      init: where θ starts (the spec's random init, or a given θ).
      family: the task family's config (``MetaTaskFamilyConfig`` or ``QuadraticFamilyConfig``).
      validation: periodic validation.
      experimental: the experiments beyond the paper's recipe (all off by default).
      tracking: MLflow location.
      call_timeout_s: a worker call running longer is treated as a dead worker.
      worker_start_timeout_s: how long the workers may take to start (an autoscaling cluster
        may have to launch nodes first).
      max_worker_restarts: the run fails after this many worker replacements.
      device: where workers meta-train: "cpu", or "cuda" (one GPU per worker, Ray
        ``num_gpus``; its slots batched, ``batched.py``).
      batch_slots: a CPU worker computes its slots as one batch (the GPU path on the CPU).
        Batched results agree with unbatched ones to round-off, so both are identity.
    """

    optimizer: str = "hyperadam"
    task: str = "mnist"
    num_candidates: int = 20
    implementation: str = "fast"
    seed: int = 0
    steps: int = 100
    meta_batch: int | None = None
    workers: int | None = None
    staleness: int = 0
    checkpoint_every: int = 25
    unroll: UnrollConfig = UnrollConfig()
    meta_optim: MetaOptimConfig = MetaOptimConfig()
    init: ThetaInitConfig = ThetaInitConfig()
    family: FamilyConfig = HYPERADAM_FAMILY
    validation: ValidationConfig = ValidationConfig()
    experimental: ExperimentalConfig = ExperimentalConfig()
    tracking: TrackingConfig = TrackingConfig()
    call_timeout_s: float = 900.0
    worker_start_timeout_s: float = 900.0
    max_worker_restarts: int = 20
    device: str = "cpu"
    batch_slots: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}"
            )
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; known: {', '.join(TASKS)}")
        expected = _FAMILY_CONFIGS[self.task]
        if not isinstance(self.family, expected):
            raise ValueError(
                f"task {self.task!r} needs a {expected.__name__}, got {type(self.family).__name__}"
            )
        if self.experimental.family_mix is not None:
            if not isinstance(self.family, MetaTaskFamilyConfig):
                raise ValueError(
                    f"experimental.family_mix applies to task 'mnist' only, not {self.task!r}"
                )
            check_mix(self.family, self.experimental.family_mix)
        _check_int("num_candidates", self.num_candidates, 1)
        if self.optimizer != "hyperadam" and self.num_candidates != 20:
            raise ValueError(
                f"num_candidates (J) applies to hyperadam only; {self.optimizer} needs 20, "
                f"got {self.num_candidates}"
            )
        if self.experimental.adam_start is not None and self.optimizer != "hyperadam":
            raise ValueError(
                f"experimental.adam_start applies to hyperadam only, not {self.optimizer}"
            )
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"unknown implementation {self.implementation!r}; "
                f"known: {', '.join(IMPLEMENTATIONS)}"
            )
        _check_int("seed", self.seed, 0)
        _check_int("steps", self.steps, 0)
        _check_int("meta_batch", self.meta_batch, 1, allow_none=True)
        _check_int("workers", self.workers, 1, allow_none=True)
        _check_int("staleness", self.staleness, 0)
        _check_int("checkpoint_every", self.checkpoint_every, 0)
        _check_positive("call_timeout_s", self.call_timeout_s)
        _check_positive("worker_start_timeout_s", self.worker_start_timeout_s)
        _check_int("max_worker_restarts", self.max_worker_restarts, 0)
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if not isinstance(self.batch_slots, bool):
            raise ValueError(f"batch_slots must be true or false, got {self.batch_slots!r}")
        if self.batched and self.optimizer == "hyperadam" and self.implementation != "reference":
            raise ValueError(
                "batched workers (device 'cuda' or batch_slots) run HyperAdam's torch reference "
                "step: set implementation = \"reference\""
            )
        self._check_experiments()

    def _check_experiments(self) -> None:
        """The experimental fields that depend on the rest of the config."""
        experimental = self.experimental
        if experimental.variant != "paper":
            if self.optimizer != "hyperadam":
                raise ValueError(
                    f"experimental.variant applies to hyperadam only, not {self.optimizer}"
                )
            if self.batched:
                raise ValueError(
                    f"experimental.variant {experimental.variant!r} has no batched step: "
                    "set device = \"cpu\" and batch_slots = false"
                )
            adam = experimental.adam_start
            if adam is not None and experimental.variant != "tensor-unbounded":
                from .optimizers.hyperadam_tensor import RHO_MAX, TENSORWISE_DEFAULT_LR

                reach = RHO_MAX * TENSORWISE_DEFAULT_LR
                if not adam.lr < reach:
                    raise ValueError(
                        f"experimental.adam_start.lr must be < {reach:g} with variant "
                        f"{experimental.variant!r} "
                        f"(its bounded step reaches at most Adam at that lr), got {adam.lr}"
                    )
        for name, off in (("estimator", "tbptt"), ("horizons", "fixed")):
            if self.batched and getattr(experimental, name).kind != off:
                raise ValueError(
                    f"experimental.{name}.kind {getattr(experimental, name).kind!r} is not "
                    "supported by batched workers (device 'cuda' or batch_slots): set "
                    "device = \"cpu\" and batch_slots = false"
                )
        if experimental.horizons.kind != "fixed":
            experimental.horizons.truncation_range(self.unroll.truncation)  # raises if empty
        if experimental.frozen:
            from .meta_update import trainable_mask

            trainable_mask(self.make_optimizer(), experimental.frozen)  # raises on a bad name

    # -- derived views ----------------------------------------------------------------------

    @property
    def batched(self) -> bool:
        """Whether workers compute their slots as one batch (``batched.py``)."""
        return self.batch_slots or self.device != "cpu"

    @property
    def resolved(self) -> bool:
        return self.meta_batch is not None and self.workers is not None

    def resolve(self, cpus: int) -> RunConfig:
        """Fills in ``workers`` (the cluster's CPUs, at most the meta-batch) and ``meta_batch``."""
        workers = self.workers if self.workers is not None else max(1, int(cpus))
        meta_batch = self.meta_batch if self.meta_batch is not None else workers
        # More workers than slots would only hold CPUs: each worker owns at least one slot.
        return dataclasses.replace(self, workers=min(workers, meta_batch), meta_batch=meta_batch)

    def meta_lr_at(self, step: int) -> float:
        """The meta lr of meta-step ``step`` (0-based): ``meta_optim.lr``, on a schedule if any."""
        return self.experimental.meta_lr_at(self.meta_optim.lr, step)

    def make_optimizer(self):
        """The learned optimizer this run trains (fresh, θ not initialised)."""
        from .optimizers import make_learned_optimizer
        from .optimizers.hyperadam import HyperAdam

        if self.optimizer == "hyperadam":
            if self.experimental.variant != "paper":
                from .optimizers.hyperadam_tensor import TensorwiseHyperAdam

                variant = self.experimental.variant
                return TensorwiseHyperAdam(
                    self.num_candidates,
                    bounded=variant != "tensor-unbounded",
                    adaptive_scale=variant
                    in ("tensor-adaptive", "tensor-trend", "tensor-trend-annealed"),
                    scale_reference="trend" if variant.startswith("tensor-trend") else "step",
                    anneal_rate=variant == "tensor-trend-annealed",
                )
            return HyperAdam(self.num_candidates, implementation=self.implementation)
        return make_learned_optimizer(self.optimizer)

    def make_family(self, data_dir: str | Path | None = None) -> TaskFamily:
        """The task family (datasets are loaded lazily, once per process)."""
        if isinstance(self.family, QuadraticFamilyConfig):
            return QuadraticFamily(self.family)
        if isinstance(self.family, SmallFamilyConfig):
            return SmallTaskFamily(self.family)  # its 8×8 MNIST is the packaged one
        return MetaTaskFamily(self.family, data_dir=data_dir, mix=self.experimental.family_mix)

    def make_schedule(self):
        """Where each slot's trajectories begin and end (``schedule.TrajectorySchedule``)."""
        from .schedule import TrajectorySchedule

        return TrajectorySchedule(self.unroll, self.experimental.horizons, self.seed)

    def to_dict(self) -> dict[str, Any]:
        return config_lib.to_plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Strict inverse of ``to_dict``: unknown keys are refused, missing ones default."""
        return _from_plain(data)


def identity(
    config: RunConfig | Mapping[str, Any], *, schema: int = SCHEMA_VERSION
) -> dict[str, Any]:
    """The part of the config that decides θ (logged as params, compared on resume).

    Accepts a ``RunConfig`` or its plain data (possibly not yet validated, in either layout).
    ``schema`` 1 gives the identity that runs recorded before schema versions logged.
    """
    if schema not in (1, SCHEMA_VERSION):
        raise ValueError(f"unknown identity schema {schema!r}; known: 1, {SCHEMA_VERSION}")
    if isinstance(config, Mapping):
        # Completed when valid (fields a saved config predates take their defaults); an
        # invalid one is compared as it is, so that its fields show in the mismatches.
        with contextlib.suppress(ValueError):
            config = RunConfig.from_dict(config)
    plain = config.to_dict() if isinstance(config, RunConfig) else schema_2_layout(config)
    plain = mixes_in_family(plain)
    for name in MUTABLE_ON_RESUME:
        plain.pop(name, None)
    if schema == SCHEMA_VERSION:
        return {"schema": SCHEMA_VERSION, **_without_omitted(plain, _SCHEMA_2_OMITTED)}
    return _without_omitted(_schema_1_layout(plain), _SCHEMA_1_OMITTED)


def _without_omitted(plain: dict[str, Any], omitted: Mapping[str, Any]) -> dict[str, Any]:
    """``plain`` without each field (a dotted name reaches into a section) that holds the
    value ``omitted`` gives it; the sections touched are copied, the caller's data kept."""
    for name, value in omitted.items():
        *sections, field = name.split(".")
        table: dict[str, Any] | None = plain
        for section in sections:
            assert table is not None  # the loop breaks when it becomes None
            inner = table.get(section)
            if not isinstance(inner, Mapping):
                table = None
                break
            table[section] = table = dict(inner)
        if table is not None and field in table and table[field] == value:
            del table[field]
    return plain


def schema_2_layout(data: Mapping[str, Any]) -> dict[str, Any]:
    """Plain config data with schema 1's experiment fields moved into ``experimental``.

    Schema 1 kept them in ``init`` (``kind = "adam"`` with ``adam_lr``/``beta1``/``beta2``,
    ``pre_kernel_scale``), ``meta_optim.half_life`` and ``validation.score``. A value in its
    old place wins over one in ``experimental``: an old config file given on top of a saved
    config is the later layer. The caller's data is not changed.
    """
    plain = dict(data)
    experimental = dict(plain.get("experimental") or {})
    for (section, field), target in _SCHEMA_1_PLACES.items():
        table = plain.get(section)
        if isinstance(table, Mapping) and field in table:
            table = dict(table)
            experimental[target] = table.pop(field)
            plain[section] = table
    init = plain.get("init")
    if isinstance(init, Mapping) and (
        init.get("kind") == "adam" or _SCHEMA_1_ADAM.keys() & init.keys()
    ):
        init = dict(init)
        adam = {new: init.pop(old) for old, new in _SCHEMA_1_ADAM.items() if old in init}
        if init.get("kind") == "adam":
            init["kind"] = "spec"
            experimental["adam_start"] = adam
        plain["init"] = init
    if experimental:
        plain["experimental"] = experimental
    return plain


def mixes_in_experimental(data: Mapping[str, Any]) -> dict[str, Any]:
    """Plain config data with the task-family mixes moved from ``family`` (where configs kept
    them before issue 18) into ``experimental.family_mix`` (``tasks.family.split_mixes``).

    A value in the old place wins over one in ``experimental``, as in ``schema_2_layout``. The
    caller's data is not changed.
    """
    plain = dict(data)
    family = plain.get("family")
    if plain.get("task", "mnist") != "mnist" or not isinstance(family, Mapping):
        return plain
    settings, mix = split_mixes(dict(family))
    if mix:
        plain["family"] = settings
        experimental = dict(plain.get("experimental") or {})
        given = experimental.get("family_mix")
        experimental["family_mix"] = {**given, **mix} if isinstance(given, Mapping) else mix
        plain["experimental"] = experimental
    return plain


def mixes_in_family(plain: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of ``mixes_in_experimental``, in the layout identities were computed in before
    issue 18: ``experimental`` without ``family_mix``, and an MNIST family with every mix
    setting (``tasks.family.join_mixes``). The digest-compatibility shim of the identity."""
    plain = dict(plain)
    experimental = plain.get("experimental")
    mix = None
    if isinstance(experimental, Mapping) and "family_mix" in experimental:
        experimental = dict(experimental)
        mix = experimental.pop("family_mix")
        plain["experimental"] = experimental
    family = plain.get("family")
    if plain.get("task", "mnist") == "mnist" and isinstance(family, Mapping):
        plain["family"] = join_mixes(dict(family), mix if isinstance(mix, Mapping) else None)
    elif mix is not None:  # invalid (a mix without an MNIST family): compared as it is
        plain["experimental"] = {**plain.get("experimental", {}), "family_mix": mix}
    return plain


def _schema_1_layout(plain: dict[str, Any]) -> dict[str, Any]:
    """Schema-2 plain data in schema 1's layout (every field present, as its to_dict gave)."""
    plain = dict(plain)
    experimental = {**config_lib.to_plain(ExperimentalConfig()), **plain.pop("experimental", {})}
    init = {**_SCHEMA_1_INIT, **plain.get("init", {})}
    adam = experimental["adam_start"]
    if adam is not None:
        adam = {**config_lib.to_plain(AdamStart()), **adam}  # plain data may leave some out
        init.update(kind="adam", adam_lr=adam["lr"], beta1=adam["beta1"], beta2=adam["beta2"])
    plain["init"] = init
    for (section, field), source in _SCHEMA_1_PLACES.items():
        plain[section] = {**plain.get(section, {}), field: experimental[source]}
    return plain


def identity_params(
    config: RunConfig | Mapping[str, Any], *, schema: int = SCHEMA_VERSION
) -> dict[str, str]:
    """``identity`` flattened to dotted MLflow params (``unroll.horizon``)."""
    return config_lib.flatten(identity(config, schema=schema))


def config_digest(config: RunConfig | Mapping[str, Any], *, schema: int = SCHEMA_VERSION) -> str:
    """sha256 of the canonical JSON of the identity (at ``schema``; 1 for runs logged before
    schema versions)."""
    return config_lib.digest(identity(config, schema=schema))


def logged_schema(logged: Mapping[str, str]) -> int:
    """The identity schema of a run's logged params (1 if they predate schema versions)."""
    value = logged.get("schema", "1")
    if value not in ("1", str(SCHEMA_VERSION)):
        raise ValueError(
            f"the run's identity has schema {value}; this version of hyperadam reads 1 and "
            f"{SCHEMA_VERSION}"
        )
    return int(value)


def identity_mismatches(
    logged: Mapping[str, str], config: RunConfig | Mapping[str, Any]
) -> list[str]:
    """Fields whose value differs from the logged params, as ``name (run: a, given: b)``.

    The comparison is made at the schema the params were logged at.
    """
    given = identity_params(config, schema=logged_schema(logged))
    out = []
    for name in sorted(set(logged) | set(given)):
        if logged.get(name) != given.get(name):
            out.append(f"{name} (run: {logged.get(name)}, given: {given.get(name)})")
    return out


def recipe(optimizer: str, task: str = "mnist") -> dict[str, Any]:
    """The paper's recipe for ``optimizer`` as plain config data (spec §3, §7)."""
    if optimizer not in _RECIPES:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    meta_loss, family = _RECIPES[optimizer]
    family_config = family if task == "mnist" else _FAMILY_CONFIGS[task]()
    return {
        "optimizer": optimizer,
        "task": task,
        "unroll": config_lib.to_plain(UnrollConfig(meta_loss=meta_loss)),
        "family": config_lib.to_plain(family_config),
    }


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of plain config data: nested tables are merged key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def build_config(*layers: Mapping[str, Any]) -> RunConfig:
    """The recipe of the chosen optimizer, then each layer (config file, flags) on top."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = merge(merged, layer)
    config = RunConfig.from_dict(
        merge(recipe(merged.get("optimizer", "hyperadam"), merged.get("task", "mnist")), merged)
    )
    if config.init.kind == "theta" and config.init.theta_sha256 is None:
        # Pin the starting θ by content: the identity records its digest beside the path, and
        # the run refuses a file that no longer has it.
        from .training import read_theta_sha256

        try:
            digest = read_theta_sha256(str(config.init.theta))
        except (FileNotFoundError, ValueError) as error:
            raise ValueError(f"init.theta: {error}") from None
        config = dataclasses.replace(
            config, init=dataclasses.replace(config.init, theta_sha256=digest)
        )
    return config


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Reads a ``--config`` file: JSON (``.json``) or TOML (``.toml``), same nesting as
    ``RunConfig.to_dict()``; unknown keys are refused later, by ``build_config``."""
    path = Path(path)
    name = repr(str(path))
    if path.suffix not in (".json", ".toml"):
        raise ValueError(f"config file {name} must end in .json or .toml")
    if path.suffix == ".toml" and tomllib is None:
        raise ValueError("TOML config files need Python >= 3.11; use a .json file")
    if not path.is_file():
        raise ValueError(f"config file {name} not found")
    text = path.read_text()
    try:  # JSONDecodeError and TOMLDecodeError are both ValueErrors
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except ValueError as error:
        raise ValueError(f"config file {name} is not valid: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {name} must hold a table/object at the top")
    return data


def _fields_of(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where or 'config'} must be a table/object, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(f"unknown config field(s): {', '.join(prefix + u for u in unknown)}")
    return dict(data)


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    fields = _fields_of(cls, data, where)
    try:
        return cls(**fields)
    except (TypeError, ValueError) as error:  # name the table the bad value came from
        message = str(error)
        if message.startswith(f"{where}."):
            raise ValueError(message) from None
        raise ValueError(f"{where}: {message}") from None


def _from_plain(data: Mapping[str, Any]) -> RunConfig:
    if isinstance(data, Mapping):
        data = mixes_in_experimental(schema_2_layout(data))
    values = _fields_of(RunConfig, data, "")
    task = values.get("task", "mnist")
    family_config = _FAMILY_CONFIGS.get(task, MetaTaskFamilyConfig)
    nested = {
        "unroll": UnrollConfig,
        "meta_optim": MetaOptimConfig,
        "init": ThetaInitConfig,
        "validation": ValidationConfig,
        "experimental": ExperimentalConfig,
        "tracking": TrackingConfig,
        "family": family_config,
    }
    for name, cls in nested.items():
        if name in values:
            values[name] = _build(cls, values[name], name)
    if task in _FAMILY_CONFIGS and task != "mnist" and "family" not in values:
        values["family"] = family_config()
    try:
        return RunConfig(**values)
    except TypeError as error:
        raise ValueError(f"invalid config: {error}") from None
