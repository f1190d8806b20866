"""Meta-training throughput on Ray, and where the time of one meta-update goes.

Part 1, throughput: the same work (the paper's MNIST recipe for HyperAdam, meta-batch 2,
``--steps`` meta-steps of 20 inner steps per slot) done three ways, in one run:

  plain   ``training.train_local`` in this process, one torch thread (a worker's setting);
  ray-1   the Ray learner with one worker (both slots in one actor);
  ray-2   the Ray learner with two workers (one slot each).

Startup (actors, MNIST loading) and meta-step 0 are excluded everywhere: each mode is timed over
meta-steps 1..N. Prints inner optimizee steps per second and the ratios ray-1/plain (target
≥ 0.9) and ray-2/ray-1 (target ≥ 1.7 on 2 cores).

Part 2, profile: one meta-update (one truncation of 20 inner steps, mid-trajectory, then the Adam
step) of each learned optimizer, timed plainly (median of ``--repeats``) and once under
``torch.profiler`` with three labelled phases: optimizee forward/backward (``loss_and_grad`` and
minibatch sampling), optimizer-step forward, and meta-backward (the ``autograd.grad`` of the
surrogate); the rest is "other". Also prints the top ops by self CPU time.

    .venv/bin/python benchmarks/bench_meta_train.py [--steps 6] [--repeats 3] [--task mnist]
        [--skip-throughput] [--skip-profile] [--json results.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from meta_train.learner import Learner
from meta_train.run_config import RunConfig, build_config
from meta_train.tasks.base import TaskFamily
from meta_train.training import (
    apply_meta_gradient,
    average_gradients,
    init_theta_flat,
    make_meta_optimizer,
    slot_work,
    train_local,
)

PHASES = ("optimizee fwd/bwd", "optimizer step fwd", "meta-backward")


# -- part 1: throughput -----------------------------------------------------------------------


def time_plain(config: RunConfig, steps: int) -> float:
    """Seconds of meta-steps 1..steps of train_local (the difference of two identical runs)."""
    kwargs = dict(
        run_seed=config.seed, unroll=config.unroll, meta_optim=config.meta_optim,
        meta_batch=config.meta_batch,
    )
    optimizer, family = config.make_optimizer(), config.make_family()
    train_local(optimizer, family, steps=1, **kwargs)  # warm: dataset, allocator
    start = time.perf_counter()
    train_local(optimizer, family, steps=1, **kwargs)
    one = time.perf_counter() - start
    start = time.perf_counter()
    train_local(optimizer, family, steps=steps + 1, **kwargs)
    return time.perf_counter() - start - one


def time_ray(config: RunConfig, workers: int, steps: int) -> float:
    learner = Learner(dataclasses.replace(config, workers=workers))
    try:
        learner.start()
        learner.run(1)  # meta-step 0 (first calls) excluded, as for the plain loop
        start = time.perf_counter()
        learner.run(steps + 1)
        return time.perf_counter() - start
    finally:
        learner.close()


def throughput(config: RunConfig, steps: int) -> dict[str, Any]:
    import ray

    inner = steps * config.meta_batch * config.unroll.truncation
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = time_plain(config, steps)
    finally:
        torch.set_num_threads(threads)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    try:
        ray1 = time_ray(config, 1, steps)
        ray2 = time_ray(config, 2, steps)
    finally:
        ray.shutdown()
    rates = {"plain": inner / plain, "ray-1": inner / ray1, "ray-2": inner / ray2}
    return {
        "meta_steps": steps,
        "meta_batch": config.meta_batch,
        "inner_steps": inner,
        "seconds": {"plain": plain, "ray-1": ray1, "ray-2": ray2},
        "inner_steps_per_s": rates,
        "ray1_over_plain": rates["ray-1"] / rates["plain"],
        "ray2_over_ray1": rates["ray-2"] / rates["ray-1"],
    }


# -- part 2: one meta-update, profiled --------------------------------------------------------


class LabelledFamily(TaskFamily):
    """Wraps a family so that its tasks' optimizee work runs under a profiler label."""

    def __init__(self, family: TaskFamily) -> None:
        self.family = family

    def sample(self, seed: int):
        return self.family.sample(seed)

    def to_dict(self) -> dict[str, Any]:
        return self.family.to_dict()

    def build(self, config):
        task = self.family.build(config)
        for name in ("loss_and_grad", "sample_batch"):
            setattr(task, name, labelled(getattr(task, name), PHASES[0]))
        return task


_inside: list[str] = []  # the labels currently open (labels never nest: the outer one wins)


def labelled(fn, label: str):
    def call(*args, **kwargs):
        if _inside:  # e.g. autograd.grad inside a task's loss_and_grad is optimizee work
            return fn(*args, **kwargs)
        _inside.append(label)
        try:
            with record_function(label):
                return fn(*args, **kwargs)
        finally:
            _inside.pop()

    return call


def meta_update(config: RunConfig, optimizer, family, theta, meta_opt, trajectory) -> None:
    out = slot_work(optimizer, family, config.unroll, theta.detach(), config.seed, 0, 1,
                    trajectory)
    grad, _ = average_gradients([out.meta_grad], config.meta_optim.clip_norm)
    apply_meta_gradient(theta, meta_opt, grad)


def profile_optimizer(name: str, task: str, repeats: int) -> dict[str, Any]:
    config = build_config({"optimizer": name, "task": task, "meta_batch": 1})
    optimizer, family = config.make_optimizer(), config.make_family()
    theta = init_theta_flat(optimizer, config.seed).requires_grad_(True)
    meta_opt = make_meta_optimizer(theta, config.meta_optim)
    first = slot_work(optimizer, family, config.unroll, theta.detach(), config.seed, 0, 0, None)
    trajectory = first.trajectory  # time a mid-trajectory truncation (meta-step 1)
    plain = []
    for _ in range(repeats):
        start = time.perf_counter()
        meta_update(config, optimizer, family, theta, meta_opt, trajectory)
        plain.append(time.perf_counter() - start)

    labelled_family = LabelledFamily(family)
    optimizer.step = labelled(optimizer.step, PHASES[1])  # instance attribute: this run only
    original_grad = torch.autograd.grad
    torch.autograd.grad = labelled(original_grad, PHASES[2])  # the surrogate's backward
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            meta_update(config, optimizer, labelled_family, theta, meta_opt, trajectory)
            profiled = time.perf_counter() - start
    finally:
        torch.autograd.grad = original_grad
        del optimizer.step
    events = {e.key: e for e in prof.key_averages()}
    phases = {label: events[label].cpu_time_total / 1e6 for label in PHASES if label in events}
    phases["other"] = max(profiled - sum(phases.values()), 0.0)
    top = sorted(
        (e for e in prof.key_averages() if e.key not in PHASES and not e.key.startswith("[")),
        key=lambda e: e.self_cpu_time_total,
        reverse=True,
    )[:8]
    return {
        "optimizer": name,
        "num_coords": int(trajectory.params.numel()),
        "seconds_per_meta_update": statistics.median(plain),
        "profiled_seconds": profiled,
        "phases_seconds": phases,
        "phases_fraction": {k: v / profiled for k, v in phases.items()},
        "top_ops": [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in top],
    }


# -- report -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed meta-steps per mode")
    parser.add_argument("--repeats", type=int, default=3, help="plain timings per optimizer")
    parser.add_argument("--task", default="mnist", help="mnist (the paper's) or quadratic")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    results: dict[str, Any] = {"cpus": os.cpu_count(), "torch": torch.__version__}
    if not args.skip_throughput:
        config = build_config({"task": args.task, "meta_batch": 2, "validation": {"every": 0}})
        t = throughput(config, args.steps)
        results["throughput"] = t
        print(f"throughput: {t['meta_steps']} meta-steps × meta-batch {t['meta_batch']} × 20 "
              f"inner steps = {t['inner_steps']} inner steps per mode ({args.task})")
        for mode, rate in t["inner_steps_per_s"].items():
            print(f"  {mode:6s} {rate:8.1f} inner steps/s   ({t['seconds'][mode]:.2f} s)")
        print(f"  ray-1 / plain = {t['ray1_over_plain']:.2f}   (target >= 0.9)")
        print(f"  ray-2 / ray-1 = {t['ray2_over_ray1']:.2f}   (target >= 1.7)")
    if not args.skip_profile:
        torch.set_num_threads(1)
        results["profile"] = []
        print("\nseconds per meta-update (20 inner steps, 1 torch thread):")
        for name in ("hyperadam", "rnnprop", "dm"):
            p = profile_optimizer(name, args.task, args.repeats)
            results["profile"].append(p)
            breakdown = "  ".join(
                f"{k} {100 * v:.0f}%" for k, v in p["phases_fraction"].items()
            )
            print(f"  {name:9s} {p['seconds_per_meta_update']:.3f} s   (profiled "
                  f"{p['profiled_seconds']:.3f} s: {breakdown})")
            for key, seconds, count in p["top_ops"][:5]:
                print(f"      {key:40s} {seconds * 1e3:8.1f} ms self  ×{count}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
