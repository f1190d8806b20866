"""Seconds per HyperAdam step through the runtime vs torch, and the runtime's share of the roofline.

At p = 10⁴, 10⁵ and 10⁶ coordinates (one float32 array), in one process and in interleaved rounds
(the order rotates each round, so a changing background load hits every contender alike):

* ``runtime chunked``: ``runtime.load(folder, threads=T).bind([w])`` with the default chunk size
  (the staged graphs, chunks spread over T Python threads, one onnxruntime thread each);
* ``runtime fused``: the fused graph over the whole model (``chunk_size=p``), with T onnxruntime
  intra-op threads instead (one chunk leaves nothing to spread);
* ``torch reference``: ``meta_train.optimizers.hyperadam.hyperadam_step``, eager, the same math;
* ``torch.compile reference``: the same function through ``torch.compile`` (inductor, C++ CPU
  kernels; compiled once per size in the warm-up, not timed): what a PyTorch user would reach
  for instead of the runtime (``--no-compile`` leaves it out);
* ``torch fast kernel``: ``hyperadam_step_fast``, meta-training's fused C++ kernel (a column for
  what a hand-fused kernel reaches on this machine);
* ``torch Adam``: ``torch.optim.Adam`` (default implementation);
* ``matmul torch`` / ``matmul numpy``: one square fp32 matmul (``torch.mm``: oneDNN/MKL;
  ``numpy.matmul``: OpenBLAS) with the FLOP count of one runtime step at that p, the roofline
  the runtime's FLOP/s is compared with (torch's is the faster one, the stricter roofline).

Every contender uses the same T threads (default: all CPUs this process may use). Ratios are
taken per round, then their median and range over rounds are reported; compare those, not
absolute seconds, on a shared machine. Each is given for wall time and for the process's CPU
time (all threads), which counts work done and not time spent waiting for a core that other
jobs hold (torch's OpenMP threads may also spin, which counts as CPU time). FLOPs per
coordinate are counted from the exported graph (``graph_flops``). Peak memory is measured in
subprocesses: the growth of the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``)
over two steady-state steps of one contender.

    .venv/bin/python benchmarks/bench_runtime.py [--quick] [--rounds 5] [--json out.json]
        [--no-compile] [--transformer-only]

After the sizes, the **optimizer-step share of a training iteration** on a small transformer
(``transformer_step_share``: a 2-layer encoder, d_model 128, vocabulary 1 000, batch 16 × 64
tokens, ~0.6 M parameters): seconds of forward + backward and of ``opt.step`` for
``runtime.torch.LearnedOptimizer``, the eager reference as a ``torch.optim.Optimizer``
(``meta_train.optimizers.hyperadam.HyperAdam``) and ``torch.optim.AdamW``, and the step's share
of the iteration. ``--transformer-only`` runs just that.

``--subnormals`` instead times one step at p = 117,434 from a normal state against one from a
stalled network's state (moments in the subnormal range, zero gradient), chunked and fused: what
the runtime's flush-to-zero (``runtime/subnormals.py``) saves.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from machine import describe_machine  # benchmarks/machine.py, beside this script

import runtime
from export import export_optimizer
from meta_train.optimizers.hyperadam import DEFAULT_LR, HyperAdam, hyperadam_step
from runtime import manifest as mf
from runtime.plan import DEFAULT_CHUNK_SIZE
from runtime.sources import resolve_source
from runtime.theta import load_theta

SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (10_000, 100_000)
# FLOPs of an elementwise node per output element; transcendentals count as one, as in the
# roofline convention; data movement (Concat, Split, Cast, Unsqueeze) counts zero.
ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Min", "Max", "Sqrt", "Reciprocal", "Sigmoid", "Tanh", "Exp",
    "Neg", "Abs", "Relu", "Elu",
}  # fmt: skip


def _node_flops(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    def numel(name: str) -> int:
        return math.prod(shapes[name])

    if node.op_type in ("Gemm", "MatMul"):
        a, b = shapes[node.input[0]], shapes[node.input[1]]
        if node.op_type == "Gemm" and any(x.name == "transA" and x.i for x in node.attribute):
            a = a[::-1]
        flops = 2 * a[0] * a[1] * b[-1]
        return flops + (numel(node.output[0]) if len(node.input) > 2 else 0)
    if node.op_type in ELEMENTWISE:
        return numel(node.output[0])
    if node.op_type in ("ReduceSum", "ReduceSumSquare"):
        return numel(node.input[0]) * (2 if node.op_type == "ReduceSumSquare" else 1)
    return 0


def graph_flops(model: onnx.ModelProto, n: int) -> int:
    """FLOPs of one call of ``model`` with the coordinate axis fixed to ``n``."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in [*model.graph.input, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == mf.COORDS:
                dim.dim_value = n
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes: dict[str, list[int]] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        shapes[value.name] = [d.dim_value for d in value.type.tensor_type.shape.dim]
    for tensor in inferred.graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    return sum(_node_flops(node, shapes) for node in inferred.graph.node)


def flops_per_coordinate(folder: Path, role: str = mf.FUSED) -> float:
    """The graph's FLOPs per coordinate: the O(n) part, without the O(J²) weight folding."""
    model = onnx.load(str(folder / f"{role}.onnx"))
    return (graph_flops(model, 20_000) - graph_flops(model, 10_000)) / 10_000


def export_current_graphs(out: Path) -> Path:
    """The built-in θ exported by this checkout's exporter: measures the graphs as built now."""
    artifact = load_theta(resolve_source("hyperadam") / mf.THETA_FILE)
    folder = out / "hyperadam"
    export_optimizer("hyperadam", artifact.theta, folder, parity_sizes=(2,), trajectory_steps=3)
    return folder


def io_bytes_per_coordinate(roles: tuple[str, ...]) -> int:
    """Bytes per coordinate the graphs of ``roles`` read and write (per-coordinate tensors only):
    the DRAM traffic of a step whose temporaries stay in cache."""
    total = 0
    for role in roles:
        spec = mf.hyperadam_graphs(20)[role]
        for tensor in (*spec.inputs, *spec.outputs):
            if mf.COORDS in tensor.shape:
                total += 4 * math.prod(d for d in tensor.shape if d != mf.COORDS)
    return total


def copy_bandwidth_gbps(nbytes: int = 512 * 2**20, repeats: int = 3) -> float:
    """DRAM bandwidth of one core: bytes read + written per second by a large ``np.copyto``."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = math.inf
    for _ in range(repeats + 1):  # the first copy maps the pages of dst
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best / 1e9


# -- contenders: each is a () -> None that applies one step --------------------------------------


def _problem(p: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(p).astype(np.float32)
    g = (rng.standard_normal(p) * 10.0 ** rng.uniform(-4, -1, p)).astype(np.float32)
    return w, g


def make_contenders(
    folder: Path, p: int, threads: int, with_fast: bool, with_compile: bool = False
) -> dict[str, Callable[[], None]]:
    w0, g = _problem(p)
    chunked_opt = runtime.load(folder, threads=threads, intra_op_threads=1)
    fused_opt = runtime.load(folder, threads=1, intra_op_threads=threads)
    w_chunked, w_fused = w0.copy(), w0.copy()
    chunked = chunked_opt.bind([w_chunked])
    fused = fused_opt.bind([w_fused], chunk_size=p)
    assert fused.uses_fused_graph and (p <= DEFAULT_CHUNK_SIZE or not chunked.uses_fused_graph)

    reference = HyperAdam(20)
    theta = {k: torch.from_numpy(v) for k, v in load_theta(folder / mf.THETA_FILE).theta.items()}
    grad_t = torch.from_numpy(g.copy())
    w_ref = torch.from_numpy(w0.copy())
    ref_state = [reference.init_state(p)]

    def ref_step(step: Callable = hyperadam_step, state: list = ref_state) -> None:
        with torch.no_grad():
            delta, state[0] = step(theta, grad_t, state[0], lr=DEFAULT_LR)
            w_ref.add_(delta)

    w_adam = torch.from_numpy(w0.copy()).requires_grad_(True)
    w_adam.grad = grad_t.clone()
    adam = torch.optim.Adam([w_adam], lr=1e-3)

    contenders = {
        "runtime chunked": lambda: chunked.step([g]),
        "runtime fused": lambda: fused.step([g]),
        "torch reference": ref_step,
        "torch Adam": adam.step,
    }
    if with_fast:
        from meta_train.optimizers.hyperadam_fast import hyperadam_step_fast

        fast_state = [reference.init_state(p)]
        contenders["torch fast kernel"] = lambda: ref_step(hyperadam_step_fast, fast_state)
    if with_compile:
        compiled = torch.compile(hyperadam_step, dynamic=False)
        compiled_state = [reference.init_state(p)]
        contenders["torch.compile reference"] = lambda: ref_step(compiled, compiled_state)
    return contenders


def make_matmuls(flops: float) -> tuple[dict[str, Callable[[], None]], float]:
    """Square fp32 matmuls (torch's and numpy's BLAS) of about ``flops`` FLOPs, and the count."""
    n = max(16, round((flops / 2) ** (1 / 3)))
    a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    a_np, b_np, out_np = a.numpy(), b.numpy(), np.empty((n, n), np.float32)
    return {
        "matmul torch": lambda: torch.mm(a, b, out=out),
        "matmul numpy": lambda: np.matmul(a_np, b_np, out=out_np),
    }, 2.0 * n**3


def time_rounds(
    contenders: dict[str, Callable[[], None]], rounds: int, steps: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds per call of each contender, one entry per round.

    The order rotates per round. CPU time is the process's (all threads): on a machine where
    other jobs take most of the cores it measures the work done, which wall time does not.
    """
    for fn in contenders.values():  # warm-up: sessions, allocators, kernel caches
        fn()
    names = list(contenders)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = contenders[name]
            # torch's OpenMP threads spin for a while after a parallel region; let them sleep
            # so that they neither take a core from nor add CPU time to the next contender.
            time.sleep(0.05)
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                fn()
            wall[name].append((time.perf_counter() - start) / steps)
            cpu[name].append((time.process_time() - start_cpu) / steps)
    return wall, cpu


# -- peak memory in subprocesses -----------------------------------------------------------------

MEMORY_SCRIPT = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])
sys.path.insert(0, str(Path(sys.argv[4]) / "benchmarks"))
import torch
torch.set_num_threads(int(sys.argv[3]))
from benchmarks.bench_runtime import first_touch_bytes, make_contenders

def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

folder, p, threads, name = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[5]
step = make_contenders(folder, p, threads, name == "torch fast kernel")[name]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS mark: what follows is the stepping alone
before = kib("VmRSS")
step()
step()
grown = (kib("VmHWM") - before) * 1024 - first_touch_bytes(folder, name, p)
print(json.dumps({"peak_growth_mib": grown / 2**20}))
"""


def first_touch_bytes(folder: Path, name: str, p: int) -> int:
    """State that ``name``'s first step touches for the first time (not a temporary).

    The runtime's state is ``np.zeros`` (pages mapped on first write) and Adam creates its
    moments in its first step; the torch references' states exist before (and each of their
    steps allocates a whole new state, which is part of their peak, as for any functional step).
    """
    if name.startswith("runtime"):
        return runtime.load(folder, threads=1).bind([np.zeros(p, np.float32)]).state_nbytes
    return 8 * p if name == "torch Adam" else 0


def peak_memory_mib(folder: Path, p: int, threads: int, name: str) -> float:
    """Peak RSS growth (MiB) over the first two steps of one contender, in a fresh process,
    less the state those steps touch first (``first_touch_bytes``): the step's temporaries.

    ``make_contenders`` builds every contender's state (so the baseline RSS is the same for all);
    only ``name`` steps.
    """
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(folder), str(p), str(threads), root, name],
        capture_output=True,
        text=True,
        timeout=1200,
        check=True,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mib"])


# -- report ------------------------------------------------------------------------------------


def time_subnormal_states(folder: Path, threads: int, p: int = 117_434) -> dict[str, float]:
    """One runtime step from a normal state vs from a stalled network's subnormal state (zero
    gradient), chunked and fused, interleaved; medians of 5. The state is reloaded before every
    step, outside the timing."""
    w0, g = _problem(p)
    opts = {
        "chunked": runtime.load(folder, threads=threads, intra_op_threads=1),
        "fused": runtime.load(folder, threads=1, intra_op_threads=threads),
    }
    steppers = {
        "chunked": opts["chunked"].bind([w0.copy()]),
        "fused": opts["fused"].bind([w0.copy()], chunk_size=p),
    }
    template = steppers["chunked"].state_dict()

    def state_filled(value: float) -> dict:
        state = {k: np.full_like(v, value) for k, v in template["state"].items()}
        return {**template, "num_steps": 1, "state": state}

    cases = {"normal": (state_filled(1e-3), g), "subnormal": (state_filled(1e-39), 0 * g)}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(6):  # the first round warms up
        for name, stepper in steppers.items():
            for case, (state, grad) in cases.items():
                stepper.load_state_dict(state)
                start = time.perf_counter()
                stepper.step([grad])
                times.setdefault((name, case), []).append(time.perf_counter() - start)
    print(f"\none runtime step at p = {p:,}, {threads} threads (median of 5):")
    out = {}
    for name in steppers:
        normal = statistics.median(times[name, "normal"][1:])
        sub = statistics.median(times[name, "subnormal"][1:])
        out[f"{name} normal"], out[f"{name} subnormal"] = normal, sub
        print(
            f"  {name:>8}: normal state {normal:.4f} s, subnormal state {sub:.4f} s "
            f"(x{sub / normal:.2f})"
        )
    for opt in opts.values():
        opt.close()
    return out


class ReferenceOptimizer:
    """The eager reference step as a user would wrap it: every gradient concatenated into one
    vector (HyperAdam's step is global), one ``hyperadam_step``, the update scattered back."""

    def __init__(self, params: list[torch.Tensor], theta: dict[str, torch.Tensor]) -> None:
        self.params, self.theta = params, theta
        self.state = HyperAdam(20).init_state(sum(p.numel() for p in params))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        grad = torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                for p in self.params
            ]
        )
        delta, self.state = hyperadam_step(self.theta, grad, self.state, lr=DEFAULT_LR)
        start = 0
        for p in self.params:
            p.add_(delta[start : start + p.numel()].view_as(p))
            start += p.numel()


def transformer_step_share(folder: Path, threads: int, iterations: int = 10) -> dict:
    """Seconds of forward + backward and of ``opt.step`` per training iteration of a small
    transformer, per optimizer (medians over ``iterations`` after 2 warm-up iterations; the
    optimizers take turns within each iteration, on the same batch, each on its own copy)."""
    torch.manual_seed(0)
    vocab, d_model, batch, tokens = 1000, 128, 16, 64

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, d_model)
            layer = torch.nn.TransformerEncoderLayer(d_model, 4, 512, batch_first=True)
            self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = torch.nn.Linear(d_model, vocab)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(self.embed(x)))

    template = Model()
    count = sum(p.numel() for p in template.parameters())
    theta = {k: torch.from_numpy(v) for k, v in load_theta(folder / mf.THETA_FILE).theta.items()}
    from runtime.torch import LearnedOptimizer

    makers = {
        "runtime (LearnedOptimizer)": lambda ps: LearnedOptimizer(
            ps, runtime.load(folder, threads=threads)
        ),
        "torch reference (eager)": lambda ps: ReferenceOptimizer(ps, theta),
        "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    }
    models, optimizers = {}, {}
    for name, make in makers.items():
        models[name] = Model()
        models[name].load_state_dict(template.state_dict())
        optimizers[name] = make(list(models[name].parameters()))
    generator = torch.Generator().manual_seed(0)
    keys = ("fwd+bwd", "step", "fwd+bwd cpu", "step cpu")
    times: dict[str, dict[str, list[float]]] = {n: {k: [] for k in keys} for n in makers}
    for it in range(iterations + 2):
        x = torch.randint(0, vocab, (batch, tokens), generator=generator)
        y = torch.randint(0, vocab, (batch, tokens), generator=generator)
        names = list(makers)
        for name in names[it % len(names) :] + names[: it % len(names)]:
            model, optimizer = models[name], optimizers[name]
            time.sleep(0.02)
            start, start_cpu = time.perf_counter(), time.process_time()
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
            middle, middle_cpu = time.perf_counter(), time.process_time()
            optimizer.step()
            end, end_cpu = time.perf_counter(), time.process_time()
            if it >= 2:
                times[name]["fwd+bwd"].append(middle - start)
                times[name]["step"].append(end - middle)
                times[name]["fwd+bwd cpu"].append(middle_cpu - start_cpu)
                times[name]["step cpu"].append(end_cpu - middle_cpu)
    # forward + backward is the same work whichever optimizer follows: one median over all
    fwd = statistics.median(v for t in times.values() for v in t["fwd+bwd"])
    fwd_cpu = statistics.median(v for t in times.values() for v in t["fwd+bwd cpu"])
    print(
        f"\ntransformer (2 layers, d_model {d_model}, {count:,} parameters, batch {batch} x "
        f"{tokens} tokens), {threads} threads, medians of {iterations} iterations; load "
        f"{os.getloadavg()[0]:.1f}; forward+backward {fwd:.4f} s wall, {fwd_cpu:.4f} s CPU:"
    )
    out: dict = {"parameters": count, "fwd_bwd_s": fwd, "fwd_bwd_cpu_s": fwd_cpu}
    for name, t in times.items():
        step, step_cpu = statistics.median(t["step"]), statistics.median(t["step cpu"])
        out[name] = {
            "step_s": step,
            "step_cpu_s": step_cpu,
            "step_share": step / (fwd + step),
            "step_share_cpu": step_cpu / (fwd_cpu + step_cpu),
        }
        print(
            f"  {name:>28}: opt.step {step:.4f} s wall, {step_cpu:.4f} s CPU; share of the "
            f"iteration {step / (fwd + step):.1%} wall, {step_cpu / (fwd_cpu + step_cpu):.1%} CPU"
        )
    return out


def _spread(values: list[float], fmt: str) -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–" + (
        f"{fmt.format(max(values))})"
    )


def _per_round(times: dict[str, list[float]], a: str, b: str) -> list[float]:
    """times[a] / times[b], round by round."""
    return [x / y for x, y in zip(times[a], times[b], strict=True)]


# A benchmark's command-line driver, read top to bottom: one branch per mode flag and per
# optional column; split up, each piece would need the parsed arguments and the folder anyway.
def main() -> None:  # noqa: C901
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="p = 1e4, 1e5; 2 rounds")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="default: all usable CPUs")
    parser.add_argument("--no-fast", action="store_true", help="skip the C++ fast-kernel column")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument(
        "--transformer-only", action="store_true", help="only the transformer step share"
    )
    parser.add_argument("--folder", type=Path, default=None, help="an exported folder to time")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--subnormals",
        action="store_true",
        help="only time steps from a normal vs a subnormal state at p = 117,434",
    )
    args = parser.parse_args()
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    rounds = args.rounds or (2 if args.quick else 5)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    with_fast = not args.no_fast

    tmp = tempfile.TemporaryDirectory(prefix="bench-runtime-")
    folder = args.folder or export_current_graphs(Path(tmp.name))
    flops = {role: flops_per_coordinate(folder, role) for role in mf.hyperadam_graphs(20)}
    staged = flops[mf.STATE_STAGE] + flops[mf.UPDATE_STAGE]
    print(f"machine: {describe_machine()}")
    print(
        f"threads = {threads} for every contender; load average {os.getloadavg()[0]:.1f} at "
        f"start; {folder}\nFLOPs per coordinate counted from the graphs: fused "
        f"{flops[mf.FUSED]:.0f}, state + update stage {staged:.0f}"
    )
    if args.subnormals:
        time_subnormal_states(folder, threads)
        return
    if args.transformer_only:
        share = transformer_step_share(folder, threads, iterations=5 if args.quick else 10)
        if args.json:
            args.json.write_text(json.dumps({"threads": threads, "transformer": share}, indent=2))
        return
    staged_bytes = io_bytes_per_coordinate((mf.STATE_STAGE, mf.UPDATE_STAGE))
    bandwidth = copy_bandwidth_gbps()
    print(
        f"graph I/O per coordinate: staged {staged_bytes} B, fused "
        f"{io_bytes_per_coordinate((mf.FUSED,))} B; one core copies {bandwidth:.1f} GB/s "
        f"(np.copyto of 512 MiB, best of 3), so the staged step's DRAM traffic alone needs "
        f"{staged_bytes * 1e6 / bandwidth / 1e9:.3f} s per 10⁶ coordinates on one core"
    )
    results: dict = {
        "threads": threads,
        "flops_per_coordinate": flops,
        "io_bytes_per_coordinate": staged_bytes,
        "copy_bandwidth_gbps": bandwidth,
        "sizes": {},
    }
    for p in sizes:
        contenders = make_contenders(folder, p, threads, with_fast, not args.no_compile)
        step_flops = flops[mf.FUSED] * p
        matmuls, mm_flops = make_matmuls(step_flops)
        contenders.update(matmuls)
        steps = max(1, 30_000 // p) if p < 1_000_000 else 1
        wall, cpu = time_rounds(contenders, rounds, steps)
        del contenders
        results["sizes"][p] = row = {"wall_s": wall, "cpu_s": cpu, "steps_per_round": steps}
        print(f"\np = {p:,}: {rounds} rounds of {steps} step(s); load {os.getloadavg()[0]:.1f}")
        for name in wall:
            ratio = [r / t for r, t in zip(wall["torch reference"], wall[name], strict=True)]
            print(
                f"  {name:>18}: wall {_spread(wall[name], '{:.4f}')} s, CPU "
                f"{_spread(cpu[name], '{:.4f}')} s; reference / this (wall) "
                f"{_spread(ratio, '{:.2f}')}"
            )
        row["ratios"] = {}
        for clock, times in (("wall", wall), ("cpu", cpu)):
            per_round = {
                "chunked / fused": _per_round(times, "runtime chunked", "runtime fused"),
                "reference / chunked": _per_round(times, "torch reference", "runtime chunked"),
                "reference / fused": _per_round(times, "torch reference", "runtime fused"),
                **(
                    {
                        "torch.compile / chunked": _per_round(
                            times, "torch.compile reference", "runtime chunked"
                        ),
                        "torch.compile / fused": _per_round(
                            times, "torch.compile reference", "runtime fused"
                        ),
                    }
                    if "torch.compile reference" in times
                    else {}
                ),
                "chunked GFLOP/s": [step_flops / t / 1e9 for t in times["runtime chunked"]],
                "matmul torch GFLOP/s": [mm_flops / t / 1e9 for t in times["matmul torch"]],
                "matmul numpy GFLOP/s": [mm_flops / t / 1e9 for t in times["matmul numpy"]],
            }
            # Share of the roofline: (step FLOPs / runtime s) / (matmul FLOPs / matmul s).
            for kind in ("chunked", "fused"):
                for mm in ("torch", "numpy"):
                    per_round[f"{kind} / roofline ({mm})"] = [
                        ratio * step_flops / mm_flops
                        for ratio in _per_round(times, f"matmul {mm}", f"runtime {kind}")
                    ]
            row["ratios"][clock] = per_round
            print(f"  per-round ratios, {clock} clock:")
            for key, values in per_round.items():
                print(f"    {key:>26}: {_spread(values, '{:.3f}')}")

    chunked_state = runtime.load(folder, threads=1).bind([np.zeros(1000, np.float32)]).state_nbytes
    adam_w = torch.zeros(1000, requires_grad=True)
    adam_w.grad = torch.zeros(1000)
    adam = torch.optim.Adam([adam_w])
    adam.step()
    adam_bytes = sum(
        t.numel() * t.element_size() for t in adam.state[adam_w].values() if t.numel() > 1
    )
    results["state_bytes_per_parameter"] = {
        "runtime": chunked_state / 1000,
        "torch Adam": adam_bytes / 1000,
    }
    print(
        f"\noptimizer state per parameter: runtime {chunked_state / 1000:.0f} B, torch Adam "
        f"{adam_bytes / 1000:.0f} B (plus O(J) carried sums and Adam's step counter)"
    )
    if not args.no_memory:
        p = max(sizes)
        names = ["runtime chunked", "runtime fused", "torch reference", "torch Adam"]
        names += ["torch fast kernel"] if with_fast else []
        memory = {name: peak_memory_mib(folder, p, threads, name) for name in names}
        results["peak_temporary_mib"] = {"p": p, **memory}
        print(f"peak RSS growth over the first two steps at p = {p:,}, beyond the state:")
        for name, mib in memory.items():
            print(f"  {name:>18}: {mib:8.1f} MiB  ({mib * 2**20 / p:.0f} B per parameter)")
    results["transformer"] = transformer_step_share(folder, threads, 5 if args.quick else 10)
    print(f"\nload average {os.getloadavg()[0]:.1f} at end")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
