"""How task-adaptive a HyperAdam θ is: what its cells decide, coordinate by coordinate.

HyperAdam can adapt only through what its cells compute from the gradient: the weights ρ of
the J candidate Adams and their decay rates β, γ. This module runs the reference step on a test
task and records, at chosen steps, the mean over coordinates of Σ_j ρ_j, β and γ and their spread
across coordinates. A θ whose numbers are the same on every task and barely spread across
coordinates is, in effect, a fixed step-size schedule over fixed-decay Adams, however it was
trained.

Run ``python -m meta_train.adaptivity --theta hyperadam --tasks mnist-nn-sigmoid-100,sin-lstm``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

import torch

from .evaluate import run_seed
from .optimizers import hyperadam as cells
from .optimizers.base import Theta
from .seeding import generator
from .tasks.base import Task
from .theta_source import load_theta_source
from .unroll import batch_generator


@dataclasses.dataclass(frozen=True)
class Decisions:
    """The cells' decisions at one step, summarised over the coordinates of the model."""

    step: int
    loss: float  # the minibatch loss before this step's update
    rho_sum_mean: float  # mean over coordinates of Σ_j ρ_j (the step size in units of α)
    rho_sum_std: float  # its standard deviation across coordinates
    beta_mean: float  # mean over coordinates and candidates of the first-moment decay
    beta_std: float  # std across coordinates of the per-coordinate mean over candidates
    gamma_mean: float  # the same for the second-moment decay
    gamma_std: float


@torch.no_grad()
def trace_decisions(
    theta: Theta,
    task: Task,
    *,
    at: Sequence[int],
    seed: int = 1,
    lr: float = cells.DEFAULT_LR,
) -> list[Decisions]:
    """Runs HyperAdam with ``theta`` on ``task`` (run 0 of evaluation seed ``seed``).

    Args:
      theta: HyperAdam meta-parameters by name.
      task: the optimizee.
      at: the steps (0-based) to record; the run lasts until the last of them.
      seed: the evaluation seed (the same init and minibatches as ``evaluate``).
      lr: the step size α.

    Returns:
      One ``Decisions`` per step in ``at``, in increasing order.
    """
    steps = sorted(set(at))
    if not steps or steps[0] < 0:
        raise ValueError(f"at must name steps >= 0, got {list(at)!r}")
    s = run_seed(seed, 0)
    w = task.init_params(generator(s, 0))
    state = cells.HyperAdam(theta["weight_bias"].numel()).init_state(w.numel())
    out: list[Decisions] = []
    for t in range(steps[-1] + 1):
        loss, grad = task.loss_and_grad(w, task.sample_batch(batch_generator(s, t)))
        h, c = cells.state_cell(theta, grad, state.h, state.c, grad.square().sum())
        h_sq, m_sq = cells.column_sum_of_squares(h), cells.column_sum_of_squares(state.m)
        if t in steps:
            beta, gamma = cells.decay_rates(theta, h, state.m, h_sq, m_sq)
            rho_sum = cells.weight_cell(theta, h).sum(dim=1)
            out.append(
                Decisions(
                    step=t,
                    loss=float(loss),
                    rho_sum_mean=float(rho_sum.mean()),
                    rho_sum_std=float(rho_sum.std()),
                    beta_mean=float(beta.mean()),
                    beta_std=float(beta.mean(dim=1).std()),
                    gamma_mean=float(gamma.mean()),
                    gamma_std=float(gamma.mean(dim=1).std()),
                )
            )
        delta, state = cells.update_stage(theta, grad, state, h, c, h_sq, m_sq, lr)
        w = w + delta
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Prints the decisions of a θ on each named test task."""
    from .tasks.suite import build_test_task

    parser = argparse.ArgumentParser(prog="python -m meta_train.adaptivity", description=__doc__)
    parser.add_argument("--theta", default="hyperadam", help="θ file, folder or built-in")
    parser.add_argument("--tasks", required=True, help="comma-separated test-task keys")
    parser.add_argument("--at", default="0,2,10,30,99", help="steps to record (%(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="evaluation seed (default 1)")
    args = parser.parse_args(argv)
    try:
        at = [int(x) for x in args.at.split(",")]
    except ValueError:
        parser.error(f"--at must be comma-separated integers, got {args.at!r}")
    optimizer, theta = load_theta_source(args.theta)
    if optimizer.name != "hyperadam":
        parser.error(f"--theta must hold a HyperAdam θ, not {optimizer.name}")
    print(f"θ {args.theta}, evaluation seed {args.seed}, run 0")
    print("task | step | loss | Σρ mean ± std | β mean ± std | γ mean ± std")
    for key in args.tasks.split(","):
        try:
            task = build_test_task(key)
        except (ValueError, FileNotFoundError) as error:
            parser.error(str(error))
        for d in trace_decisions(theta, task, at=at, seed=args.seed):
            print(
                f"{key} | {d.step} | {d.loss:.3f} | {d.rho_sum_mean:.3f} ± {d.rho_sum_std:.3f}"
                f" | {d.beta_mean:.4f} ± {d.beta_std:.4f} | {d.gamma_mean:.4f} ± {d.gamma_std:.4f}"
            )


if __name__ == "__main__":
    torch.set_num_threads(1)  # as `hyperadam evaluate` does by default
    main()
