"""Issue 15's ablations: meta-train one arm of the generalisation levers for a wall-time budget.

An *arm* fixes each lever — the HyperAdam variant (the paper's global normalisation, or the
tensor-wise inputs with a bounded or unbounded step), the task family (the paper's MNIST MLP
with its tricks, or the broad cheap family), the meta-objective (mean loss, or mean log loss),
the start (random, or the Adam reduction) — and trains θ with truncated BPTT for the same
wall-clock minutes as every other arm (equal wall time: a cheaper arm makes more updates). The
θ is saved as a θ file whose metadata hold the arm, seed, updates and wall time, and every arm
is one MLflow run with its whole config as params; `hyperadam benchmark --optimizer FILE`
then judges it on the held-out suite.

    python -m meta_train.ablation --arm tensor-small-log --minutes 30 --out runs/ablation
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from runtime.theta import save_theta

from .experimental import AdamStart, ExperimentalConfig
from .meta_update import MetaOptimConfig, init_meta_state, meta_update
from .optimizers.base import LearnedUpdateRule
from .tasks.base import TaskFamily
from .training import init_theta_flat, slot_work
from .unroll import Trajectory, UnrollConfig

VARIANTS = ("paper", "tensor", "tensor-unbounded", "tensor-adaptive")
FAMILIES = ("paper", "small")


@dataclasses.dataclass(frozen=True)
class ArmConfig:
    """One arm of the ablation (logged whole)."""

    name: str
    variant: str = "tensor"
    family: str = "small"
    meta_loss: str = "log"
    init: str = "adam"  # "adam": the Adam-reduction start at lr = α; "random": the spec's init
    horizon: int = 200
    truncation: int = 20
    meta_batch: int = 4
    meta_lr: float = 1e-3
    clip_norm: float | None = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.init not in ("adam", "random"):
            raise ValueError(f"init must be 'adam' or 'random', got {self.init!r}")
        UnrollConfig(self.horizon, self.truncation, self.meta_loss)  # validates those
        MetaOptimConfig(lr=self.meta_lr, clip_norm=self.clip_norm)


# The arms of docs/generalisation.md's ablation table: each differs from the first in one lever.
ARMS = {
    arm.name: arm
    for arm in (
        ArmConfig("tensor-small-log"),
        ArmConfig("paper-small-log", variant="paper"),
        ArmConfig("tensor-unbounded-small-log", variant="tensor-unbounded"),
        ArmConfig("tensor-paperfamily-log", family="paper", horizon=100),
        ArmConfig("tensor-small-mean", meta_loss="mean"),
        ArmConfig("tensor-adaptive-small-log", variant="tensor-adaptive"),
    )
}


def make_optimizer(variant: str) -> LearnedUpdateRule:
    from .optimizers.hyperadam import HyperAdam
    from .optimizers.hyperadam_tensor import TensorwiseHyperAdam

    if variant == "paper":
        return HyperAdam(implementation="fast")
    if variant == "tensor-adaptive":
        return TensorwiseHyperAdam(adaptive_scale=True)
    return TensorwiseHyperAdam(bounded=variant == "tensor")


def make_family(name: str) -> TaskFamily:
    if name == "small":
        from .tasks.small_family import SmallTaskFamily

        return SmallTaskFamily()
    from .run_config import RunConfig

    return RunConfig().make_family()


def train_arm(
    arm: ArmConfig, *, minutes: float, out: Path, tracking_uri: str | None = None
) -> dict[str, Any]:
    """Meta-trains ``arm`` for ``minutes`` of wall time; writes ``out/<arm>/theta.npz``."""
    optimizer = make_optimizer(arm.variant)
    family = make_family(arm.family)
    unroll = UnrollConfig(arm.horizon, arm.truncation, arm.meta_loss)
    meta = MetaOptimConfig(lr=arm.meta_lr, clip_norm=arm.clip_norm)
    # The Adam-reduction start is Adam at the variant's own α (lr = α: Σ_j ρ_j = 1).
    start = ExperimentalConfig(
        adam_start=AdamStart(lr=optimizer.default_lr) if arm.init == "adam" else None
    )
    state = init_meta_state(init_theta_flat(optimizer, arm.seed, experimental=start))
    folder = out / arm.name
    folder.mkdir(parents=True, exist_ok=True)
    client, run_id = _start_run(tracking_uri, arm, minutes, family)
    trajectories: list[Trajectory | None] = [None] * arm.meta_batch
    started, step, losses = time.perf_counter(), 0, []
    deadline = started + 60.0 * minutes
    status = "FAILED"
    try:
        while time.perf_counter() < deadline:
            results = [
                slot_work(optimizer, family, unroll, state.theta, arm.seed, slot, step,
                          trajectories[slot])
                for slot in range(arm.meta_batch)
            ]  # fmt: skip
            grads = [r.meta_grad for r in results]
            trajectories = [r.trajectory for r in results]
            # An arm skips a whole step with any non-finite gradient (not only that one).
            finite = all(bool(torch.isfinite(g).all()) for g in grads)
            state, _ = meta_update(state, grads if finite else [], meta)
            loss = sum(r.meta_loss for r in results) / len(results)
            losses.append(loss)
            if client is not None and math.isfinite(loss):
                client.log_metric(run_id, "meta_loss", loss, step=step)
            step += 1
        status = "FINISHED"
    finally:
        wall = time.perf_counter() - started
        path = save_theta(
            folder / "theta.npz",
            optimizer.name,
            optimizer.unflatten(state.theta),
            arm=dataclasses.asdict(arm),
            updates=step,
            wall_seconds=wall,
            family_digest=family.digest() if hasattr(family, "digest") else None,
            hardware=_host(),
            mlflow_run_id=run_id,
        )
        if client is not None:
            client.log_metric(run_id, "updates", step)
            client.log_artifact(run_id, str(path))
            client.set_terminated(run_id, status=status)
    summary = {"arm": arm.name, "updates": step, "wall_seconds": wall, "theta": str(path),
               "meta_loss_last50": sum(losses[-50:]) / max(len(losses[-50:]), 1)}  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _host() -> str:
    from .benchmark_report import host_name

    return host_name()


def _start_run(uri: str | None, arm: ArmConfig, minutes: float, family: TaskFamily):
    if not uri:
        return None, None
    from .tracking import make_client

    client = make_client(uri)  # a fresh sqlite store is created under a lock
    found = client.get_experiment_by_name("hyperadam-ablation")
    experiment = found.experiment_id if found else client.create_experiment("hyperadam-ablation")
    run = client.create_run(experiment, run_name=arm.name)
    for key, value in {**dataclasses.asdict(arm), "minutes": minutes}.items():
        client.log_param(run.info.run_id, key, json.dumps(value))
    client.log_param(run.info.run_id, "family_config", json.dumps(family.to_dict()))
    return client, run.info.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", required=True, choices=sorted(ARMS))
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    arm = dataclasses.replace(ARMS[args.arm], seed=args.seed)
    summary = train_arm(arm, minutes=args.minutes, out=Path(args.out),
                        tracking_uri=None if args.tracking_uri == "none" else args.tracking_uri)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
