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
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from . import optimizer as _optimizer
from . import validation
from .stepper import AllReduce, Stepper

_RUNTIME_KEY = "hyperadam_runtime"  # the non-per-parameter part of the state dict


class LearnedOptimizer(torch.optim.Optimizer):
    """A learned optimizer (HyperAdam by default) run by onnxruntime on the model's tensors.

    One ``step`` is one global step over every parameter of every group: HyperAdam normalises
    over all coordinates together, so the groups must share one learning rate at each step
    (schedulers that scale every group alike keep it so). Parameters on the CPU are updated in
    place through zero-copy views of their storage; CUDA parameters through DLPack on the CUDA
    provider.

    Missing gradients: a parameter whose ``.grad`` is None takes part in the step with a zero
    gradient (mathematically its gradient: it did not influence the loss). Skipping it, as
    ``torch.optim`` does, would change the global normalisation of every other coordinate and
    leave its LSTM/moment state a step behind; with a zero gradient its state evolves as it did
    during meta-training, and it may still move (the learned momentum keeps acting, as Adam's
    would given a zero gradient). When *every* gradient is None (``step`` before any
    ``backward``), nothing happens, as in ``torch.optim``.

    Args:
      params: the tensors or param-group dicts to optimise (float32, C-contiguous, one device).
      source: an exported folder, a built-in name (``"hyperadam"``), an MLflow URI, or an
        already loaded ``runtime.ExportedOptimizer`` (default: ``"hyperadam"``).
      lr: step size α, ``group["lr"]`` (default: the export's, 0.005 for HyperAdam).
      chunk_size, on_nonfinite, all_reduce: as ``runtime.ExportedOptimizer.bind``. With
        ``on_nonfinite="skip"``, a step with NaN/inf gradients changes nothing.
      threads: CPU threads for chunks (default: the CPUs this process may use).

    Raises:
      TypeError / ValueError: bad arguments or parameters, before anything is created.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        source: str | os.PathLike[str] | _optimizer.ExportedOptimizer = "hyperadam",
        lr: float | None = None,
        *,
        chunk_size: int | None = None,
        on_nonfinite: str = "raise",
        all_reduce: AllReduce | None = None,
        threads: int | None = None,
    ) -> None:
        self.runtime = (
            source
            if isinstance(source, _optimizer.ExportedOptimizer)
            else _optimizer.load(source, threads=threads)
        )
        lr = validation.check_lr(self.runtime.default_lr if lr is None else lr)
        self._bind_options: dict[str, Any] = {
            "chunk_size": chunk_size,
            "on_nonfinite": on_nonfinite,
            "all_reduce": all_reduce,
        }
        self._stepper: Stepper | None = None
        self._zero_grads: dict[int, torch.Tensor] = {}
        super().__init__(params, {"lr": lr})
        self._rebind()

    # -- binding -------------------------------------------------------------------------------

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _rebind(self) -> None:
        """Binds every parameter; state already there is kept, new parameters start at zero."""
        params = self._all_params()
        old = self._stepper
        stepper = self.runtime.bind(params, **self._bind_options)
        if old is not None:
            saved = old.state_dict()
            added = stepper.num_coords - old.num_coords
            for name, value in saved["state"].items():
                if value.shape[:1] == (old.num_coords,):  # per-coordinate: zeros for new ones
                    pad = np.zeros((added, *value.shape[1:]), np.float32)
                    saved["state"][name] = np.concatenate([value, pad])
            saved["param_shapes"] = [list(p.shape) for p in params]
            stepper.load_state_dict(saved)
        self._stepper = stepper

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group; its parameters join the one global step with zero optimizer state."""
        super().add_param_group(param_group)
        if getattr(self, "_stepper", None) is not None:
            self._rebind()

    @property
    def stepper(self) -> Stepper:
        """The runtime stepper that owns the optimizer state."""
        assert self._stepper is not None
        return self._stepper

    # -- stepping ------------------------------------------------------------------------------

    def _global_lr(self) -> float:
        lrs = sorted({float(group["lr"]) for group in self.param_groups})
        if len(lrs) != 1:
            raise ValueError(
                f"param groups have learning rates {lrs}; one global learned-optimizer step "
                f"needs one lr for all of them"
            )
        return lrs[0]

    def _grad(self, p: torch.Tensor) -> torch.Tensor:
        g = p.grad
        if g is None:
            zeros = self._zero_grads.get(id(p))
            if zeros is None or zeros.shape != p.shape or zeros.device != p.device:
                zeros = self._zero_grads[id(p)] = torch.zeros_like(
                    p, memory_format=torch.contiguous_format
                )
            return zeros
        if g.is_sparse:
            raise ValueError("sparse gradients are not supported by the learned optimizer")
        # A gradient is only read: a contiguous copy of a strided one changes no semantics.
        return g if g.is_contiguous() else g.contiguous()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One global step over all parameters; returns the closure's loss (or None).

        Raises:
          ValueError: groups with different lrs, gradients that do not match the parameters
            (nothing changes), or non-finite gradients under ``on_nonfinite="raise"``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._all_params()
        if all(p.grad is None for p in params):
            return loss
        stepper = self.stepper
        lr = self._global_lr()
        grads = [self._grad(p) for p in params]
        previous = stepper.lr
        stepper.lr = lr
        try:
            stepper.step(grads)
        except (TypeError, ValueError):
            stepper.lr = previous  # bad input changes nothing, the lr included
            raise
        return loss

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
            start = stop
        runtime_state["carried"] = {
            name: torch.from_numpy(value)
            for name, value in fields.items()
            if name not in per_coordinate
        }
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
        validation.check_state_dict(
            runtime_state, self.runtime.manifest, [tuple(p.shape) for p in params]
        )
        groups_only = {k: v for k, v in state_dict.items() if k != _RUNTIME_KEY}
        groups_only["state"] = {}
        super().load_state_dict(groups_only)  # checks the groups before replacing them
        self.stepper.load_state_dict(runtime_state)


def _numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise ValueError(f"state entry {name!r} must be a tensor, got {type(value).__name__}")


def all_reduce_sum(group: Any = None) -> AllReduce:
    """An ``all_reduce`` for sharded use over ``torch.distributed`` (any backend that sums
    float64 CPU tensors, e.g. gloo): every rank gets the sum of every rank's partial sums."""
    import torch.distributed as dist

    def reduce(partial: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(partial, dtype=np.float64))
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor.numpy()

    return reduce
