"""Seconds per HyperAdam meta-update: reference vs fused step, 1 and 2 threads, one run.

A meta-update is what a worker does per meta-step: one truncation of 20 inner steps of the paper's
MNIST recipe (784-20-10 sigmoid MLP with both tricks, 128 images, p = 15,930) driven by HyperAdam
(J = 20), the backward of the first-order surrogate to θ, and the Adam step on θ
(``training.slot_work``), mid-trajectory (meta-step 1). The implementations run interleaved in the
same process and the medians of several repeats are compared, so a changing background load hits
them alike; compare ratios, not absolute seconds, on a shared machine.

    .venv/bin/python benchmarks/bench_hyperadam_step.py [--repeats 7] [--threads 1 2] [--compile]

``--compile`` adds ``torch.compile(hyperadam_step)`` (compiles for about a minute first).
``--subnormals`` also times one no-grad step at CNN-2's p = 117,434 from a normal state and from
a stalled network's state (moments decayed into subnormals, zero gradient), for both
implementations: what a dead unit costs on x86 without flush-to-zero.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from machine import describe_machine  # benchmarks/machine.py, beside this script

from meta_train.meta_update import init_meta_state, meta_update
from meta_train.optimizers.hyperadam import HyperAdam, HyperAdamState, hyperadam_step
from meta_train.optimizers.hyperadam_fast import kernels
from meta_train.run_config import build_config
from meta_train.training import init_theta_flat, slot_work


class Variant(HyperAdam):
    """HyperAdam under a label: one of its own implementations, or a given step function."""

    def __init__(self, label: str, num_candidates: int, step=None) -> None:
        implementation = label if label in ("reference", "fast") else "reference"
        super().__init__(num_candidates, implementation=implementation)
        self.label, self._step = label, step

    def step(self, theta, grad, state: HyperAdamState, *, lr: float):
        if self._step is None:
            return super().step(theta, grad, state, lr=lr)
        return self._step(theta, grad, state, lr=lr)


def time_subnormal_states(num_candidates: int, threads: int, p: int = 117_434) -> None:
    """One step from a normal state vs from a subnormal one (zero gradient), both
    implementations, interleaved; medians of 5."""
    torch.set_num_threads(threads)
    variants = [Variant(label, num_candidates) for label in ("reference", "fast")]
    theta = variants[0].init_theta(torch.Generator().manual_seed(0))
    normal = HyperAdamState(*(torch.full((p, num_candidates), 1e-3) for _ in range(6)))
    stalled = HyperAdamState(*(torch.full((p, num_candidates), 1e-39) for _ in range(6)))
    cases = {"normal": (normal, torch.randn(p) * 1e-3), "subnormal": (stalled, torch.zeros(p))}
    times: dict[tuple[str, str], list[float]] = {}
    with torch.no_grad():
        for _ in range(6):  # the first round warms up
            for variant in variants:
                for case, (state, grad) in cases.items():
                    t0 = time.perf_counter()
                    variant.step(theta, grad, state, lr=0.005)
                    times.setdefault((variant.label, case), []).append(time.perf_counter() - t0)
    print(f"\none no-grad step at p = {p}, threads={threads} (median of 5):")
    for variant in variants:
        normal_s = statistics.median(times[variant.label, "normal"][1:])
        sub_s = statistics.median(times[variant.label, "subnormal"][1:])
        print(
            f"  {variant.label:>9}: normal state {normal_s:.3f} s, subnormal state {sub_s:.3f} s "
            f"(x{sub_s / normal_s:.2f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--task", default="mnist")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--subnormals", action="store_true", help="also time subnormal states")
    parser.add_argument(
        "--profile-threads",
        type=int,
        default=None,
        help="threads of the profiled run (default: min)",
    )
    args = parser.parse_args()

    print(f"machine: {describe_machine()}")
    start = time.perf_counter()
    kernels()
    print(f"fused kernels ready in {time.perf_counter() - start:.1f} s ({kernels().path.name})")
    config = build_config({"optimizer": "hyperadam", "task": args.task, "meta_batch": 1})
    family = config.make_family()
    variants = [Variant("reference", config.num_candidates), Variant("fast", config.num_candidates)]
    if args.compile:
        variants.append(Variant("compile", config.num_candidates, torch.compile(hyperadam_step)))
    meta = init_meta_state(init_theta_flat(variants[0], config.seed))
    theta = meta.theta

    def one_update(variant: Variant, trajectory) -> float:
        nonlocal meta
        t0 = time.perf_counter()
        out = slot_work(variant, family, config.unroll, meta.theta, config.seed, 0, 1, trajectory)
        meta, _ = meta_update(meta, [out.meta_grad], config.meta_optim)
        return time.perf_counter() - t0

    # Each variant's own first truncation gives the mid-trajectory state it continues from.
    first = {
        v.label: slot_work(v, family, config.unroll, theta, config.seed, 0, 0, None)
        for v in variants
    }
    p = first["reference"].trajectory.params.numel()
    print(
        f"p = {p}, J = {config.num_candidates}, {config.unroll.truncation} inner steps per "
        f"meta-update; load average {os.getloadavg()[0]:.1f} at start"
    )
    medians = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {v.label: [] for v in variants}
        for repeat in range(args.repeats + 1):  # the first round warms up (and compiles)
            for variant in variants:
                seconds = one_update(variant, first[variant.label].trajectory)
                if repeat:
                    times[variant.label].append(seconds)
        ref = statistics.median(times["reference"])
        for label, ts in times.items():
            medians[threads, label] = med = statistics.median(ts)
            print(
                f"threads={threads} {label:>9}: {med:.3f} s/meta-update "
                f"(min {min(ts):.3f}, max {max(ts):.3f}, n={len(ts)})  speed-up x{ref / med:.2f}"
            )
    print(f"load average {os.getloadavg()[0]:.1f} at end")

    if args.subnormals:
        time_subnormal_states(config.num_candidates, min(args.threads))

    # Where the fused meta-update's time goes, by default at the smallest thread count (a worker
    # uses 1).
    torch.set_num_threads(args.profile_threads or min(args.threads))
    fast = variants[1]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            one_update(fast, first["fast"].trajectory)
    events = {e.key: e for e in prof.key_averages()}
    total = sum(e.self_cpu_time_total for e in events.values())
    fwd = events["_HyperAdamStep"].self_cpu_time_total
    bwd = events["_HyperAdamStepBackward"].self_cpu_time_total
    print(
        f"\nprofile of 3 fused meta-updates, threads={torch.get_num_threads()}: fused step forward "
        f"{fwd / total:.0%}, fused step backward {bwd / total:.0%}, everything else "
        f"{1 - (fwd + bwd) / total:.0%} of {total / 3e6:.3f} s CPU per meta-update"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
