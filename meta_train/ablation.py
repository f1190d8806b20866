"""Issue 15's ablations: meta-train one arm of the generalisation levers for a wall-time budget.

An *arm* fixes each lever — the HyperAdam variant (the paper's global normalisation, or the
tensor-wise inputs with a bounded or unbounded step), the task family (the paper's MNIST MLP
with its tricks, or the broad cheap family), the meta-objective (mean loss, or mean log loss),
the start (random, or the Adam reduction), the meta-gradient estimator (truncated BPTT or PES)
and the trajectories' horizons (fixed, or log-uniform with random offsets) — and trains θ for
the same wall-clock minutes as every other arm (equal wall time: a cheaper arm makes more
updates). Each arm is a ``RunConfig`` (``ArmConfig.run_config``) trained by the single-process
loop ``training.local_updates``: the slot work and the meta-update that ``hyperadam
meta-train`` runs on its Ray workers, so an arm's recipe can be rerun there as it is
(``--write-config``). The θ is saved as a θ file whose metadata hold the arm, the run config's
digest, seed, updates and wall time, and every arm is one MLflow run with its whole config as
params; `hyperadam benchmark --optimizer FILE` then judges it on the held-out suite.

    python -m meta_train.ablation --arm tensor-small-log --minutes 30 --out runs/ablation
    python -m meta_train.ablation --arm tensor-small-log-pes --write-config pes.json
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

from .experimental import VARIANTS
from .run_config import RunConfig, build_config, config_digest
from .tasks.base import TaskFamily
from .training import init_theta_flat, local_updates

# The "wide" family: the small one with its convex and full-MNIST members switched on
# (``tasks/small_family.py``), so that meta-training sees what the snapshot gate checks.
WIDE_FAMILY = {"model_weights": [0.35, 0.1, 0.15, 0.2, 0.2]}
# "wide-paper": the same members, weighted toward what the paper's 100-step rows are made of
# (MLPs on full 28×28 MNIST with the paper's four activations, and sine-sequence LSTMs), with
# the convex problems kept at the weight that the 10 000-step gate rows need.
WIDE_PAPER_FAMILY = {"model_weights": [0.15, 0.05, 0.25, 0.2, 0.35]}
# "wide-paper-convex": the same with the convex problems' weight raised (from the MLPs on 8×8
# MNIST), after session 18's arm on "wide-paper" learned a sine-LSTM gain that broke them.
WIDE_PAPER_CONVEX_FAMILY = {"model_weights": [0.05, 0.05, 0.25, 0.35, 0.3]}
# "wide-paper-deep": "wide-paper" with 28×28 MLPs of 1–10 hidden layers (not 1–3), for the
# deep sigmoid rows of Fig. 5(d), which nothing measured in session 18 reached.
WIDE_PAPER_DEEP_FAMILY = {**WIDE_PAPER_FAMILY, "mnist28_max_depth": 10}
# "wide-paper-deep-excess": "wide-paper-deep" with its convex problems scored by their excess
# over the optimum, floored at 1e-5 (``ConvexObjectiveTask``), not by the raw objective: the
# deep arm broke the gate's convex rows at excesses that barely move the raw objective's log
# (1.3e-3 on the gate's logistic regression, whose f* is 0.223: 0.006).
WIDE_PAPER_DEEP_EXCESS_FAMILY = {**WIDE_PAPER_DEEP_FAMILY, "convex_excess_floor": 1e-5}
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "wide": WIDE_FAMILY,
    "wide-paper": WIDE_PAPER_FAMILY,
    "wide-paper-convex": WIDE_PAPER_CONVEX_FAMILY,
    "wide-paper-deep": WIDE_PAPER_DEEP_FAMILY,
    "wide-paper-deep-excess": WIDE_PAPER_DEEP_EXCESS_FAMILY,
}
FAMILIES = ("paper", "small", *FAMILY_CONFIGS)
# Levers changed together by design, counted as one where arms are compared: the wide family's
# point is its 10 000-step convex problems, which need the horizons that reach them.
LEVER_BUNDLES = (("family", "log_uniform_horizons"),)
ESTIMATORS = ("tbptt", "pes")


@dataclasses.dataclass(frozen=True)
class ArmConfig:
    """One arm of the ablation (logged whole); ``run_config`` is what it trains."""

    name: str
    variant: str = "tensor"
    family: str = "small"
    meta_loss: str = "log"
    init: str = "adam"  # "adam": the Adam-reduction start at lr = α; "random": the spec's init;
    # "theta": the θ file ``start_theta`` (relative to the directory the arm runs in, as every
    # path of the ablation's commands is), pinned by content to ``start_theta_sha256``
    start_theta: str | None = None
    start_theta_sha256: str | None = None
    horizon: int = 200
    truncation: int = 20
    meta_batch: int = 4
    meta_lr: float = 1e-3
    clip_norm: float | None = 1.0
    seed: int = 0
    estimator: str = "tbptt"  # or "pes" (forward only, antithetic pairs)
    sigma: float = 0.01  # pes: σ of the perturbations
    pairs: int = 1  # pes: antithetic pairs per slot
    # (min, max) inner steps: log-uniform horizons with random offsets; None: ``horizon``.
    log_uniform_horizons: tuple[int, int] | None = None
    frozen: tuple[str, ...] = ()  # θ entries left at the start (``experimental.frozen``)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.init not in ("adam", "random", "theta"):
            raise ValueError(f"init must be 'adam', 'random' or 'theta', got {self.init!r}")
        if (self.init == "theta") != (self.start_theta is not None) or (
            (self.start_theta is None) != (self.start_theta_sha256 is None)
        ):
            raise ValueError(
                "init 'theta' needs start_theta and start_theta_sha256 (the file and the digest "
                "it must have), and they apply to init 'theta' only"
            )
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        horizons = self.log_uniform_horizons
        if horizons is not None and (not isinstance(horizons, (tuple, list)) or len(horizons) != 2):
            raise ValueError(f"log_uniform_horizons must be (min, max) or None, got {horizons!r}")
        self.run_config()  # validates the rest, with the RunConfig's messages

    def run_config(self) -> RunConfig:
        """The meta-training run this arm is (no validation: the ablation scores on held-out
        tasks afterwards; no workers: the driver runs it in one process)."""
        experimental: dict[str, Any] = {"variant": self.variant}
        if self.frozen:
            experimental["frozen"] = list(self.frozen)
        if self.estimator == "pes":
            experimental["estimator"] = {"kind": "pes", "sigma": self.sigma, "pairs": self.pairs}
        elif (self.sigma, self.pairs) != (ArmConfig.sigma, ArmConfig.pairs):
            raise ValueError("sigma and pairs apply to estimator 'pes' only")
        if self.log_uniform_horizons is not None:
            low, high = self.log_uniform_horizons
            experimental["horizons"] = {
                "kind": "log_uniform", "min_steps": low, "max_steps": high, "offsets": True
            }  # fmt: skip
        data: dict[str, Any] = {
            "optimizer": "hyperadam",
            "task": "mnist" if self.family == "paper" else "small",
            "seed": self.seed,
            "meta_batch": self.meta_batch,
            "unroll": {
                "horizon": self.horizon, "truncation": self.truncation, "meta_loss": self.meta_loss
            },  # fmt: skip
            "meta_optim": {"lr": self.meta_lr, "clip_norm": self.clip_norm},
            "validation": {"every": 0},
            "experimental": experimental,
        }
        if self.family in FAMILY_CONFIGS:
            data["family"] = FAMILY_CONFIGS[self.family]
        if self.init == "theta":
            # Pinned here, so that building the config never reads the file (the arms are
            # built at import); the run reads it and refuses one whose digest differs.
            data["init"] = {
                "kind": "theta", "theta": self.start_theta, "theta_sha256": self.start_theta_sha256
            }  # fmt: skip
        elif self.init == "adam":
            # The Adam-reduction start is Adam at the variant's own α (lr = α: Σ_j ρ_j = 1).
            alpha = build_config(data).make_optimizer().default_lr
            experimental["adam_start"] = {"lr": alpha}
        return build_config(data)


# Session 16's arms: the wide family (convex problems and full-MNIST MLPs with unbounded
# activations added), horizons up to 10 000 steps, and PES at a smaller σ (session 13's
# 10 000-step arm diverged at σ = 0.01), from the annealed start.
WIDE_PES: dict[str, Any] = {
    "variant": "tensor-trend-annealed",
    "family": "wide",
    "log_uniform_horizons": (100, 10000),
    "estimator": "pes",
    "sigma": 0.003,
}
# The annealed variant's θ entries that make the cells (all but ρ's kernel and the schedule).
CELLS = ("pre_kernel", "pre_bias", "lstm_kernel", "lstm_bias", "decay_kernel", "decay_bias")
# The same less the decay gates' bias: frozen, they leave the decay rates constants to learn.
CONSTANT_DECAYS = tuple(name for name in CELLS if name != "decay_bias")
# Session 17's decays θ, the first meta-trained θ to meet the held-out targets, as a start.
FROM_DECAYS: dict[str, Any] = {
    "init": "theta",
    "start_theta": (
        "checkpoints/ablation/tensor-trend-annealed-wide-log-pes10k-decays-gated/theta.npz"
    ),
    "start_theta_sha256": "02da9d637345955e46c4c5d14448a5fe0f2f8f587efb82fb54f2af40657938ea",
}

# The arms of docs/generalisation.md's ablation table: each differs in one lever from the first,
# except the PES arms, which differ from the log-uniform TBPTT arms in their estimator only (the
# PES-against-TBPTT comparison at equal wall time), once on each bounded variant.
ARMS = {
    arm.name: arm
    for arm in (
        ArmConfig("tensor-small-log"),
        ArmConfig("paper-small-log", variant="paper"),
        ArmConfig("tensor-unbounded-small-log", variant="tensor-unbounded"),
        ArmConfig("tensor-paperfamily-log", family="paper", horizon=100),
        ArmConfig("tensor-small-mean", meta_loss="mean"),
        ArmConfig("tensor-small-log-loguniform", log_uniform_horizons=(100, 2000)),
        ArmConfig("tensor-small-log-pes", log_uniform_horizons=(100, 2000), estimator="pes"),
        ArmConfig("tensor-adaptive-small-log", variant="tensor-adaptive"),
        # The family and meta-loss levers, measured on the adaptive variant (the best base).
        ArmConfig("tensor-adaptive-small-mean", variant="tensor-adaptive", meta_loss="mean"),
        ArmConfig(
            "tensor-adaptive-paperfamily-log",
            variant="tensor-adaptive",
            family="paper",
            horizon=100,
        ),
        ArmConfig(
            "tensor-adaptive-small-log-loguniform",
            variant="tensor-adaptive",
            log_uniform_horizons=(100, 2000),
        ),
        ArmConfig(
            "tensor-adaptive-small-log-pes",
            variant="tensor-adaptive",
            log_uniform_horizons=(100, 2000),
            estimator="pes",
        ),
        # The step scale's cosine against the gradient's trend instead of the last step: the
        # PES arm above with that one lever changed.
        ArmConfig(
            "tensor-trend-small-log-pes",
            variant="tensor-trend",
            log_uniform_horizons=(100, 2000),
            estimator="pes",
        ),
        # The same with horizons up to the held-out suite's longest (10 000 steps): trained on
        # at most 2 000, the arm above learned steps that break by step 10 000.
        ArmConfig(
            "tensor-trend-small-log-pes-10k",
            variant="tensor-trend",
            log_uniform_horizons=(100, 10000),
            estimator="pes",
        ),
        # The trend rule at an annealed rate (fast for the first ~100 steps, then κ): the PES
        # arm of the trend rule with that one lever changed.
        ArmConfig(
            "tensor-trend-annealed-small-log-pes",
            variant="tensor-trend-annealed",
            log_uniform_horizons=(100, 2000),
            estimator="pes",
        ),
        # The same with the step scale's rates and the base step frozen at the start: only the
        # cells (inputs, StateCell, decay gates, the ρ kernel) train, so meta-training cannot
        # move the step sizes that keep the start's 10 000-step runs stable.
        ArmConfig(
            "tensor-trend-annealed-small-log-pes-cells",
            variant="tensor-trend-annealed",
            log_uniform_horizons=(100, 2000),
            estimator="pes",
            frozen=("scale_rate", "scale_rate_early", "weight_bias"),
        ),
        # The annealed variant on the paper's recipe (its family, 100-step trajectories,
        # truncated BPTT): the arm whose θ the paper's 100-step rows would favour, judged
        # afterwards through the snapshot gate and the held-out suite.
        ArmConfig(
            "tensor-trend-annealed-paperfamily-log",
            variant="tensor-trend-annealed",
            family="paper",
            horizon=100,
        ),
        # The cells-only arm meta-trained on the paper's family (its MNIST MLP and tricks)
        # instead of the broad one: what the paper's 100-step rows would need, with the step
        # sizes frozen so that the snapshot gate can keep what the start has at 10 000 steps.
        ArmConfig(
            "tensor-trend-annealed-paperfamily-log-pes-cells",
            variant="tensor-trend-annealed",
            family="paper",
            log_uniform_horizons=(100, 2000),
            estimator="pes",
            frozen=("scale_rate", "scale_rate_early", "weight_bias"),
        ),
        # The cells-only arm with ρ's kernel frozen too. The start's kernel is 0, so ρ stays
        # the start's whatever the cells compute: only the directions (the decay gates and
        # what feeds them) train, and the step sizes cannot move at all.
        ArmConfig(
            "tensor-trend-annealed-small-log-pes-decays",
            variant="tensor-trend-annealed",
            log_uniform_horizons=(100, 2000),
            estimator="pes",
            frozen=("scale_rate", "scale_rate_early", "weight_bias", "weight_kernel"),
        ),
        # Session 16: train on what the gate checks (``WIDE_PES``); the arms differ only in
        # what is frozen. The cells train, the step sizes frozen (as in the cells arm above):
        ArmConfig(
            "tensor-trend-annealed-wide-log-pes10k-cells",
            frozen=("scale_rate", "scale_rate_early", "weight_bias"),
            **WIDE_PES,
        ),
        # The opposite split: only the schedule trains (κ, κ₀ and ρ's bias, 22 numbers), the
        # cells stay the start's. The paper's 100-step rows want a faster early step than the
        # start's; the wide family's 10 000-step runs say how far it may go.
        ArmConfig(
            "tensor-trend-annealed-wide-log-pes10k-schedule",
            frozen=(*CELLS, "weight_kernel"),
            **WIDE_PES,
        ),
        # The schedule arm with ρ's kernel trainable too: a base step read from the (frozen)
        # cells, per coordinate, instead of one constant per candidate.
        ArmConfig("tensor-trend-annealed-wide-log-pes10k-schedule-rho", frozen=CELLS, **WIDE_PES),
        # Session 17: the schedule arm with the J Adams' decay rates trainable too, as constants
        # (the decay gates' bias; their kernel stays 0, so β_j and γ_j are the same in every
        # coordinate): a learned mixture of J Adams with their own β₁, β₂ and weights, nothing
        # that the cells could move per coordinate (62 numbers).
        ArmConfig(
            "tensor-trend-annealed-wide-log-pes10k-schedule-decays",
            frozen=(*CONSTANT_DECAYS, "weight_kernel"),
            **WIDE_PES,
        ),
        # The same with the base step frozen too: only the decay rates and the scale's rates
        # train, so what it gains cannot come from a larger step (42 numbers).
        ArmConfig(
            "tensor-trend-annealed-wide-log-pes10k-decays",
            frozen=(*CONSTANT_DECAYS, "weight_kernel", "weight_bias"),
            **WIDE_PES,
        ),
        # Session 18: session 16's cells arm, started from the decays arm's θ (which meets the
        # held-out targets) instead of the untrained start: can the cells, trained from there,
        # learn to tell the paper's 100-step tasks from the gate's without breaking the latter?
        ArmConfig(
            "tensor-trend-annealed-wide-log-pes10k-cells-from-decays",
            frozen=("scale_rate", "scale_rate_early", "weight_bias"),
            **FROM_DECAYS,
            **WIDE_PES,
        ),
        # The same on the family weighted toward the paper's rows (``WIDE_PAPER_FAMILY``).
        ArmConfig(
            "tensor-trend-annealed-widepaper-log-pes10k-cells-from-decays",
            frozen=("scale_rate", "scale_rate_early", "weight_bias"),
            **FROM_DECAYS,
            **{**WIDE_PES, "family": "wide-paper"},
        ),
        # The same with the convex problems weighted up (``WIDE_PAPER_CONVEX_FAMILY``): does
        # meta-training that sees more of them keep the step that its LSTM gain asks for from
        # breaking them at 10 000 steps?
        ArmConfig(
            "tensor-trend-annealed-widepaperconvex-log-pes10k-cells-from-decays",
            frozen=("scale_rate", "scale_rate_early", "weight_bias"),
            **FROM_DECAYS,
            **{**WIDE_PES, "family": "wide-paper-convex"},
        ),
        # Session 19: the wide-paper arm with deeper 28×28 MLPs in the family
        # (``WIDE_PAPER_DEEP_FAMILY``): can the cells learn what the deep sigmoid rows ask for?
        ArmConfig(
            "tensor-trend-annealed-widepaperdeep-log-pes10k-cells-from-decays",
            frozen=("scale_rate", "scale_rate_early", "weight_bias"),
            **FROM_DECAYS,
            **{**WIDE_PES, "family": "wide-paper-deep"},
        ),
        # Session 20: the deep arm with ρ's kernel frozen too (at the decays θ's 0). The cells
        # still set each coordinate's decay rates (the directions), but ρ is the start's
        # constant whatever they compute, so no input can make the step larger: does what the
        # deep rows gained come from the directions, and do the convex rows then hold?
        ArmConfig(
            "tensor-trend-annealed-widepaperdeep-log-pes10k-directions-from-decays",
            frozen=("scale_rate", "scale_rate_early", "weight_bias", "weight_kernel"),
            **FROM_DECAYS,
            **{**WIDE_PES, "family": "wide-paper-deep"},
        ),
        # Session 20: the deep arm with the convex problems scored by their floored excess
        # (``WIDE_PAPER_DEEP_EXCESS_FAMILY``): does a meta-loss that sees what the gate counts
        # keep the convex rows while the cells learn the deep rows?
        ArmConfig(
            "tensor-trend-annealed-widepaperdeepexcess-log-pes10k-cells-from-decays",
            frozen=("scale_rate", "scale_rate_early", "weight_bias"),
            **FROM_DECAYS,
            **{**WIDE_PES, "family": "wide-paper-deep-excess"},
        ),
    )
}


def train_arm(
    arm: ArmConfig,
    *,
    minutes: float,
    out: Path,
    tracking_uri: str | None = None,
    snapshot_minutes: float | None = None,
) -> dict[str, Any]:
    """Meta-trains ``arm`` for ``minutes`` of wall time; writes ``out/<arm>/theta.npz``.

    With ``snapshot_minutes``, θ is also saved every that many minutes of wall time as
    ``out/<arm>/snapshots/theta-<updates>.npz`` (the same metadata as the final file), so a
    checkpoint that a gate rejects can be traded for an earlier one that passes.
    """
    if snapshot_minutes is not None and not (
        math.isfinite(snapshot_minutes) and snapshot_minutes > 0
    ):
        raise ValueError(f"snapshot_minutes must be a positive number, got {snapshot_minutes!r}")
    config = arm.run_config()
    optimizer = config.make_optimizer()
    family = config.make_family()
    theta = init_theta_flat(optimizer, config.seed, config.init, config.experimental)
    updates = local_updates(
        optimizer, family, run_seed=config.seed, unroll=config.unroll,
        meta_optim=config.meta_optim, meta_batch=arm.meta_batch, theta_flat=theta,
        experimental=config.experimental,
    )  # fmt: skip
    folder = out / arm.name
    folder.mkdir(parents=True, exist_ok=True)

    def save(path: Path, updates: int, wall: float) -> Path:
        return save_theta(
            path,
            optimizer.name,
            optimizer.unflatten(theta),
            arm=dataclasses.asdict(arm),
            config_digest=config_digest(config),
            updates=updates,
            wall_seconds=wall,
            family_digest=family.digest() if hasattr(family, "digest") else None,
            hardware=_host(),
            mlflow_run_id=run_id,
        )

    client, run_id = _start_run(tracking_uri, arm, minutes, family, config)
    started, step, losses = time.perf_counter(), 0, []
    deadline = started + 60.0 * minutes
    every = math.inf if snapshot_minutes is None else 60.0 * snapshot_minutes
    next_snapshot = started + every
    status = "FAILED"
    try:
        while time.perf_counter() < deadline:
            # Non-finite meta-gradients are rejected one by one, as on the Ray learner.
            state, metrics = next(updates)
            theta = state.theta
            loss = metrics["meta_loss"]
            losses.append(loss)
            if client is not None and math.isfinite(loss):
                client.log_metric(run_id, "meta_loss", loss, step=step)
            step += 1
            now = time.perf_counter()
            if now >= next_snapshot:
                (folder / "snapshots").mkdir(exist_ok=True)
                save(folder / "snapshots" / f"theta-{step:06d}.npz", step, now - started)
                next_snapshot = now + every  # a slow update never leaves a backlog of snapshots
        status = "FINISHED"
    finally:
        wall = time.perf_counter() - started
        path = save(folder / "theta.npz", step, wall)
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


def _start_run(
    uri: str | None, arm: ArmConfig, minutes: float, family: TaskFamily, config: RunConfig
):
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
    client.log_param(run.info.run_id, "config_digest", config_digest(config))
    return client, run.info.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", required=True, choices=sorted(ARMS))
    parser.add_argument("--minutes", type=float)
    parser.add_argument("--write-config", metavar="PATH",
                        help="write the arm's RunConfig (for hyperadam meta-train --config) "
                             "and exit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--snapshot-minutes", type=float, metavar="M",
                        help="also save θ every M minutes under <out>/<arm>/snapshots/")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    arm = dataclasses.replace(ARMS[args.arm], seed=args.seed)
    if args.write_config:
        Path(args.write_config).write_text(json.dumps(arm.run_config().to_dict(), indent=1))
        return 0
    if args.minutes is None:
        parser.error("--minutes is required to train an arm")
    if args.snapshot_minutes is not None and not args.snapshot_minutes > 0:
        parser.error(f"--snapshot-minutes must be positive, got {args.snapshot_minutes}")
    if arm.start_theta is not None and not Path(arm.start_theta).is_file():
        parser.error(
            f"arm {arm.name} starts from {arm.start_theta}, which is not here: run it from the "
            "repository root"
        )
    summary = train_arm(arm, minutes=args.minutes, out=Path(args.out),
                        tracking_uri=None if args.tracking_uri == "none" else args.tracking_uri,
                        snapshot_minutes=args.snapshot_minutes)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
