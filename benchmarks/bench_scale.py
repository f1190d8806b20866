"""The learner's own cost and traffic with many Ray workers (docs/scaling.md).

Runs the real ``Learner`` (scheduling, message handling, averaging, Adam on θ, the θ broadcast)
with N worker actors on this machine, one record per N. The actors are light stand-ins for
``GradientWorker`` that speak the same protocol (``meta_train/messages.py``): each call sleeps
``--slot-s`` per slot (0.05 s; with ``--calibrate`` the measured time of one real truncation of
the paper's MNIST recipe) and answers a θ-sized meta-gradient, so a 2-core machine can host 32+
of them (≈ 60 MB each, no torch) and what is measured is the learner, not the workers' compute
competing with it for the cores. ``StandInLearner`` is the real ``Learner``; only the actor
class and its constructor arguments differ.

θ is HyperAdam's (J = 20: 5 380 values); the meta-batch is ``--slots-per-worker`` × N. Per N,
``--warmup`` updates are run first, then ``--steps`` timed ones. Keys of each record:

  workers, meta_batch, staleness, steps
  learner_s_per_update        learner wall time per update not spent blocked in ``ray.wait``
  learner_cpu_s_per_update    the learner process's CPU time per update (all its threads,
                              Ray's included): what a busy shared machine inflates least
  update_s                    wall time per update (includes waiting for the workers)
  bytes_to_learner_per_update answers, pickled (what Ray serialises), per update
  bytes_from_learner_per_update calls' arguments + θ once per worker and version, per update
  theta_bytes                 θ's size (float32)
  object_store_peak_bytes     the object store's bytes in use, highest sample (one per update)
  staleness_max, staleness_mean, stale_rejected_total, load_average (1 min, at the end)

With ``--spread F`` worker i sleeps ``slot_s × (1 + F·i/(N−1))``: with ``--staleness S > 0`` the
fast workers really run ahead of the slow ones (the bounded-staleness mode at scale).

    .venv/bin/python benchmarks/bench_scale.py --workers 1 8 32 [128] [--steps 30]
        [--staleness 0] [--slot-s SECONDS | --calibrate] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from typing import Any

import numpy as np
import ray
from machine import describe_machine  # benchmarks/machine.py, beside this script

from meta_train.learner import Learner, StepReport
from meta_train.messages import SlotResult, SlotWork, WorkerResult
from meta_train.run_config import RunConfig, build_config

THETA_SIZE = 5380  # HyperAdam, J = 20


class StandInWorker:
    """A gradient worker's protocol without its compute: sleeps, answers θ-sized gradients.

    The gradient of (slot, step) is drawn from a generator seeded by both, so every update
    averages B distinct finite vectors, as the real ones.
    """

    def __init__(self, worker_id: int, theta_size: int, slot_s: float) -> None:
        self.worker_id = worker_id
        self.theta_size = theta_size
        self.slot_s = slot_s

    def ping(self) -> int:
        return os.getpid()

    def compute(
        self, theta: Any, version: int, work: tuple[SlotWork, ...], replay_thetas: Any = None
    ) -> WorkerResult:
        del theta, replay_thetas
        start = time.perf_counter()
        time.sleep(self.slot_s * len(work))
        results = []
        for item in work:
            rng = np.random.default_rng((item.slot, item.step))
            grad = rng.standard_normal(self.theta_size, dtype=np.float32) * 1e-3
            results.append(
                SlotResult(
                    slot=item.slot,
                    step=item.step,
                    version=version,
                    task_seed=0,
                    meta_grad=grad,
                    inner_step=20,
                    meta_loss=1.0,
                    inner_losses=(1.0,) * 20,
                    grad_norm=float(np.linalg.norm(grad)),
                    compute_s=self.slot_s,
                )
            )
        return WorkerResult(
            self.worker_id, os.getpid(), version, tuple(results), time.perf_counter() - start
        )


class StandInLearner(Learner):
    """The real learner; only its actors are stand-ins (light: no CPU reserved)."""

    worker_class = StandInWorker
    slot_s = 0.05
    spread = 0.0

    def _new_actor(self, index: int) -> Any:
        share = index / (self.num_workers - 1) if self.num_workers > 1 else 0.0
        return self._remote_cls.remote(index, THETA_SIZE, self.slot_s * (1 + self.spread * share))


def scale_config(workers: int, slots_per_worker: int, staleness: int, steps: int) -> RunConfig:
    config = build_config(
        {
            "task": "quadratic",  # the stand-ins never build it; θ is HyperAdam's (J = 20)
            "meta_batch": workers * slots_per_worker,
            "staleness": staleness,
            "steps": steps,
            "validation": {"every": 0},
        }
    )
    return dataclasses.replace(config, workers=workers)


def calibrate_slot_s(repeats: int = 3) -> float:
    """Median seconds of one real truncation of the paper's recipe (MNIST MLP, HyperAdam)."""
    import torch

    from meta_train.training import init_theta_flat, slot_work

    torch.set_num_threads(1)  # a worker's setting
    config = build_config({"validation": {"every": 0}})
    optimizer, family = config.make_optimizer(), config.make_family()
    theta = init_theta_flat(optimizer, 0)
    first = slot_work(optimizer, family, config.unroll, theta, 0, 0, 0, None)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        slot_work(optimizer, family, config.unroll, theta, 0, 0, 1, first.trajectory)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def object_store_bytes(address: str) -> int:
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    return int(get_memory_info_reply(get_state_from_address(address)).store_stats
               .object_store_bytes_used)


def measure(workers: int, args: argparse.Namespace, slot_s: float, address: str) -> dict:
    config = scale_config(workers, args.slots_per_worker, args.staleness, args.steps)
    StandInLearner.slot_s = slot_s
    StandInLearner.spread = args.spread
    learner = StandInLearner(config, worker_resources={"num_cpus": 0}, poll_s=1.0)
    peak = [0]
    callback_s = [0.0]
    callback_cpu_s = [0.0]
    staleness: list[int] = []
    stale_rejected = [0]

    def on_step(report: StepReport) -> None:
        start, cpu = time.perf_counter(), time.process_time()
        peak[0] = max(peak[0], object_store_bytes(address))
        staleness.extend(report.staleness)
        stale_rejected[0] = report.stale_rejected_total
        callback_s[0] += time.perf_counter() - start
        callback_cpu_s[0] += time.process_time() - cpu

    try:
        learner.start()
        learner.run(args.warmup, on_step)
        traffic_before = dataclasses.replace(learner.traffic)
        wait_before, callback_s[0], callback_cpu_s[0] = learner.wait_s, 0.0, 0.0
        staleness[:] = []
        start, cpu = time.perf_counter(), time.process_time()
        learner.run(args.warmup + args.steps, on_step)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        learner.close()
    steps = args.steps
    waited = learner.wait_s - wait_before
    return {
        "workers": workers,
        "meta_batch": config.meta_batch,
        "staleness": config.staleness,
        "steps": steps,
        "slot_s": slot_s,
        "learner_s_per_update": (wall - waited - callback_s[0]) / steps,
        "learner_cpu_s_per_update": (cpu - callback_cpu_s[0]) / steps,
        "update_s": (wall - callback_s[0]) / steps,
        "bytes_to_learner_per_update": (
            learner.traffic.to_learner - traffic_before.to_learner
        ) / steps,
        "bytes_from_learner_per_update": (
            learner.traffic.from_learner - traffic_before.from_learner
        ) / steps,
        "theta_bytes": THETA_SIZE * 4,
        "object_store_peak_bytes": peak[0],
        "staleness_max": max(staleness),
        "staleness_mean": float(np.mean(staleness)),
        "stale_rejected_total": stale_rejected[0],
        "load_average": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--slots-per-worker", type=int, default=1)
    parser.add_argument("--staleness", type=int, default=0)
    parser.add_argument("--spread", type=float, default=0.0,
                        help="worker i is slower by a factor 1 + SPREAD·i/(N−1)")
    parser.add_argument("--slot-s", type=float, default=0.05,
                        help="stand-in seconds per slot (default 0.05; see --calibrate)")
    parser.add_argument("--calibrate", action="store_true",
                        help="use the measured time of one real MNIST truncation instead")
    parser.add_argument("--json", help="write the records (and the machine) to this file")
    args = parser.parse_args()
    slot_s = calibrate_slot_s() if args.calibrate else args.slot_s
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    address = ray.get_runtime_context().gcs_address
    records = []
    try:
        for workers in args.workers:
            record = measure(workers, args, slot_s, address)
            records.append(record)
            print(
                f"workers {workers:4d}  learner {1e3 * record['learner_s_per_update']:7.2f} ms"
                f"/update (cpu {1e3 * record['learner_cpu_s_per_update']:6.2f})  update "
                f"{1e3 * record['update_s']:7.1f} ms  to learner "
                f"{record['bytes_to_learner_per_update'] / 1e3:8.1f} kB  from learner "
                f"{record['bytes_from_learner_per_update'] / 1e3:8.1f} kB  store peak "
                f"{record['object_store_peak_bytes'] / 1e3:7.1f} kB  staleness max "
                f"{record['staleness_max']}  load {record['load_average']:.1f}",
                flush=True,
            )
    finally:
        ray.shutdown()
    budget = 4 * THETA_SIZE * 4
    for record in records:
        ratio = record["bytes_to_learner_per_update"] / (budget * record["meta_batch"])
        print(f"workers {record['workers']}: bytes to learner = {ratio:.3f} × (4 θ × meta-batch)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": describe_machine(), "args": vars(args), "records": records},
                      f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
