"""Meta-training throughput on Ray, and where the time of one meta-update goes.

Part 1, throughput: the same work (the paper's MNIST recipe for HyperAdam, meta-batch 2,
``--steps`` meta-steps of 20 inner steps per slot) done three ways, in one run:

  plain   ``training.train_local`` in this process, one torch thread (a worker's setting);
  ray-1   the Ray learner with one worker (both slots in one actor);
  ray-2   the Ray learner with two workers (one slot each);
  plain×2 two independent plain processes with one slot each and no Ray at all: the ceiling
          the machine itself puts on two workers (memory bandwidth, shared cores).

Start-up (actors, MNIST loading) is excluded: each mode is timed over meta-steps 0..N-1, in
``--rounds`` interleaved rounds (plain, ray-1, ray-2, plain, ...) so that a changing background
load hits every mode alike; the median round counts. Prints inner optimizee steps per second and
the ratios ray-1/plain (target ≥ 0.9) and ray-2/ray-1 (target ≥ 1.7 on 2 cores).

Part 2, profile: one meta-update (one truncation of 20 inner steps, mid-trajectory, then the Adam
step) of each learned optimizer, timed plainly (median of ``--repeats``) and once under
``torch.profiler`` with three labelled phases: optimizee forward/backward (``loss_and_grad`` and
minibatch sampling), optimizer-step forward, and meta-backward (the ``autograd.grad`` of the
surrogate); the rest is "other". Also prints the top ops by self CPU time.

    .venv/bin/python benchmarks/bench_meta_train.py [--steps 3] [--rounds 3] [--repeats 3]
        [--task mnist] [--skip-throughput] [--skip-profile] [--json results.json]
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
from machine import describe_machine  # benchmarks/machine.py, beside this script
from torch.profiler import ProfilerActivity, profile, record_function

from meta_train.learner import Learner
from meta_train.meta_update import MetaState, init_meta_state, meta_update
from meta_train.run_config import RunConfig, build_config
from meta_train.tasks.base import TaskFamily
from meta_train.training import init_theta_flat, slot_work, train_local

PHASES = ("optimizee fwd/bwd", "optimizer step fwd", "meta-backward")


# -- part 1: throughput -----------------------------------------------------------------------


def time_plain(config: RunConfig, steps: int, optimizer, family) -> float:
    """Seconds of meta-steps 0..steps-1 of train_local (one torch thread, like a worker)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        train_local(
            optimizer,
            family,
            steps=steps,
            run_seed=config.seed,
            unroll=config.unroll,
            meta_optim=config.meta_optim,
            meta_batch=config.meta_batch,
        )
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def _plain_process(config: RunConfig, steps: int, barrier: Any, out: Any) -> None:
    optimizer, family = config.make_optimizer(), config.make_family()
    time_plain(config, 1, optimizer, family)  # warm, then start together
    barrier.wait()
    out.put(time_plain(config, steps, optimizer, family))


def time_two_processes(config: RunConfig, steps: int) -> float:
    """Two independent plain processes with one slot each, started together (no Ray, no
    messages): the machine's own ceiling for two workers. Returns the slower one's seconds."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier, out = context.Barrier(2), context.Queue()
    single = dataclasses.replace(config, meta_batch=1)
    procs = [
        context.Process(target=_plain_process, args=(single, steps, barrier, out)) for _ in range(2)
    ]
    for proc in procs:
        proc.start()
    seconds = [out.get(timeout=3600) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    return max(seconds)


def time_ray(config: RunConfig, workers: int, steps: int) -> float:
    """Seconds of meta-steps 1..steps of the Ray learner (actor start-up and the actors' first
    call excluded: fresh processes pay one-time costs there — loading the fused kernel, torch's
    first ops, the allocator — that the plain loop, timed in a warm process, no longer pays)."""
    learner = Learner(dataclasses.replace(config, workers=workers))
    try:
        learner.start()  # actors up, task family (MNIST) loaded in each
        learner.run(1)
        start = time.perf_counter()
        learner.run(1 + steps)
        return time.perf_counter() - start
    finally:
        learner.close()


def throughput(config: RunConfig, steps: int, rounds: int) -> dict[str, Any]:
    """Rounds of plain / ray-1 / ray-2 interleaved, so that a changing background load hits
    every mode alike; the median round of each mode is reported."""
    import ray

    inner = steps * config.meta_batch * config.unroll.truncation
    optimizer, family = config.make_optimizer(), config.make_family()
    time_plain(config, 1, optimizer, family)  # warm: dataset, allocator
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING
    )
    seconds: dict[str, list[float]] = {"plain": [], "ray-1": [], "ray-2": [], "plain×2": []}
    try:
        for _ in range(rounds):
            seconds["plain"].append(time_plain(config, steps, optimizer, family))
            seconds["ray-1"].append(time_ray(config, 1, steps))
            seconds["ray-2"].append(time_ray(config, 2, steps))
            seconds["plain×2"].append(time_two_processes(config, steps))
    finally:
        ray.shutdown()
    median = {mode: statistics.median(values) for mode, values in seconds.items()}
    rates = {mode: inner / value for mode, value in median.items()}
    return {
        "meta_steps": steps,
        "meta_batch": config.meta_batch,
        "inner_steps": inner,
        "rounds": rounds,
        "seconds": seconds,
        "inner_steps_per_s": rates,
        "ray1_over_plain": rates["ray-1"] / rates["plain"],
        "ray2_over_ray1": rates["ray-2"] / rates["ray-1"],
        "two_processes_over_plain": rates["plain×2"] / rates["plain"],
        "load_average": os.getloadavg(),
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


def one_update(config: RunConfig, optimizer, family, meta: MetaState, trajectory) -> MetaState:
    out = slot_work(optimizer, family, config.unroll, meta.theta, config.seed, 0, 1, trajectory)
    return meta_update(meta, [out.meta_grad], config.meta_optim)[0]


def profile_optimizer(name: str, task: str, repeats: int) -> dict[str, Any]:
    config = build_config({"optimizer": name, "task": task, "meta_batch": 1})
    optimizer, family = config.make_optimizer(), config.make_family()
    meta = init_meta_state(init_theta_flat(optimizer, config.seed))
    first = slot_work(optimizer, family, config.unroll, meta.theta, config.seed, 0, 0, None)
    trajectory = first.trajectory  # time a mid-trajectory truncation (meta-step 1)
    plain = []
    for _ in range(repeats):
        start = time.perf_counter()
        meta = one_update(config, optimizer, family, meta, trajectory)
        plain.append(time.perf_counter() - start)

    labelled_family = LabelledFamily(family)
    optimizer.step = labelled(optimizer.step, PHASES[1])  # instance attribute: this run only
    original_grad = torch.autograd.grad
    torch.autograd.grad = labelled(original_grad, PHASES[2])  # the surrogate's backward
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            meta = one_update(config, optimizer, labelled_family, meta, trajectory)
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
    parser.add_argument("--steps", type=int, default=3, help="timed meta-steps per mode")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the modes")
    parser.add_argument("--repeats", type=int, default=3, help="plain timings per optimizer")
    parser.add_argument("--task", default="mnist", help="mnist (the paper's) or quadratic")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    results: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "machine": describe_machine(),
    }
    print(f"machine: {results['machine']}")
    if not args.skip_throughput:
        config = build_config({"task": args.task, "meta_batch": 2, "validation": {"every": 0}})
        t = throughput(config, args.steps, args.rounds)
        results["throughput"] = t
        print(
            f"throughput: {t['meta_steps']} meta-steps × meta-batch {t['meta_batch']} × 20 "
            f"inner steps = {t['inner_steps']} inner steps per mode ({args.task})"
        )
        for mode, rate in t["inner_steps_per_s"].items():
            rounds = ", ".join(f"{x:.2f}" for x in t["seconds"][mode])
            print(f"  {mode:8s} {rate:8.1f} inner steps/s   (seconds per round: {rounds})")
        print(f"  ray-1 / plain = {t['ray1_over_plain']:.2f}   (target >= 0.9)")
        print(f"  ray-2 / ray-1 = {t['ray2_over_ray1']:.2f}   (target >= 1.7)")
        print(
            f"  plain×2 / plain = {t['two_processes_over_plain']:.2f}   (the machine's own "
            "two-process scaling, no Ray)"
        )
        print(
            f"  load average during the run: {t['load_average'][0]:.2f} on {os.cpu_count()} "
            "CPUs (other processes share this machine)"
        )
    if not args.skip_profile:
        torch.set_num_threads(1)
        results["profile"] = []
        print("\nseconds per meta-update (20 inner steps, 1 torch thread):")
        for name in ("hyperadam", "rnnprop", "dm"):
            p = profile_optimizer(name, args.task, args.repeats)
            results["profile"].append(p)
            breakdown = "  ".join(f"{k} {100 * v:.0f}%" for k, v in p["phases_fraction"].items())
            print(
                f"  {name:9s} {p['seconds_per_meta_update']:.3f} s   (profiled "
                f"{p['profiled_seconds']:.3f} s: {breakdown})"
            )
            for key, seconds, count in p["top_ops"][:5]:
                print(f"      {key:40s} {seconds * 1e3:8.1f} ms self  ×{count}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
