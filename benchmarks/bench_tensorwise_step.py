"""Tensor-wise HyperAdam: reference step vs ``implementation="fast"``, side by side, one run.

Two measurements, both at 1 torch thread (a Ray worker's):

* **meta-training**: one 20-step truncation of the issue-15 small family (``SmallTaskFamily``,
  8×8 MNIST MLPs/CNNs and sine LSTMs, p ≈ 10³–10⁴, J = 20, meta-loss "log"), forward and
  backward to θ (``unroll.unroll_truncation``), mid-trajectory, on the tasks of seeds
  0 … ``--tasks``−1. Each task's implementations run interleaved and the median of ``--repeats``
  is kept; the headline ratio is the sum over tasks (what a worker drawing these tasks spends).
* **evaluation**: one no-grad step at ``--eval-p`` coordinates in 8 tensors, medians of 5.

``--compile`` adds the fast step's forward and backward under ``torch.compile(dynamic=True)``
(measured only; not an implementation the library selects). Absolute seconds move with the
shared machine's load; compare the ratios.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_tensorwise_step.py [--variant tensor-adaptive]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from machine import describe_machine  # benchmarks/machine.py, beside this script

import meta_train.optimizers.hyperadam_tensor_fast as fast_module
from meta_train.optimizers.hyperadam_tensor import TensorwiseHyperAdam
from meta_train.tasks.small_family import SmallTaskFamily
from meta_train.unroll import UnrollConfig, start_trajectory, unroll_truncation

VARIANTS = {
    "tensor": {},
    "tensor-unbounded": {"bounded": False},
    "tensor-adaptive": {"adaptive_scale": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=tuple(VARIANTS), default="tensor-adaptive")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-p", type=int, default=100_000)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {describe_machine()}")

    options = VARIANTS[args.variant]
    contenders = {
        "reference": TensorwiseHyperAdam(20, **options),
        "fast": TensorwiseHyperAdam(20, **options, implementation="fast"),
    }
    eager = (fast_module._cells_forward, fast_module._cells_backward)
    compiled = None
    if args.compile:
        compiled = tuple(torch.compile(fn, dynamic=True) for fn in eager)
        contenders["fast+compile"] = contenders["fast"]

    def run(label: str, fn):
        fast_module._cells_forward, fast_module._cells_backward = (
            compiled if label == "fast+compile" else eager
        )
        t0 = time.perf_counter()
        out = fn(contenders[label])
        return time.perf_counter() - t0, out

    reference = contenders["reference"]
    theta = reference.flatten(reference.init_theta(torch.Generator().manual_seed(0)))
    family, unroll = SmallTaskFamily(), UnrollConfig(horizon=100, truncation=20, meta_loss="log")
    totals = dict.fromkeys(contenders, 0.0)
    print(f"{args.variant}: one truncation (20 steps, fwd + bwd), median of {args.repeats}")
    for seed in range(args.tasks):
        config = family.sample(seed)
        task = family.build(config)

        def truncation(optimizer, trajectory, task=task):
            return unroll_truncation(optimizer, theta, task, trajectory, unroll)

        start = start_trajectory(reference, task, seed)
        # The first truncation warms up (and compiles); the timed ones continue from its end.
        first = {label: run(label, lambda o, s=start: truncation(o, s))[1] for label in contenders}
        times: dict[str, list[float]] = {label: [] for label in contenders}
        for _ in range(args.repeats):
            for label in contenders:
                trajectory = first[label].trajectory
                seconds, _ = run(label, lambda o, t=trajectory: truncation(o, t))
                times[label].append(seconds)
        medians = {label: statistics.median(ts) for label, ts in times.items()}
        for label, seconds in medians.items():
            totals[label] += seconds
        ref = medians["reference"]
        line = ", ".join(
            f"{label} {s * 1e3:.1f} ms (x{ref / s:.2f})" for label, s in medians.items()
        )
        print(f"  task {seed} {config.model} p={task.num_params}: {line}")
    ref = totals["reference"]
    print(
        "  all tasks: "
        + ", ".join(f"{label} {s:.3f} s (x{ref / s:.2f})" for label, s in totals.items())
    )

    p = args.eval_p
    sizes = [p // 8] * 7 + [p - 7 * (p // 8)]
    state = reference.init_state(p, tensor_sizes=sizes)
    grads = torch.randn(6, p, generator=torch.Generator().manual_seed(1))
    eval_times: dict[str, list[float]] = {label: [] for label in contenders}
    theta_tensors = reference.unflatten(theta)
    with torch.no_grad():
        for grad in grads:  # the first round warms up
            for label in contenders:
                seconds, (_, new_state) = run(
                    label, lambda o, g=grad, s=state: o.step(theta_tensors, g, s, lr=0.003)
                )
                eval_times[label].append(seconds)
            state = new_state
    eval_medians = {label: statistics.median(ts[1:]) for label, ts in eval_times.items()}
    ref = eval_medians["reference"]
    line = ", ".join(f"{k} {s * 1e3:.1f} ms (x{ref / s:.2f})" for k, s in eval_medians.items())
    print(f"one no-grad step at p = {p} (8 tensors), median of 5: {line}")


if __name__ == "__main__":
    main()
