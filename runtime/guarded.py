"""``GuardedStepper``: a ``Stepper`` whose learned steps are watched by ``runtime.guard``.

The stateful edge of the guard for arrays stepped in place (numpy, and torch/CuPy through
``runtime.torch`` or directly): it keeps the snapshot (copies of the parameters and of the
learned optimizer's state, on the arrays' device), runs the fallback Adam on the bound arrays,
and reports each fallback to a hook. ``runtime.guard`` decides; this module only moves buffers.

Example::

    stepper = runtime.load("hyperadam").bind(params, guard=True)
    for batch in data:
        loss, grads = loss_and_grads(params, batch)
        stepper.step(grads, loss=loss)            # restores and falls back when loss blows up
    print(stepper.num_fallbacks)
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from . import arrays, per_array
from . import guard as gd
from .stepper import NonFiniteGradientError, Stepper

_GUARD_KEY = "guard"


class GuardEvent(NamedTuple):
    """One fallback, as handed to a ``guard_hook``."""

    step: int  # the index of the step call that fired it (counting every call)
    num_fallbacks: int  # fallbacks so far, this one included
    reason: str  # "loss" (non-finite or risen) or "update size"
    loss: float | None  # the loss that fired it (None for the update-size guard)
    fallback_steps: int  # Adam steps this fallback runs


GuardHook = Callable[[GuardEvent], None]


def mlflow_hook(run_id: str | None = None, tracking_uri: str | None = None) -> GuardHook:
    """A hook logging ``guard/fallbacks`` to an MLflow run (``run_id``; None: the run active
    when the fallback happens). Imports mlflow when it first logs."""

    def log(event: GuardEvent) -> None:
        import mlflow

        target = run_id
        if target is None:
            active = mlflow.active_run()
            if active is None:
                return
            target = active.info.run_id
        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        client.log_metric(target, gd.FALLBACKS_METRIC, event.num_fallbacks, step=event.step)

    return log


def active_mlflow_hook(event: GuardEvent) -> None:
    """The default hook: logs to MLflow's active run if this process uses MLflow at all (it is
    already imported) and has one; never imports mlflow itself."""
    if "mlflow" in sys.modules:
        mlflow_hook()(event)


def _copy_into(target: Any, source: Any) -> None:
    """``target[...] = source`` on the arrays' device (numpy, torch or CuPy)."""
    if isinstance(target, np.ndarray):
        np.copyto(target, source)
    elif hasattr(target, "copy_"):
        target.copy_(source)
    else:
        target[...] = source


@dataclasses.dataclass
class _Snapshot:
    """The last good point: parameters (flat) and the learned state, in the stepper's layout
    and on its device."""

    params: list[Any]
    fields: dict[str, Any]
    carried: dict[str, np.ndarray]
    num_steps: int


class GuardedStepper(Stepper):
    """A ``Stepper`` with ``runtime.guard``: ``step(grads, loss=...)``; see ``GuardConfig``.

    Made by ``runtime.ExportedOptimizer.bind(..., guard=True | GuardConfig(...))``.

    Attributes:
      guard: the ``GuardConfig``. guard_state: the ``GuardState`` (``num_fallbacks`` also as an
      attribute). num_adam_steps: fallback Adam steps taken.
    """

    def __init__(
        self,
        *args: Any,
        guard: gd.GuardConfig,
        guard_hook: GuardHook | None = active_mlflow_hook,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.guard_state = gd.init_guard()
        self._hook = guard_hook
        self._snapshot: _Snapshot | None = None
        self._spare: _Snapshot | None = None
        self._before: list[Any] | None = None
        self._adam: gd.AdamMoments | None = None
        self.num_adam_steps = 0
        self.num_calls = 0  # step calls that went through (the guard's own step counter)

    @property
    def num_fallbacks(self) -> int:
        return self.guard_state.num_fallbacks

    def step(self, grads: Sequence[Any], loss: Any = None) -> bool:
        """One step: learned, or Adam during a fallback; returns False when nothing was applied
        (a restore, or a skipped non-finite gradient).

        Args:
          grads: as ``Stepper.step``.
          loss: the loss of the current parameters (the one ``grads`` are the gradient of), a
            float or 0-d array/tensor; None: the update-size guard watches this step instead.
            Sharded (``all_reduce``): required, and the same global value on every shard, so
            that every shard decides alike.

        Raises:
          as ``Stepper.step``; a bad loss raises TypeError. Nothing changes on error.
        """
        value = None if loss is None else gd.check_loss(loss)
        if value is None and self._all_reduce is not None:
            raise ValueError(
                "a sharded guarded step needs the loss (the same global value on every shard): "
                "without it each shard would judge its own update size and they could diverge"
            )
        self._check_usable()
        arrays.check_unchanged(self._sources, self._adopted)
        flat_grads = arrays.adopt_grads(grads, self._adopted)  # bad input raises here
        decision, state = gd.before_step(self.guard, self.guard_state, value)
        if decision.restore:
            self._restore(state, "loss", value)
            return False
        # The snapshot and the guard's state are kept only once the step went through: a step
        # that raises or is skipped leaves every buffer, the guard's included, as it was. New
        # snapshots are written into the spare buffers, which become the snapshot on success.
        snapshot = self._take_snapshot() if decision.snapshot else self._snapshot
        applied = False
        try:
            if decision.use_adam:
                applied = self._adam_step(flat_grads, decision)
            else:
                before = self._copy_params() if value is None else None
                applied = super().step(grads)
                if applied and before is not None:
                    lrs = per_array.array_lrs(self._lr_exact, self._lr_scales)
                    ratio = gd.update_rms_over_lr(before, self._flat, lrs)
                    ok, state = gd.after_learned_step(self.guard, state, ratio)
                    if not ok:
                        self._commit(snapshot)
                        self._restore(state, "update size", None)
                        return False
        finally:
            if not applied and snapshot is not self._snapshot:
                self._spare = snapshot  # not taken after all: the buffers stay spare
        self._commit(snapshot)
        self.guard_state = state
        self.num_calls += 1
        return True

    # -- fallback --------------------------------------------------------------------------

    def _adam_step(self, flat_grads: list[Any], decision: gd.Decision) -> bool:
        sum_sq = self._backend.sum_of_squares(flat_grads)
        if self._all_reduce is not None:  # every shard skips (or raises) alike
            sum_sq = float(self._reduce(np.array([sum_sq]))[0])
        if not math.isfinite(sum_sq):
            if self._on_nonfinite == "skip":
                self.num_skipped += 1
                return False
            raise NonFiniteGradientError(
                "a gradient contains NaN or inf during a guard fallback (on_nonfinite='raise'); "
                "nothing was changed"
            )
        if decision.fresh_adam or self._adam is None:
            zeros = [self._backend.zeros(p.size) for p in self._flat]
            self._adam = gd.AdamMoments(0, zeros, [self._backend.zeros(p.size) for p in self._flat])
        lr = self._lr_exact if decision.lr is None else decision.lr
        lrs = per_array.array_lrs(lr, self._lr_scales)
        per_array.decay_in_place(self._flat, self._weight_decay, lrs)
        self._adam = gd.adam_update(self.guard, self._adam, self._flat, flat_grads, lrs)
        self.num_adam_steps += 1
        return True

    # -- snapshots -------------------------------------------------------------------------

    def _take_snapshot(self) -> _Snapshot:
        """The parameters and the learned state as they are now, copied on their device into
        the spare buffers (allocated once: a snapshot is a copy, never an allocation)."""
        spare = self._spare or _Snapshot(
            [self._backend.zeros(p.size) for p in self._flat],
            {name: self._backend.zeros(v.shape[0]) for name, v in self._fields.items()},
            {name: np.zeros_like(v) for name, v in self._carried.items()},
            0,
        )
        self._spare = None
        for target, source in zip(spare.params, self._flat, strict=True):
            _copy_into(target, source)
        for name, source in self._fields.items():
            _copy_into(spare.fields[name], source)
        for name, source in self._carried.items():
            np.copyto(spare.carried[name], source)
        spare.num_steps = self.num_steps
        return spare

    def _commit(self, snapshot: _Snapshot | None) -> None:
        if snapshot is not self._snapshot:
            self._spare, self._snapshot = self._snapshot, snapshot

    def _copy_params(self) -> list[Any]:
        """The parameters before a learned step, for the update-size guard (reused buffers)."""
        if self._before is None:
            self._before = [self._backend.zeros(p.size) for p in self._flat]
        for target, source in zip(self._before, self._flat, strict=True):
            _copy_into(target, source)
        return self._before

    def _restore(self, state: gd.GuardState, reason: str, loss: float | None) -> None:
        snapshot = self._snapshot
        assert snapshot is not None  # before_step restores only after a snapshot
        for target, saved in zip(self._flat, snapshot.params, strict=True):
            _copy_into(target, saved)
        for name, saved in snapshot.fields.items():
            _copy_into(self._fields[name], saved)
        for name, saved in snapshot.carried.items():
            np.copyto(self._carried[name], saved)
        self.num_steps = snapshot.num_steps
        self._broken = None
        self.guard_state = state
        self.num_calls += 1
        if self._hook is not None:
            self._hook(
                GuardEvent(
                    self.num_calls - 1,
                    state.num_fallbacks,
                    reason,
                    loss,
                    state.fallback_left,
                )
            )

    # -- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``Stepper.state_dict()`` plus ``"guard"``: its state, the snapshot and Adam's moments
        (numpy arrays), so a run continues exactly, mid-fallback included."""
        saved = super().state_dict()
        host = self._backend.to_host
        snapshot = None
        if self._snapshot is not None:
            state = {k: host(v).copy() for k, v in self._snapshot.fields.items()}
            state.update({k: v.copy() for k, v in self._snapshot.carried.items()})
            snapshot = {
                "params": [host(p).copy() for p in self._snapshot.params],
                "state": state,  # raw_state() layout: valid for this chunk layout only
                "chunks": [[c.start, c.stop] for c in self._chunks],
                "num_steps": self._snapshot.num_steps,
            }
        adam = None
        if self._adam is not None:
            adam = {
                "count": self._adam.count,
                "m": [host(m).copy() for m in self._adam.m],
                "v": [host(v).copy() for v in self._adam.v],
            }
        saved[_GUARD_KEY] = {
            "state": self.guard_state._asdict(),
            "snapshot": snapshot,
            "adam": adam,
            "num_adam_steps": self.num_adam_steps,
            "num_calls": self.num_calls,
        }
        return saved

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores a ``state_dict()``; one saved without a guard starts the guard afresh."""
        state_dict = dict(state_dict)
        saved = state_dict.pop(_GUARD_KEY, None)
        checked = self.check_guard_state(saved)
        super().load_state_dict(state_dict)
        if checked is None:
            self.guard_state, self._snapshot, self._adam = gd.init_guard(), None, None
            self.num_adam_steps = self.num_calls = 0
            return
        self.guard_state, snapshot, adam, self.num_adam_steps, self.num_calls = checked
        self._snapshot = self._spare = None
        if snapshot is not None:
            state = snapshot["state"]
            self._snapshot = _Snapshot(
                [self._device_copy(p) for p in snapshot["params"]],
                {name: self._device_copy(state[name]) for name in self._fields},
                {name: np.array(state[name], np.float32) for name in self._carried},
                int(snapshot["num_steps"]),
            )
        self._adam = None
        if adam is not None:
            self._adam = gd.AdamMoments(
                adam["count"],
                [self._device_copy(m) for m in adam["m"]],
                [self._device_copy(v) for v in adam["v"]],
            )

    def _device_copy(self, host: np.ndarray) -> Any:
        buffer = self._backend.zeros(host.size)
        self._backend.from_host(buffer, np.ascontiguousarray(host, np.float32).reshape(-1))
        return buffer

    def check_guard_state(self, saved: Any) -> tuple[Any, ...] | None:
        """Checks the ``"guard"`` entry before anything is replaced."""
        if saved is None:
            return None
        try:
            state = gd.GuardState(**saved["state"])
            sizes = [p.size for p in self._flat]
            snapshot, adam = saved["snapshot"], saved["adam"]
            if snapshot is not None:
                if [np.size(p) for p in snapshot["params"]] != sizes:
                    raise ValueError("the snapshot's parameters differ in size from the bound ones")
                shapes = {k: tuple(np.shape(v)) for k, v in snapshot["state"].items()}
                if shapes != self.raw_state_shapes():
                    raise ValueError("the snapshot's optimizer state has other entries or shapes")
                if [list(c) for c in snapshot["chunks"]] != [
                    [c.start, c.stop] for c in self._chunks
                ]:
                    raise ValueError(
                        "the snapshot was saved with another chunk layout (chunk_size); load it "
                        "into a stepper bound with the same chunk_size"
                    )
            if adam is not None and not (
                [np.size(m) for m in adam["m"]] == sizes == [np.size(v) for v in adam["v"]]
            ):
                raise ValueError("Adam's moments differ in size from the bound parameters")
            return state, snapshot, adam, int(saved["num_adam_steps"]), int(saved["num_calls"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"state_dict['guard'] is malformed: {err!r}") from None
