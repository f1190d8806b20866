"""``runtime.torch.LearnedOptimizer``: an exported learned optimizer as a ``torch.optim.Optimizer``.

Imports torch; the rest of the runtime does not (import this module only where torch is used).

Example::

    from runtime.torch import LearnedOptimizer

    opt = LearnedOptimizer(model.parameters(), source="hyperadam", lr=0.005)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100, gamma=0.5)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        sched.step()

Beyond the step: per-group ``lr`` and ``weight_decay`` (AdamW's decoupled decay), bf16/fp16
parameters through fp32 master copies, and ``guard=True`` (``runtime/guard.py``), which watches
the loss given to ``step(closure)`` or ``step(loss=...)`` and falls back to Adam on a blow-up.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from . import guard as _guard
from . import optimizer as _optimizer
from . import per_array, validation
from .guarded import GuardedStepper, GuardHook, active_mlflow_hook
from .stepper import AllReduce, Stepper

_RUNTIME_KEY = "hyperadam_runtime"  # the non-per-parameter part of the state dict
_MASTER = "master"  # the per-parameter state entry of a half-precision parameter's fp32 copy
HALF_DTYPES = (torch.bfloat16, torch.float16)


class LearnedOptimizer(torch.optim.Optimizer):
    """A learned optimizer (HyperAdam by default) run by onnxruntime on the model's tensors.

    One ``step`` is one global step over every parameter of every group: HyperAdam normalises
    over all coordinates together, so its state never depends on how the parameters are
    grouped. Each group's ``lr`` scales that group's learned update (and ``weight_decay`` its
    decay), as in ``torch.optim``; schedulers write ``group["lr"]`` as usual. Parameters on the
    CPU are updated in place through zero-copy views of their storage; CUDA parameters through
    DLPack on the CUDA provider.

    Keeping biases, norms and embeddings out of weight decay (as with AdamW): give them a group
    of their own with ``weight_decay=0``::

        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
        rest = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
        opt = LearnedOptimizer([{"params": decay, "weight_decay": 0.1},
                                {"params": rest, "weight_decay": 0.0}], lr=1e-3)

    Half precision: bfloat16/float16 parameters are stepped through float32 master copies kept
    here (``state_dict()["state"][i]["master"]``): the learned step runs on the master, which is
    then rounded into the parameter; gradients are read as float32. A half parameter changed
    outside the optimizer (``model.load_state_dict``) is noticed through its version counter
    and its master re-read from it.

    ``OneCycleLR`` cycles momentum by default, which needs a ``momentum`` or ``betas`` option:
    the learned optimizer has neither, so pass ``cycle_momentum=False``.

    Missing gradients: a parameter whose ``.grad`` is None takes part in the step with a zero
    gradient (mathematically its gradient: it did not influence the loss). Skipping it, as
    ``torch.optim`` does, would change the global normalisation of every other coordinate and
    leave its LSTM/moment state a step behind; with a zero gradient its state evolves as it did
    during meta-training, and it may still move (the learned momentum keeps acting, as Adam's
    would given a zero gradient). When *every* gradient is None (``step`` before any
    ``backward``), nothing happens, as in ``torch.optim``.

    Args:
      params: the tensors or param-group dicts to optimise (float32, bfloat16 or float16,
        C-contiguous, one device).
      source: an exported folder, a built-in name (``"hyperadam"``), an MLflow URI, or an
        already loaded ``runtime.ExportedOptimizer`` (default: ``"hyperadam"``).
      lr: step size α, ``group["lr"]`` (default: the export's, 0.005 for HyperAdam).
      weight_decay: decoupled weight decay λ, ``group["weight_decay"]``: each step first scales
        the parameter by ``1 − lr·λ``, exactly as ``torch.optim.AdamW`` (default 0).
      guard: ``True`` or a ``runtime.guard.GuardConfig``: ``step(closure)`` / ``step(loss=…)``
        hand the loss to the guard, which restores the last good parameters and state and
        runs Adam for a while when the loss turns non-finite or rises well above its best;
        without a loss it bounds the update size. ``num_fallbacks`` counts fallbacks.
      guard_hook: called with each ``GuardEvent`` (default: logs ``guard/fallbacks`` to MLflow's
        active run if this process uses MLflow).
      chunk_size, on_nonfinite, all_reduce: as ``runtime.ExportedOptimizer.bind``. With
        ``on_nonfinite="skip"``, a step with NaN/inf gradients changes nothing.
      threads: CPU threads for chunks (default: the CPUs this process may use).
      array_ids, num_arrays: as ``runtime.ExportedOptimizer.bind``, one id per parameter in
        param-group order (a sharded per-array method, e.g. the tensor-wise HyperAdam, needs
        them; default: each parameter is its own array).

    Raises:
      TypeError / ValueError: bad arguments or parameters, before anything is created.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        source: str | os.PathLike[str] | _optimizer.ExportedOptimizer = "hyperadam",
        lr: float | None = None,
        *,
        weight_decay: float = 0.0,
        guard: bool | _guard.GuardConfig | None = None,
        guard_hook: GuardHook | None = active_mlflow_hook,
        chunk_size: int | None = None,
        on_nonfinite: str = "raise",
        all_reduce: AllReduce | None = None,
        threads: int | None = None,
        array_ids: Sequence[int] | None = None,
        num_arrays: int | None = None,
    ) -> None:
        self.runtime = (
            source
            if isinstance(source, _optimizer.ExportedOptimizer)
            else _optimizer.load(source, threads=threads)
        )
        lr = validation.check_lr(self.runtime.default_lr if lr is None else lr)
        weight_decay = per_array.check_weight_decay(weight_decay, 1)[0]
        self._bind_options: dict[str, Any] = {
            "chunk_size": chunk_size,
            "on_nonfinite": on_nonfinite,
            "all_reduce": all_reduce,
            "guard": _guard.guard_config(guard),
            "guard_hook": guard_hook,
            "array_ids": None if array_ids is None else list(array_ids),
            "num_arrays": num_arrays,
        }
        self._stepper: Stepper | None = None
        self._zero_grads: dict[int, torch.Tensor] = {}
        self._masters: dict[int, torch.Tensor] = {}  # id(half parameter) → its fp32 copy
        self._versions: dict[int, int] = {}  # id(half parameter) → version after our write
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self._rebind()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("weight_decay", 0.0)  # state dicts saved before weight decay

    # -- binding -------------------------------------------------------------------------------

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _bound(self, p: torch.Tensor) -> torch.Tensor:
        """What the stepper steps for ``p``: ``p`` itself, or its fp32 master if ``p`` is half."""
        if p.dtype not in HALF_DTYPES:
            return p
        master = self._masters.get(id(p))
        if master is None:
            master = self._masters[id(p)] = p.detach().to(torch.float32).contiguous()
            self._versions[id(p)] = p._version
        return master

    def _rebind(self) -> None:
        """Binds every parameter; state already there is kept, new parameters start at zero."""
        for group in self.param_groups:
            per_array.check_weight_decay(group["weight_decay"], 1)
        params = [self._bound(p) for p in self._all_params()]
        old = self._stepper
        stepper = self.runtime.bind(params, **self._bind_options)
        if old is not None:
            saved = old.state_dict()
            saved.pop("guard", None)  # the guard starts afresh on the new parameter set
            added = stepper.num_coords - old.num_coords
            for name, value in saved["state"].items():
                if value.shape[:1] == (old.num_coords,):  # per-coordinate: zeros for new ones
                    pad = np.zeros((added, *value.shape[1:]), np.float32)
                    saved["state"][name] = np.concatenate([value, pad])
            saved["param_shapes"] = [list(p.shape) for p in params]
            stepper.load_state_dict(saved)
        self._stepper = stepper

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group; its parameters join the one global step with zero optimizer state (a
        guard starts afresh: its snapshot was of the old parameter set)."""
        bound = getattr(self, "_stepper", None) is not None
        if bound and self._bind_options["array_ids"] is not None:
            raise ValueError(
                "add_param_group with array_ids: the ids name every parameter; build a new "
                "LearnedOptimizer with the full parameter list and its array_ids instead"
            )
        super().add_param_group(param_group)
        if getattr(self, "_stepper", None) is not None:
            self._rebind()

    @property
    def stepper(self) -> Stepper:
        """The runtime stepper that owns the optimizer state."""
        assert self._stepper is not None
        return self._stepper

    # -- stepping ------------------------------------------------------------------------------

    @property
    def num_fallbacks(self) -> int:
        """Guard fallbacks so far (0 without a guard)."""
        stepper = self.stepper
        return stepper.num_fallbacks if isinstance(stepper, GuardedStepper) else 0

    def _grad(self, p: torch.Tensor) -> torch.Tensor:
        g = p.grad
        if g is None:
            zeros = self._zero_grads.get(id(p))
            if zeros is None or zeros.shape != p.shape or zeros.device != p.device:
                zeros = self._zero_grads[id(p)] = torch.zeros(
                    p.shape, dtype=torch.float32, device=p.device
                )
            return zeros
        if g.is_sparse:
            raise ValueError("sparse gradients are not supported by the learned optimizer")
        if p.dtype in HALF_DTYPES and g.dtype == p.dtype:
            return g.to(torch.float32, memory_format=torch.contiguous_format)
        # A gradient is only read: a contiguous copy of a strided one changes no semantics.
        return g if g.is_contiguous() else g.contiguous()

    def _group_hyperparams(self) -> tuple[float, list[float], list[float]]:
        """The step's lr (the largest group's), each parameter's multiplier of it, and each
        parameter's weight decay. A group lr of 0 (a warm-up's first step) advances the
        state without moving the group's parameters."""
        lrs = [_scheduled_lr(group["lr"]) for group in self.param_groups]
        lr = max(lrs) or 1.0  # every group at 0: any lr, every multiplier 0
        scales, decays = [], []
        for group, group_lr in zip(self.param_groups, lrs, strict=True):
            rate = per_array.check_weight_decay(group["weight_decay"], 1)[0]
            scale = 1.0 if group_lr == lr else group_lr / lr
            scales += [scale] * len(group["params"])
            decays += [rate] * len(group["params"])
        return lr, scales, decays

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        """One global step over all parameters; returns the closure's loss (or None).

        Args:
          closure: re-evaluates the model and returns the loss (its value goes to the guard).
          loss: the loss of the current parameters, for the guard, when there is no closure.

        Raises:
          ValueError: gradients that do not match the parameters (nothing changes), bad group
            hyperparameters, or non-finite gradients under ``on_nonfinite="raise"``.
        """
        if closure is not None:
            if loss is not None:
                raise ValueError("pass either a closure or a loss to step, not both")
            with torch.enable_grad():
                loss = closure()
        params = self._all_params()
        if all(p.grad is None for p in params):
            return loss
        stepper = self.stepper
        lr, scales, decays = self._group_hyperparams()
        grads = [self._grad(p) for p in params]
        self._reread_changed_masters(params)
        previous = (stepper.lr, stepper.lr_scales, stepper.weight_decay)
        stepper.lr, stepper.lr_scales, stepper.weight_decay = lr, scales, decays
        try:
            if isinstance(stepper, GuardedStepper):
                stepper.step(grads, loss=loss)
            else:
                stepper.step(grads)
        except (TypeError, ValueError):
            # bad input changes nothing, the hyperparameters included
            stepper.lr, stepper.lr_scales, stepper.weight_decay = previous
            raise
        self._write_back_masters(params)
        return loss

    def _reread_changed_masters(self, params: list[torch.Tensor]) -> None:
        for p in params:
            if p.dtype in HALF_DTYPES and p._version != self._versions[id(p)]:
                self._masters[id(p)].copy_(p.detach())  # changed outside: its value wins
                self._versions[id(p)] = p._version

    def _write_back_masters(self, params: list[torch.Tensor]) -> None:
        for p in params:
            if p.dtype in HALF_DTYPES:
                p.copy_(self._masters[id(p)])  # round to nearest
                self._versions[id(p)] = p._version

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's layout: per-parameter state (each field's rows for that parameter, as
        tensors) under ``"state"``, ``"param_groups"``, and the global part (format, step
        counts, carried column sums) under ``"hyperadam_runtime"``. Loads with
        ``torch.load(weights_only=True)``."""
        saved = super().state_dict()
        runtime_state = self.stepper.state_dict()
        fields = runtime_state.pop("state")
        per_coordinate = {f.name for f in self.runtime.manifest.state.fields}
        start, per_param = 0, {}
        for index, p in enumerate(self._all_params()):
            stop = start + p.numel()
            per_param[index] = {
                name: torch.from_numpy(fields[name][start:stop].copy()) for name in per_coordinate
            }
            if p.dtype in HALF_DTYPES:
                per_param[index][_MASTER] = self._masters[id(p)].detach().cpu().clone()
            start = stop
        runtime_state["carried"] = {
            name: torch.from_numpy(value)
            for name, value in fields.items()
            if name not in per_coordinate
        }
        if "guard" in runtime_state:  # numpy arrays inside: tensors load with weights_only
            runtime_state["guard"] = _map_arrays(runtime_state["guard"], torch.from_numpy)
        saved["state"] = per_param
        saved[_RUNTIME_KEY] = runtime_state
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores groups and state after checking all of it; on error nothing changes."""
        if not isinstance(state_dict, dict) or _RUNTIME_KEY not in state_dict:
            raise ValueError(
                f"state_dict has no {_RUNTIME_KEY!r} entry: it was not saved by "
                f"runtime.torch.LearnedOptimizer"
            )
        runtime_state = dict(state_dict[_RUNTIME_KEY])
        per_param, params = state_dict.get("state", {}), self._all_params()
        if sorted(per_param) != list(range(len(params))):
            raise ValueError(
                f"state_dict holds state for {len(per_param)} parameters, this optimizer has "
                f"{len(params)}"
            )
        fields: dict[str, np.ndarray] = {}
        for f in self.runtime.manifest.state.fields:
            parts = [_numpy(per_param[i].get(f.name), f.name) for i in range(len(params))]
            fields[f.name] = np.concatenate(parts) if parts else np.zeros((0, *f.shape))
        carried = runtime_state.pop("carried", {})
        fields.update({name: _numpy(value, name) for name, value in carried.items()})
        runtime_state["state"] = fields
        guard = runtime_state.pop("guard", None)
        validation.check_state_dict(
            runtime_state, self.runtime.manifest, [tuple(p.shape) for p in params]
        )
        masters = {}
        for i, p in enumerate(params):
            if p.dtype in HALF_DTYPES:
                master = per_param[i].get(_MASTER)
                if (
                    not isinstance(master, torch.Tensor)
                    or master.dtype != torch.float32
                    or (master.shape != p.shape)
                ):
                    raise ValueError(
                        f"state entry {_MASTER!r} of parameter {i} must be a float32 tensor of "
                        f"shape {tuple(p.shape)} (the master copy of a {p.dtype} parameter)"
                    )
                masters[i] = master
        if guard is not None:
            guard = _map_arrays(guard, lambda t: _numpy(t, "guard"))
            stepper = self.stepper
            if isinstance(stepper, GuardedStepper):
                stepper.check_guard_state(guard)
            runtime_state["guard"] = guard
        groups_only = {k: v for k, v in state_dict.items() if k != _RUNTIME_KEY}
        groups_only["state"] = {}
        super().load_state_dict(groups_only)  # checks the groups before replacing them
        self.stepper.load_state_dict(runtime_state)
        for i, master in masters.items():
            self._masters[id(params[i])].copy_(master)


def _numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise ValueError(f"state entry {name!r} must be a tensor, got {type(value).__name__}")


def _scheduled_lr(value: Any) -> float:
    """A group's lr as a scheduler may set it: a finite number >= 0."""
    if value == 0 and not isinstance(value, bool):
        return 0.0
    return validation.check_lr(value)


def _map_arrays(value: Any, convert: Callable[[Any], Any]) -> Any:
    """``value`` with every array (numpy or tensor) inside dicts and lists converted."""
    if isinstance(value, dict):
        return {k: _map_arrays(v, convert) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_arrays(v, convert) for v in value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return convert(value)
    return value


def all_reduce_sum(group: Any = None) -> AllReduce:
    """An ``all_reduce`` for sharded use over ``torch.distributed`` (any backend that sums
    float64 CPU tensors, e.g. gloo): every rank gets the sum of every rank's partial sums."""
    import torch.distributed as dist

    def reduce(partial: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(partial, dtype=np.float64))
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor.numpy()

    return reduce
