"""``hyperadam evaluate``: one optimizer on one named test task, the paper's protocol (spec §4)."""

from __future__ import annotations

import argparse
import json

from ..errors import UsageError
from ..evaluate import evaluate
from ..resolve import resolve_optimizer
from ._threads import add_threads_flag, apply_threads


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="test task key, e.g. mnist-nn-sigmoid-100")
    parser.add_argument(
        "--optimizer",
        required=True,
        help="adam|sgd|momentum|rmsprop|adagrad|adadelta, a shipped learned optimizer "
        "(hyperadam|rnnprop|dm), or a path to an exported optimizer folder or θ file",
    )
    parser.add_argument("--runs", type=int, default=10, help="independent runs (default 10)")
    parser.add_argument("--steps", type=int, default=None, help="horizon T (default: the task's)")
    parser.add_argument("--seed", type=int, default=0, help="evaluation seed (default 0)")
    parser.add_argument("--lr", type=float, default=None, help="step size (default: per task)")
    parser.add_argument("--data-dir", default=None, help="folder with MNIST IDX / CIFAR-10 files")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_threads_flag(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..tasks.suite import TEST_TASKS, build_test_task

    apply_threads(args.threads)
    if args.task not in TEST_TASKS:
        raise UsageError(f"unknown task {args.task!r}; known: {', '.join(sorted(TEST_TASKS))}")
    spec = TEST_TASKS[args.task]
    if args.runs < 1:
        raise UsageError(f"--runs must be >= 1, got {args.runs}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    rule, lr = resolve_optimizer(args.optimizer, spec, lr=args.lr)
    try:
        task = build_test_task(args.task, data_dir=args.data_dir)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from error
    result = evaluate(
        task,
        rule,
        task_name=args.task,
        steps=args.steps or spec.horizon,
        runs=args.runs,
        seed=args.seed,
        lr=lr,
        with_test_metrics=spec.reports_test_accuracy,
    )
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    print(
        f"{result.task}  {result.optimizer} (lr {lr})  {result.runs} runs × {result.steps} steps  "
        f"final loss {result.final_loss_mean:.4f} ± {result.final_loss_std:.4f}"
        + (f"  ({result.diverged_runs} diverged)" if result.diverged_runs else "")
    )
    for name, values in result.test_metrics.items():
        mean = sum(values) / len(values)
        print(f"  test {name}: {mean:.4f}")
    return 0
