"""Where a tensor-wise θ's per-tensor step scale goes on a held-out task, and the loss with it.

The adaptive variants multiply each tensor T's step by exp(ℓ_T), ℓ_T following a cosine
(``optimizers/hyperadam_tensor.py``). Whether that scale travels to the step the task wants,
and stays there, is what decides the held-out ratios: tuned Adam's lr spans 3e-4…1e-1 over the
suite while α is 3e-3. This module runs a θ through the benchmark's protocol (evaluation run
``run`` of ``--seed``: its init and minibatches) on held-out tasks and prints, at evenly spaced
steps, the smoothed minibatch loss and exp(ℓ_T) over the model's tensors (min, median, max).

Run ``python -m meta_train.scale_trace --theta checkpoints/ablation/tensor-trend-start/theta.npz
--tasks logreg-cond1e5-10000,lstm-rows-mnist14-1000``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
from collections.abc import Sequence

import torch

from .benchmark import EVAL_STREAM, run_seed
from .evaluate import for_task
from .optimizers.base import Theta
from .optimizers.hyperadam_tensor import TensorwiseHyperAdam
from .seeding import generator
from .tasks.base import Task


@dataclasses.dataclass(frozen=True)
class ScalePoint:
    """The run at one step: the loss and the per-tensor step scales exp(ℓ_T)."""

    step: int  # steps taken
    loss: float  # mean minibatch loss over the steps since the previous point
    scale_min: float
    scale_median: float
    scale_max: float


@torch.no_grad()
def trace_scale(
    optimizer: TensorwiseHyperAdam,
    theta: Theta,
    task: Task,
    *,
    steps: int,
    points: int = 10,
    seed: int = 0,
    run: int = 0,
) -> list[ScalePoint]:
    """Runs ``optimizer`` with ``theta`` on ``task`` for ``steps`` steps, as the benchmark's
    evaluation run ``run`` of ``seed`` does, recording ``points`` evenly spaced points."""
    if not optimizer.adaptive_scale:
        raise ValueError(f"{optimizer.name} has no per-tensor step scale to trace")
    if steps < 1 or not 1 <= points <= steps:
        raise ValueError(f"need steps >= 1 and 1 <= points <= steps, got {steps}, {points}")
    rule = for_task(optimizer.bind(theta), task)
    run_key = run_seed(seed, EVAL_STREAM, run)
    w = task.init_params(generator(run_key, 0))
    state = rule.init(w.numel())
    firsts = [0]
    for size in task.tensor_sizes:
        firsts.append(firsts[-1] + size)
    every = steps // points
    out: list[ScalePoint] = []
    losses: list[float] = []
    for t in range(steps):
        loss, grad = task.loss_and_grad(w, task.sample_batch(generator(run_key, 1, t)))
        losses.append(float(loss))
        delta, state = rule.update(grad, state)
        w = w + delta
        if (t + 1) % every == 0 and len(out) < points:
            scales = [math.exp(float(state.log_scale[i])) for i in firsts[:-1]]
            out.append(
                ScalePoint(
                    step=t + 1,
                    loss=sum(losses) / len(losses),
                    scale_min=min(scales),
                    scale_median=statistics.median(scales),
                    scale_max=max(scales),
                )
            )
            losses = []
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Prints the step-scale trace of a θ on each named held-out task."""
    from .tasks.heldout import heldout_spec
    from .theta_source import load_theta_source

    parser = argparse.ArgumentParser(prog="python -m meta_train.scale_trace", description=__doc__)
    parser.add_argument("--theta", required=True, help="θ file or exported folder")
    parser.add_argument("--tasks", required=True, help="comma-separated held-out task keys")
    parser.add_argument("--points", type=int, default=10, help="points per run (%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="benchmark seed (default 0)")
    parser.add_argument("--run", type=int, default=0, help="evaluation run (default 0)")
    args = parser.parse_args(argv)
    try:
        optimizer, theta = load_theta_source(args.theta)
    except (FileNotFoundError, ValueError) as error:
        parser.error(f"--theta {args.theta}: {error}")
    if not isinstance(optimizer, TensorwiseHyperAdam) or not optimizer.adaptive_scale:
        parser.error(f"--theta must hold a θ with a per-tensor step scale, not {optimizer.name}")
    print(f"θ {args.theta} ({optimizer.name}), seed {args.seed}, evaluation run {args.run}")
    print("task | step | loss | exp(ℓ_T) min / median / max over tensors")
    for key in args.tasks.split(","):
        try:
            spec = heldout_spec(key)
        except (KeyError, ValueError) as error:
            parser.error(str(error))
        trace = trace_scale(
            optimizer, theta, spec.build(), steps=spec.horizon, points=args.points,
            seed=args.seed, run=args.run,
        )  # fmt: skip
        for p in trace:
            print(
                f"{key} | {p.step} | {p.loss:.4g} | "
                f"{p.scale_min:.3g} / {p.scale_median:.3g} / {p.scale_max:.3g}"
            )


if __name__ == "__main__":
    torch.set_num_threads(1)  # as the benchmark does by default
    main()
