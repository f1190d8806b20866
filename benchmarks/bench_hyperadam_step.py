"""Seconds per HyperAdam meta-update: reference vs fused step, 1 and 2 threads, one run.

A meta-update is what a worker does per meta-step (``unroll_truncation``): 20 inner steps of a
784-20-10 sigmoid MLP on 128 images (p = 15,910) driven by HyperAdam (J = 20), then the backward
of the first-order surrogate to θ. Both implementations run interleaved in the same process and
the medians of several repeats are compared, so a noisy machine moves both alike.

    .venv/bin/python benchmarks/bench_hyperadam_step.py [--repeats 7] [--compile]

``--compile`` adds ``torch.compile(hyperadam_step)`` (compiles for about a minute first).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from meta_train.optimizers.hyperadam import HyperAdam, HyperAdamState, hyperadam_step
from meta_train.optimizers.hyperadam_fast import hyperadam_step_fast, kernels
from meta_train.seeding import generator
from meta_train.tasks.base import Batch, Task
from meta_train.unroll import UnrollConfig, start_trajectory, unroll_truncation

IMAGES, HIDDEN, CLASSES, BATCH = 784, 20, 10, 128


class SyntheticMLPTask(Task):
    """784-20-10 sigmoid MLP on a fixed pool of random "images" (no dataset download)."""

    name = "synthetic-mlp"

    def __init__(self, pool: int = 4096) -> None:
        g = generator(123)
        self.images = torch.rand(pool, IMAGES, generator=g)
        self.labels = torch.randint(CLASSES, (pool,), generator=g)
        self.sizes = (IMAGES * HIDDEN, HIDDEN, HIDDEN * CLASSES, CLASSES)

    @property
    def num_params(self) -> int:
        return sum(self.sizes)

    def init_params(self, generator: torch.Generator) -> Tensor:
        return torch.randn(self.num_params, generator=generator) * 0.1

    def sample_batch(self, generator: torch.Generator) -> Batch:
        index = torch.randint(self.images.shape[0], (BATCH,), generator=generator)
        return self.images[index], self.labels[index]

    def loss(self, params: Tensor, batch: Batch) -> Tensor:
        w1, b1, w2, b2 = params.split(self.sizes)
        hidden = torch.sigmoid(torch.addmm(b1, batch[0], w1.view(IMAGES, HIDDEN)))
        return F.cross_entropy(torch.addmm(b2, hidden, w2.view(HIDDEN, CLASSES)), batch[1])


class Variant(HyperAdam):
    """HyperAdam whose step is a given implementation (until HyperAdam takes the argument)."""

    def __init__(self, label: str, step) -> None:
        super().__init__(20)
        self.label, self._step = label, step

    def step(self, theta, grad, state: HyperAdamState, *, lr: float):
        return self._step(theta, grad, state, lr=lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    args = parser.parse_args()

    start = time.perf_counter()
    kernels()
    print(f"fused kernels ready in {time.perf_counter() - start:.1f} s ({kernels().path.name})")
    variants = [Variant("reference", hyperadam_step), Variant("fast", hyperadam_step_fast)]
    if args.compile:
        variants.append(Variant("compile", torch.compile(hyperadam_step)))
    task = SyntheticMLPTask()
    config = UnrollConfig(horizon=20 * 10_000, truncation=20)
    theta = variants[0].flatten(variants[0].init_theta(generator(0)))
    print(f"p = {task.num_params}, J = 20, {config.truncation} inner steps per meta-update")

    def meta_update(variant: Variant, trajectory):
        t0 = time.perf_counter()
        result = unroll_truncation(variant, theta, task, trajectory, config)
        return time.perf_counter() - t0, result

    for threads in args.threads:
        torch.set_num_threads(threads)
        trajectories = {v.label: start_trajectory(v, task, seed=1) for v in variants}
        times: dict[str, list[float]] = {v.label: [] for v in variants}
        for repeat in range(args.repeats + 1):  # the first round warms up (and compiles)
            for variant in variants:
                seconds, result = meta_update(variant, trajectories[variant.label])
                trajectories[variant.label] = result.trajectory
                if repeat:
                    times[variant.label].append(seconds)
        ref = statistics.median(times["reference"])
        for label, ts in times.items():
            med = statistics.median(ts)
            print(
                f"threads={threads} {label:>9}: {med:.3f} s/meta-update "
                f"(min {min(ts):.3f}, max {max(ts):.3f}, n={len(ts)})  speed-up x{ref / med:.2f}"
            )

    # Where the fused meta-update's time goes (2 threads if measured, else the last setting).
    torch.set_num_threads(max(args.threads))
    fast = variants[1]
    trajectory = start_trajectory(fast, task, seed=1)
    _, result = meta_update(fast, trajectory)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            _, result = meta_update(fast, result.trajectory)
    print(f"\nprofile of 3 fused meta-updates, threads={torch.get_num_threads()}:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
