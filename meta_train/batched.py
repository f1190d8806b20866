"""Several slots' truncations at once on one device: batched optimizer step and meta-backward.

What a GPU worker runs (``RunConfig.device = "cuda"``), and the same code on the CPU with
``RunConfig.batch_slots``. The B instances of a call (a worker's slots at one meta-step) keep
their own tasks and trajectories; their learned-optimizer steps, the ~90 % of a meta-update that
touches the ``[p, J]`` state (docs/benchmarks.md), run as one ``torch.func.vmap`` over a
``[B, p, J]`` state on the device, and one backward gives every instance its own meta-gradient:
θ enters as B identical leaves ``[B, |θ|]``, so the gradient of the summed surrogates w.r.t.
leaf b is instance b's meta-gradient (spec §3's first-order surrogate, as ``unroll.py``).

Each optimizee (tasks differ in data and tricks) computes its loss and gradient on the CPU, in
the order ``unroll_truncation`` does; only p floats per instance and step cross to the device.
Instances of different sizes p run as separate sub-batches. The results agree with B separate
``slot_work`` calls to round-off (``tests/meta_train/test_batched.py``), not bitwise: a batched
matrix product may sum in another order. The step is the optimizer's plain torch reference
(vmap cannot enter the fused CPU kernels), so batched runs need ``implementation = "reference"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .optimizers.base import LearnedUpdateRule
from .tasks.base import Task, TaskFamily
from .training import slot_start
from .unroll import (
    Trajectory,
    UnrollConfig,
    UnrollResult,
    batch_generator,
)


def slots_work_batched(
    optimizer: LearnedUpdateRule,
    family: TaskFamily,
    unroll: UnrollConfig,
    theta_flat: Tensor,
    run_seed: int,
    slots: Sequence[int],
    step: int,
    trajectories: Sequence[Trajectory | None],
    device: torch.device | str = "cpu",
) -> list[UnrollResult]:
    """``training.slot_work`` for several slots at one meta-step, batched on ``device``.

    Trajectories (given and returned) live on ``device``; meta-gradients come back on it too.

    Raises:
      ValueError: a slot is mid-trajectory without a state, or its state has the wrong seed.
    """
    if len(slots) != len(trajectories):
        raise ValueError(f"{len(slots)} slots but {len(trajectories)} trajectories")
    tasks, starts = [], []
    for slot, given in zip(slots, trajectories, strict=True):
        task, trajectory = slot_start(optimizer, family, unroll, run_seed, slot, step, given)
        start: Trajectory = trajectory  # batched workers run truncated BPTT only
        tasks.append(task)
        starts.append(to_device(start, device) if start is not given else start)
    results: list[UnrollResult | None] = [None] * len(slots)
    by_size: dict[int, list[int]] = {}
    for i, trajectory in enumerate(starts):
        by_size.setdefault(trajectory.params.numel(), []).append(i)
    theta = theta_flat.to(device)
    for members in by_size.values():
        outs = unroll_truncation_batched(
            optimizer, theta, [tasks[i] for i in members], [starts[i] for i in members], unroll
        )
        for i, out in zip(members, outs, strict=True):
            results[i] = out
    return results  # type: ignore[return-value]


def unroll_truncation_batched(
    optimizer: LearnedUpdateRule,
    theta_flat: Tensor,
    tasks: Sequence[Task],
    trajectories: Sequence[Trajectory],
    config: UnrollConfig,
) -> list[UnrollResult]:
    """``unroll.unroll_truncation`` for B same-sized trajectories on θ's device."""
    device = theta_flat.device
    count = len(trajectories)
    lr = optimizer.default_lr if config.lr is None else config.lr
    # B leaves holding the same θ: d(Σ_b surrogate_b)/d leaf_b is instance b's meta-gradient.
    thetas = theta_flat.detach().expand(count, -1).clone().requires_grad_(True)
    w = torch.stack([t.params for t in trajectories]).to(device)
    fields = zip(*(t.opt_state for t in trajectories), strict=True)
    state = type(trajectories[0].opt_state)(*(torch.stack(f).to(device) for f in fields))
    start = trajectories[0].step
    if any(t.step != start for t in trajectories):
        raise ValueError("batched trajectories must be at the same inner step")

    def one_step(theta: Tensor, grad: Tensor, opt_state: tuple) -> tuple[Tensor, tuple]:
        return optimizer.step(optimizer.unflatten(theta), grad, opt_state, lr=lr)

    batched_step = torch.func.vmap(one_step)
    surrogate = torch.zeros((), device=device)
    losses: list[list[float]] = [[] for _ in range(count)]
    with torch.enable_grad():
        for k in range(config.truncation):
            grads = _optimizee_grads(tasks, trajectories, w, start + k, losses)
            if config.meta_loss == "mean":
                surrogate = surrogate + (grads * w).sum()
            delta, state = batched_step(thetas, grads, state)
            w = w + delta
        end = start + config.truncation
        last_losses = [0.0] * count
        if config.meta_loss == "last":
            tail: list[list[float]] = [[] for _ in range(count)]
            grads = _optimizee_grads(tasks, trajectories, w, end, tail)
            last_losses = [t[0] for t in tail]
            surrogate = (grads * w).sum()
        else:
            surrogate = surrogate / config.truncation
        if surrogate.requires_grad:
            (meta_grads,) = torch.autograd.grad(surrogate, thetas)
        else:
            meta_grads = torch.zeros_like(thetas)
    results = []
    for b, trajectory in enumerate(trajectories):
        meta_loss = (
            last_losses[b]
            if config.meta_loss == "last"
            # The mean of fp32 losses as unroll_truncation takes it (torch.stack(...).mean()).
            else float(torch.tensor(losses[b]).mean())
        )
        results.append(
            UnrollResult(
                meta_grad=meta_grads[b],
                trajectory=Trajectory(
                    trajectory.seed,
                    end,
                    w[b].detach(),
                    type(state)(*(s[b].detach() for s in state)),
                ),
                meta_loss=meta_loss,
                inner_losses=losses[b],
            )
        )
    return results


def _optimizee_grads(
    tasks: Sequence[Task],
    trajectories: Sequence[Trajectory],
    w: Tensor,
    inner_step: int,
    losses: list[list[float]],
) -> Tensor:
    """Every instance's optimizee gradient at ``w[b]`` on its minibatch ``inner_step`` ([B, p])."""
    params = w.detach().cpu()
    grads = []
    for b, (task, trajectory) in enumerate(zip(tasks, trajectories, strict=True)):
        batch = task.sample_batch(batch_generator(trajectory.seed, inner_step))
        loss, grad = task.loss_and_grad(params[b], batch)
        losses[b].append(float(loss))
        grads.append(grad)
    return torch.stack(grads).to(w.device)


def to_device(trajectory: Trajectory, device: torch.device | str) -> Trajectory:
    """The trajectory with its tensors on ``device``."""
    return Trajectory(
        trajectory.seed,
        trajectory.step,
        trajectory.params.to(device),
        type(trajectory.opt_state)(*(s.to(device) for s in trajectory.opt_state)),
    )
