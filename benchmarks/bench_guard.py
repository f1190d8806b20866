"""What the guard (``runtime/guard.py``) buys where the learned step fails, costs where it works.

Two tasks, side by side:

* **Badly conditioned logistic regression** (full batch, d = 50 features whose scales span 10³,
  so the Hessian's condition number is ~10⁶; n = 512 examples; 1 000 steps; 8 seeds). The
  built-in HyperAdam at its default lr oscillates here. Contenders: HyperAdam unguarded,
  Adam at the same lr, HyperAdam guarded with the default fallback lr (the optimizer's), Adam
  at the best lr of a grid (2^(-k/2), 4 … 0.0039, by its mean final loss over the seeds), and
  HyperAdam guarded with that lr as ``fallback_lr``. Reported: the final loss (mean over seeds)
  and the fallbacks taken.
* **MNIST MLP** (784-100-10 sigmoid, batch 128: the kind of task the built-in was meta-trained
  on, where its step is good), through ``runtime.torch.LearnedOptimizer`` unguarded, with
  ``guard=True`` and the loss, and with ``guard=True`` and no loss (the update-size guard), on
  identical minibatches: fallbacks (should be 0), whether the trajectories stay bitwise equal
  to the unguarded one, and each guard's cost, as the median over interleaved rounds of the ratio
  of ``opt.step`` seconds (guarded / unguarded), in wall time and in the calling thread's CPU
  time (the runtime runs on that thread here: ``threads=1``; CPU time is what a shared,
  loaded machine distorts least).

    .venv/bin/python benchmarks/bench_guard.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np
import torch
from machine import describe_machine  # benchmarks/machine.py, beside this script

import runtime
from runtime import guard as gd
from runtime.torch import LearnedOptimizer

ADAM_GRID = tuple(2.0 ** (-k / 2) for k in range(-4, 17))  # 4.0 … 0.0039


def logistic_problem(seed: int, n: int = 512, d: int = 50, condition: float = 1e6):
    """Features with scales logspace(0, ½·log10(condition)): Hessian eigenvalues span ~condition."""
    rng = np.random.default_rng(seed)
    scales = np.logspace(0, math.log10(condition) / 2, d)
    x = (rng.normal(size=(n, d)) * scales / scales.max() * 30).astype(np.float32)
    w_true = rng.normal(size=d) / scales * scales.max() / 30
    y = (x @ w_true + 0.5 * rng.normal(size=n) > 0).astype(np.float32)

    def loss_and_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = x @ w
        loss = float(np.mean(np.logaddexp(0, z) - y * z))
        p = 0.5 * (1 + np.tanh(0.5 * z))  # sigmoid without overflow
        return loss, (x.T @ (p - y) / n).astype(np.float32)

    hessian_scale = np.linalg.eigvalsh(x.T.astype(np.float64) @ x / n)
    return loss_and_grad, d, float(hessian_scale.max() / hessian_scale.min())


def run_learned(opt, problem, steps, guard=None) -> tuple[float, int]:
    loss_and_grad, d, _ = problem
    w = np.zeros(d, np.float32)
    stepper = opt.bind([w], guard=guard, guard_hook=None)
    for _ in range(steps):
        loss, grad = loss_and_grad(w)
        if guard is None:
            stepper.step([grad])
        else:
            stepper.step([grad], loss=loss)
    fallbacks = stepper.num_fallbacks if guard is not None else 0
    return loss_and_grad(w)[0], fallbacks


def run_adam(problem, steps, lr) -> float:
    loss_and_grad, d, _ = problem
    w = np.zeros(d, np.float32)
    config, moments = gd.GuardConfig(), gd.AdamMoments(0, [np.zeros(d, np.float32)],
                                                       [np.zeros(d, np.float32)])  # fmt: skip
    for _ in range(steps):
        moments = gd.adam_update(config, moments, [w], [loss_and_grad(w)[1]], [lr])
    final = loss_and_grad(w)[0]
    return final if math.isfinite(final) else math.inf


def convex_table(opt, seeds, steps) -> dict:
    """Final losses per seed. Adam's good lr is the grid's best by the mean over the seeds (one
    lr, as a user tunes it once; at the top of the grid Adam is chaotic here, so a per-seed
    pick would be a lucky draw)."""
    problems = [logistic_problem(seed) for seed in seeds]
    adam = {lr: [run_adam(p, steps, lr) for p in problems] for lr in ADAM_GRID}
    good_lr = min(adam, key=lambda lr: statistics.mean(adam[lr]))
    rows: dict[str, list[float]] = {}
    fallbacks: dict[str, list[int]] = {}
    for problem, good_adam in zip(problems, adam[good_lr], strict=True):
        results = {
            "hyperadam (lr 0.005)": (run_learned(opt, problem, steps)[0], 0),
            "Adam (lr 0.005)": (run_adam(problem, steps, opt.default_lr), 0),
            "hyperadam + guard (fallback lr 0.005)": run_learned(opt, problem, steps, True),
            f"Adam (lr {good_lr:.4g}: the grid's best)": (good_adam, 0),
            f"hyperadam + guard (fallback lr {good_lr:.4g})": run_learned(
                opt, problem, steps, gd.GuardConfig(fallback_lr=good_lr)
            ),
        }
        for name, (loss, count) in results.items():
            rows.setdefault(name, []).append(loss)
            fallbacks.setdefault(name, []).append(count)
    return {
        "condition": [p[2] for p in problems],
        "good_adam_lr": good_lr,
        "adam_grid_mean": {lr: statistics.mean(v) for lr, v in adam.items()},
        "loss": rows,
        "fallbacks": fallbacks,
    }


def mnist_mlp_table(opt, steps, rounds) -> dict:
    from meta_train.data.mnist import load_mnist

    data = load_mnist()
    images, labels = data.train_images, data.train_labels

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(784, 100), torch.nn.Sigmoid(), torch.nn.Linear(100, 10)
        )

    names = ("plain", "guarded", "update-size")
    models = {name: model() for name in names}
    optimizers = {
        "plain": LearnedOptimizer(models["plain"].parameters(), opt),
        "guarded": LearnedOptimizer(
            models["guarded"].parameters(), opt, guard=True, guard_hook=None
        ),
        "update-size": LearnedOptimizer(
            models["update-size"].parameters(), opt, guard=True, guard_hook=None
        ),
    }
    generator = torch.Generator().manual_seed(1)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    losses = []
    for t in range(steps):
        index = torch.randint(0, images.shape[0], (128,), generator=generator)
        x, y = images[index], labels[index]
        for name in names[t % 3 :] + names[: t % 3]:  # rotate who goes first
            net, optimizer = models[name], optimizers[name]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            start, start_cpu = time.perf_counter(), time.thread_time()
            optimizer.step(loss=loss) if name == "guarded" else optimizer.step()
            seconds[name].append(time.perf_counter() - start)
            cpu[name].append(time.thread_time() - start_cpu)
            if name == "plain":
                losses.append(float(loss.detach()))
    per_round = max(1, steps // rounds)

    def ratios(times: dict[str, list[float]], name: str) -> list[float]:
        return [
            sum(times[name][i : i + per_round]) / sum(times["plain"][i : i + per_round])
            for i in range(0, steps - per_round + 1, per_round)
        ]

    def same(name: str) -> bool:
        pairs = zip(models["plain"].parameters(), models[name].parameters(), strict=True)
        return all(torch.equal(a, b) for a, b in pairs)

    costs = {
        name: {
            "fallbacks": optimizers[name].num_fallbacks,
            "bitwise_equal_to_unguarded": same(name),
            "wall_ratio_median": statistics.median(ratios(seconds, name)),
            "wall_ratio_range": [min(ratios(seconds, name)), max(ratios(seconds, name))],
            "cpu_ratio_median": statistics.median(ratios(cpu, name)),
            "cpu_ratio_range": [min(ratios(cpu, name)), max(ratios(cpu, name))],
        }
        for name in ("guarded", "update-size")
    }
    return {
        "steps": steps,
        "first_loss": losses[0],
        "last_loss": statistics.mean(losses[-20:]),
        "step_ms": {k: 1e3 * statistics.median(v) for k, v in seconds.items()},
        "guards": costs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, 400 MLP steps")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    opt = runtime.load("hyperadam", threads=1)
    print(describe_machine())
    seeds = (0, 1) if args.quick else tuple(range(8))
    convex = convex_table(opt, seeds, steps=1000)
    cond = statistics.median(convex["condition"])
    print(f"\nlogistic regression, condition number ~{cond:.1e}, 1000 steps, seeds {seeds}")
    print(f"{'optimizer':<48} {'final loss (mean)':>18} {'per seed':>40} {'fallbacks':>10}")
    for name, values in convex["loss"].items():
        per_seed = " ".join(f"{v:.5f}" for v in values)
        count = sum(convex["fallbacks"][name])
        print(f"{name:<48} {statistics.mean(values):>18.5f} {per_seed:>40} {count:>10}")
    mlp = mnist_mlp_table(opt, steps=400 if args.quick else 1000, rounds=10)
    print(f"\nMNIST MLP 784-100-10 sigmoid, batch 128, {mlp['steps']} steps (runtime.torch)")
    print(f"loss {mlp['first_loss']:.3f} -> {mlp['last_loss']:.3f} (mean of the last 20)")
    print("opt.step median ms: " + ", ".join(f"{k} {v:.3f}" for k, v in mlp["step_ms"].items()))
    for name, row in mlp["guards"].items():
        label = "guard with the loss" if name == "guarded" else "guard without (update size)"
        print(
            f"{label}: fallbacks {row['fallbacks']}, bitwise the unguarded run: "
            f"{row['bitwise_equal_to_unguarded']}; step time / unguarded per round: median "
            f"{row['wall_ratio_median']:.3f} ({row['wall_ratio_range'][0]:.3f}–"
            f"{row['wall_ratio_range'][1]:.3f}) wall, {row['cpu_ratio_median']:.3f} "
            f"({row['cpu_ratio_range'][0]:.3f}–{row['cpu_ratio_range'][1]:.3f}) thread CPU"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"convex": convex, "mlp": mlp, "machine": describe_machine()}, f, indent=1)


if __name__ == "__main__":
    main()
