"""What the guard (``runtime/guard.py``) buys where the learned step fails, costs where it works.

Two tasks, side by side:

* **Badly conditioned logistic regression** (full batch, d = 50 features whose scales span 10³,
  so the Hessian's condition number is ~10⁶; n = 512 examples; 1 000 steps; several seeds). The
  built-in HyperAdam at its default lr oscillates here. Contenders: HyperAdam unguarded,
  Adam at the same lr, Adam at the best lr of a grid (2^(-k/2), 4 … 0.0039, judged by its final loss
  on each seed), HyperAdam guarded with the default fallback lr (the optimizer's), and guarded
  with ``fallback_lr`` = Adam's best lr. Reported: the final loss (mean over seeds) and the
  fallbacks taken.
* **MNIST MLP** (784-100-10 sigmoid, batch 128: the kind of task the built-in was meta-trained
  on, where its step is good), through ``runtime.torch.LearnedOptimizer`` with and without
  ``guard=True`` on identical minibatches: fallbacks (should be 0), whether the trajectories
  stay bitwise equal, and the guard's cost, as the median over interleaved rounds of the ratio
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
    rows: dict[str, list[float]] = {}
    fallbacks: dict[str, list[int]] = {}
    conditions, best_lrs = [], []
    for seed in seeds:
        problem = logistic_problem(seed)
        conditions.append(problem[2])
        adam = {lr: run_adam(problem, steps, lr) for lr in ADAM_GRID}
        best_lr = min(adam, key=adam.get)
        best_lrs.append(best_lr)
        results = {
            "hyperadam (lr 0.005)": (run_learned(opt, problem, steps)[0], 0),
            "Adam (lr 0.005)": (run_adam(problem, steps, opt.default_lr), 0),
            "Adam (best lr of the grid)": (adam[best_lr], 0),
            "hyperadam + guard (fallback lr 0.005)": run_learned(opt, problem, steps, True),
            "hyperadam + guard (fallback lr = Adam's best)": run_learned(
                opt, problem, steps, gd.GuardConfig(fallback_lr=best_lr)
            ),
        }
        for name, (loss, count) in results.items():
            rows.setdefault(name, []).append(loss)
            fallbacks.setdefault(name, []).append(count)
    return {"condition": conditions, "best_adam_lr": best_lrs, "loss": rows, "fallbacks": fallbacks}


def mnist_mlp_table(opt, steps, rounds) -> dict:
    from meta_train.data.mnist import load_mnist

    data = load_mnist()
    images, labels = data.train_images, data.train_labels

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(784, 100), torch.nn.Sigmoid(), torch.nn.Linear(100, 10)
        )

    plain_model, guarded_model = model(), model()
    plain = LearnedOptimizer(plain_model.parameters(), opt)
    guarded = LearnedOptimizer(guarded_model.parameters(), opt, guard=True, guard_hook=None)
    generator = torch.Generator().manual_seed(1)
    seconds = {"plain": [], "guarded": []}
    cpu = {"plain": [], "guarded": []}
    losses = []
    for t in range(steps):
        index = torch.randint(0, images.shape[0], (128,), generator=generator)
        x, y = images[index], labels[index]
        order = [("plain", plain_model, plain), ("guarded", guarded_model, guarded)]
        for name, net, optimizer in order if t % 2 else order[::-1]:  # alternate who goes first
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

    def ratios(times: dict[str, list[float]]) -> list[float]:
        return [
            sum(times["guarded"][i : i + per_round]) / sum(times["plain"][i : i + per_round])
            for i in range(0, steps - per_round + 1, per_round)
        ]

    wall, cpu_ratios = ratios(seconds), ratios(cpu)
    same = all(
        torch.equal(a, b)
        for a, b in zip(plain_model.parameters(), guarded_model.parameters(), strict=True)
    )
    return {
        "steps": steps,
        "first_loss": losses[0],
        "last_loss": statistics.mean(losses[-20:]),
        "fallbacks": guarded.num_fallbacks,
        "bitwise_equal": same,
        "step_ms": {k: 1e3 * statistics.median(v) for k, v in seconds.items()},
        "cost_ratio_median": statistics.median(wall),
        "cost_ratio_range": [min(wall), max(wall)],
        "cpu_ratio_median": statistics.median(cpu_ratios),
        "cpu_ratio_range": [min(cpu_ratios), max(cpu_ratios)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, 400 MLP steps")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    opt = runtime.load("hyperadam", threads=1)
    print(describe_machine())
    seeds = (0, 1) if args.quick else (0, 1, 2, 3)
    convex = convex_table(opt, seeds, steps=1000)
    cond = statistics.median(convex["condition"])
    print(f"\nlogistic regression, condition number ~{cond:.1e}, 1000 steps, seeds {seeds}")
    print("Adam's best lr per seed: " + ", ".join(f"{lr:.4g}" for lr in convex["best_adam_lr"]))
    print(f"{'optimizer':<48} {'final loss (mean)':>18} {'per seed':>36} {'fallbacks':>10}")
    for name, values in convex["loss"].items():
        per_seed = " ".join(f"{v:.4f}" for v in values)
        count = sum(convex["fallbacks"][name])
        print(f"{name:<48} {statistics.mean(values):>18.4f} {per_seed:>36} {count:>10}")
    mlp = mnist_mlp_table(opt, steps=400 if args.quick else 1000, rounds=10)
    print(f"\nMNIST MLP 784-100-10 sigmoid, batch 128, {mlp['steps']} steps (runtime.torch)")
    print(
        f"loss {mlp['first_loss']:.3f} -> {mlp['last_loss']:.3f}; fallbacks {mlp['fallbacks']}; "
        f"guarded == unguarded bitwise: {mlp['bitwise_equal']}"
    )
    print(
        f"opt.step median ms: unguarded {mlp['step_ms']['plain']:.3f}, guarded "
        f"{mlp['step_ms']['guarded']:.3f}; guarded/unguarded per round: median "
        f"{mlp['cost_ratio_median']:.3f} (range {mlp['cost_ratio_range'][0]:.3f}–"
        f"{mlp['cost_ratio_range'][1]:.3f}) wall, {mlp['cpu_ratio_median']:.3f} (range "
        f"{mlp['cpu_ratio_range'][0]:.3f}–{mlp['cpu_ratio_range'][1]:.3f}) thread CPU time"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"convex": convex, "mlp": mlp, "machine": describe_machine()}, f, indent=1)


if __name__ == "__main__":
    main()
