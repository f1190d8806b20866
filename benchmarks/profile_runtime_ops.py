"""Where one chunk of the runtime's step goes, op type by op type, and whether the Gemm layout
matters: onnxruntime's own profiler over the staged graphs of the built-in HyperAdam.

    .venv/bin/python benchmarks/profile_runtime_ops.py [--chunk 2048] [--runs 200]

Prints the kernel time per op type and graph (µs per chunk, ns per coordinate) at one thread,
then the LSTM-gate Gemm (+ sigmoid) of one chunk in the graphs' feature-major layout
([4J, 2J] × [2J, n]) against the coordinate-major one ([n, 2J] × [2J, 4J], the weights a constant
onnxruntime prepacks), and one elementwise Add over [J, n] for scale.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import numpy as np
import onnxruntime as ort
from machine import describe_machine  # benchmarks/machine.py, beside this script
from onnx import TensorProto, helper, numpy_helper

from runtime.session import session_options
from runtime.sources import resolve_source

J = 20


def stage_inputs(n: int, rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
    """Plausible mid-training inputs of the two staged graphs for one chunk of n coordinates."""

    def normal(shape, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    return {
        "state_stage": {
            "grad": normal(n, 1e-3),
            "h": normal((J, n), 0.1),
            "c": normal((J, n), 0.1),
            "grad_sum_sq": np.array(1e-3, np.float32),
        },
        "update_stage": {
            "w": normal(n, 0.1),
            "grad": normal(n, 1e-3),
            "h_new": normal((J, n), 0.1),
            "m": normal((J, n), 1e-3),
            "v": np.abs(normal((J, n), 1e-6)),
            "b": np.full((J, n), 0.5, np.float32),
            "gamma": np.full((J, n), 0.5, np.float32),
            "h_col_sum_sq": np.full(J, 10.0, np.float32),
            "m_col_sum_sq": np.full(J, 1e-3, np.float32),
            "lr": np.array(0.005, np.float32),
        },
    }


def op_profile(n: int, runs: int) -> None:
    folder = resolve_source("hyperadam")
    totals: collections.Counter = collections.Counter()
    nodes: collections.Counter = collections.Counter()
    for role, feed in stage_inputs(n, np.random.default_rng(0)).items():
        options = session_options(1)
        options.enable_profiling = True
        options.profile_file_prefix = f"/tmp/hyperadam-profile-{role}"
        session = ort.InferenceSession(
            str(folder / f"{role}.onnx"), options, providers=["CPUExecutionProvider"]
        )
        for _ in range(runs):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            for event in json.load(f):
                if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                    key = (role, event["args"]["op_name"])
                    totals[key] += event["dur"]
                    nodes[key] += 1
    total_us = sum(totals.values()) / runs
    print(f"kernel time per chunk of {n}: {total_us:.0f} µs = {total_us * 1e3 / n:.0f} ns/coord")
    for (role, op), us in totals.most_common():
        print(
            f"  {role:13s} {op:16s} {us / runs:7.1f} µs  {us / runs * 1e3 / n:6.1f} ns/coord  "
            f"({nodes[role, op] // runs} nodes)"
        )


def _session(nodes, inputs, outputs, initializers) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "probe", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return ort.InferenceSession(
        model.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"]
    )


def _seconds(session: ort.InferenceSession, feed: dict, reps: int = 2000) -> float:
    for _ in range(50):
        session.run(None, feed)
    start = time.perf_counter()
    for _ in range(reps):
        session.run(None, feed)
    return (time.perf_counter() - start) / reps


def layout_probe(n: int) -> None:
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((4 * J, 2 * J)).astype(np.float32)
    flops = 2 * n * 2 * J * 4 * J
    value = helper.make_tensor_value_info
    gate = helper.make_node("Sigmoid", ["z"], ["y"])
    feature_major = _session(
        [helper.make_node("Gemm", ["W", "X", "b"], ["z"]), gate],
        [value("X", TensorProto.FLOAT, [2 * J, n])],
        [value("y", TensorProto.FLOAT, [4 * J, n])],
        [
            numpy_helper.from_array(weights, "W"),
            numpy_helper.from_array(np.zeros((4 * J, 1), np.float32), "b"),
        ],
    )
    coordinate_major = _session(
        [helper.make_node("Gemm", ["X", "W"], ["z"]), gate],
        [value("X", TensorProto.FLOAT, [n, 2 * J])],
        [value("y", TensorProto.FLOAT, [n, 4 * J])],
        [numpy_helper.from_array(np.ascontiguousarray(weights.T), "W")],
    )
    add = _session(
        [helper.make_node("Add", ["A", "B"], ["C"])],
        [value("A", TensorProto.FLOAT, [J, n]), value("B", TensorProto.FLOAT, [J, n])],
        [value("C", TensorProto.FLOAT, [J, n])],
        [],
    )
    x = rng.standard_normal((2 * J, n)).astype(np.float32)
    t_feature = _seconds(feature_major, {"X": x})
    t_coordinate = _seconds(coordinate_major, {"X": np.ascontiguousarray(x.T)})
    a = rng.standard_normal((J, n)).astype(np.float32)
    t_add = _seconds(add, {"A": a, "B": a})
    print(f"\nLSTM-gate Gemm + sigmoid for one chunk ({flops / 1e6:.1f} MFLOP), one thread:")
    print(
        f"  feature-major    [4J,2J] x [2J,n]: {t_feature * 1e6:6.1f} µs, "
        f"{flops / t_feature / 1e9:5.1f} GFLOP/s"
    )
    print(
        f"  coordinate-major [n,2J] x [2J,4J]: {t_coordinate * 1e6:6.1f} µs, "
        f"{flops / t_coordinate / 1e9:5.1f} GFLOP/s"
    )
    print(
        f"one Add over [J, n]: {t_add * 1e6:.1f} µs with the call ({t_add * 1e9 / (J * n):.3f} "
        "ns per element)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    print(f"machine: {describe_machine()}")
    op_profile(args.chunk, args.runs)
    layout_probe(args.chunk)


if __name__ == "__main__":
    main()
