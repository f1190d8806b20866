"""Every GPU path in one run: the runtime's CUDA provider, torch CUDA tensors, CuPy, stream sync,
the training-loop paths of ``runtime.torch`` (param groups, weight decay, bf16 masters, the
guard's restore and Adam fallback) on CUDA tensors, and meta-training on a GPU worker
(``meta_train/batched.py``).

    python benchmarks/gpu_check.py [FOLDER]      # default: the built-in hyperadam

Each check compares the CUDA result with the CPU runtime on the same inputs (fp32 tolerance:
the CUDA kernels reassociate sums) and prints one line; a missing prerequisite (no CUDA device,
no CUDA provider in onnxruntime, no CuPy) prints SKIP with the reason. Exit status 1 if any check
fails. ``tests/runtime/test_gpu.py`` runs the same checks under pytest (marked ``gpu``).

The meta-training check times what a GPU worker does per call (``META_BATCH`` instances of the
paper's MNIST recipe, one truncation of 20 inner steps, batched HyperAdam reference step on
CUDA) against one CPU worker (one instance, the fused CPU step, one thread), and compares the
GPU's meta-gradients with the CPU's batched path on the same instances (fp32 round-off).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import runtime  # noqa: E402

SHAPES = [(300, 20), (20,), (20, 10), (10,), (5000,)]
STEPS = 5


class Skip(Exception):
    """A prerequisite of a check is missing (the message says which)."""


def _inputs(seed: int = 0) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    grads = [[(rng.normal(size=s) * 0.1).astype(np.float32) for s in SHAPES] for _ in range(STEPS)]
    return params, grads


def _cpu_reference(folder: Path, chunk_size: int | None) -> tuple[list[np.ndarray], dict]:
    params, grads = _inputs()
    stepper = runtime.load(folder, threads=1).bind(params, chunk_size=chunk_size)
    for g in grads:
        stepper.step(g)
    return params, stepper.state_dict()


def _close(got: list[np.ndarray], expected: list[np.ndarray], what: str) -> None:
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        if not np.allclose(a, b, rtol=1e-4, atol=1e-5):
            raise AssertionError(f"{what}: array {i} differs by {np.abs(a - b).max():.3e}")


def _torch_cuda():
    try:
        import torch
    except ImportError as err:
        raise Skip("torch is not installed") from err
    if not torch.cuda.is_available():
        raise Skip("torch sees no CUDA device")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Skip(f"onnxruntime has no CUDA provider ({ort.get_available_providers()})")
    return torch


def check_torch_cuda(folder: Path, chunk_size: int | None = None) -> str:
    """torch CUDA tensors, in place, on the CUDA provider; state_dict round trip."""
    torch = _torch_cuda()
    params, grads = _inputs()
    cuda = [torch.from_numpy(p).cuda() for p in params]
    pointers = [p.data_ptr() for p in cuda]
    opt = runtime.load(folder, threads=1)
    stepper = opt.bind(cuda, chunk_size=chunk_size)
    used = opt.providers_for(stepper.device)
    if used[0] != "CUDAExecutionProvider":
        raise AssertionError(f"CUDA arrays ran on {used}")
    start = time.perf_counter()
    for g in grads:
        stepper.step([torch.from_numpy(x).cuda() for x in g])
    elapsed = (time.perf_counter() - start) / STEPS
    expected, state = _cpu_reference(folder, chunk_size)
    _close([p.cpu().numpy() for p in cuda], expected, "torch CUDA parameters")
    _close([stepper.state_dict()["state"]["h"]], [state["state"]["h"]], "torch CUDA state h")
    if [p.data_ptr() for p in cuda] != pointers:
        raise AssertionError("CUDA parameters were not updated in place")
    other = opt.bind([torch.zeros_like(p) for p in cuda], chunk_size=chunk_size)
    other.load_state_dict(stepper.state_dict())  # host → device copy of every field
    _close([other.state_dict()["state"]["m"]], [stepper.state_dict()["state"]["m"]], "round trip")
    return (
        f"torch CUDA chunk_size={chunk_size} chunks={stepper.num_chunks}: ok, {used[0]}, "
        f"binding {stepper._backend.binding}, {elapsed * 1e3:.2f} ms/step"
    )


def check_stream_sync(folder: Path) -> str:
    """Gradients written by a kernel still queued on a side stream are seen whole."""
    torch = _torch_cuda()
    params, grads = _inputs()
    cuda = [torch.from_numpy(p).cuda() for p in params]
    stepper = runtime.load(folder, threads=1).bind(cuda)
    side = torch.cuda.Stream()
    for g in grads:
        sources = [torch.from_numpy(x).pin_memory() for x in g]
        with torch.cuda.stream(side):
            big = torch.randn(4096, 4096, device="cuda")
            for _ in range(4):  # keep the stream busy so the copies land late
                big = big @ big / 64.0
            device_grads = [s.cuda(non_blocking=True) for s in sources]
            stepper.step(device_grads)  # must wait for `side`, the producer's current stream
    expected, _ = _cpu_reference(folder, None)
    _close([p.cpu().numpy() for p in cuda], expected, "after side-stream gradients")
    return "stream sync: ok"


def check_cupy(folder: Path) -> str:
    """CuPy arrays, in place, on the CUDA provider."""
    try:
        import cupy
    except ImportError as err:
        raise Skip("cupy is not installed") from err
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Skip("onnxruntime has no CUDA provider")
    params, grads = _inputs()
    arrays = [cupy.asarray(p) for p in params]
    stepper = runtime.load(folder, threads=1).bind(arrays, chunk_size=1024)
    for g in grads:
        stepper.step([cupy.asarray(x) for x in g])
    expected, _ = _cpu_reference(folder, 1024)
    _close([a.get() for a in arrays], expected, "CuPy parameters")
    return f"cupy chunks={stepper.num_chunks}: ok, binding {stepper._backend.binding}"


def check_refusals(folder: Path) -> str:
    """A CPU gradient for CUDA parameters is refused before anything changes."""
    torch = _torch_cuda()
    params, grads = _inputs()
    cuda = [torch.from_numpy(p).cuda() for p in params]
    stepper = runtime.load(folder, threads=1).bind(cuda)
    try:
        stepper.step([torch.from_numpy(g) for g in grads[0]])
    except ValueError as err:
        if "is on cpu but parameter 0 is on cuda:0" not in str(err):
            raise AssertionError(f"unexpected message: {err}") from err
    else:
        raise AssertionError("a CPU gradient for a CUDA parameter was accepted")
    _close([p.cpu().numpy() for p in cuda], params, "parameters after a refused step")
    return "refusals: ok"


META_BATCH = 16  # instances per GPU-worker call in the meta-training check
META_AGREE = 2  # of which the first ones are recomputed on the CPU and compared
META_DEVICE = "cuda"  # a dry run of the check's code on a machine without a GPU may set "cpu"


def check_meta_training(folder: Path) -> str:
    """A GPU worker's batched meta-update: throughput against one CPU worker, CPU agreement."""
    del folder  # meta-training needs no exported optimizer
    try:
        import torch
    except ImportError as err:
        raise Skip("torch is not installed") from err
    if not torch.cuda.is_available():
        raise Skip("torch sees no CUDA device")
    from meta_train.batched import slots_work_batched, to_device
    from meta_train.run_config import build_config
    from meta_train.training import init_theta_flat, slot_work

    torch.set_num_threads(1)  # a CPU worker's setting
    fused = build_config({"validation": {"every": 0}})
    batched = build_config({"validation": {"every": 0}, "device": "cuda",
                            "implementation": "reference"})
    family = fused.make_family()
    theta = init_theta_flat(fused.make_optimizer(), 0)
    unroll = fused.unroll

    def timed(run: Callable[[], object], repeats: int = 3) -> float:
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    cpu_model = fused.make_optimizer()
    first = slot_work(cpu_model, family, unroll, theta, 0, 0, 0, None)
    cpu_s = timed(lambda: slot_work(cpu_model, family, unroll, theta, 0, 0, 1, first.trajectory))

    gpu_model = batched.make_optimizer()
    slots = list(range(META_BATCH))
    starts = slots_work_batched(gpu_model, family, unroll, theta, 0, slots, 0,
                                [None] * META_BATCH, META_DEVICE)
    trajectories = [out.trajectory for out in starts]
    outs: list = []
    gpu_s = timed(lambda: outs.__setitem__(slice(None), slots_work_batched(
        gpu_model, family, unroll, theta, 0, slots, 1, trajectories, META_DEVICE)))

    cpu_outs = slots_work_batched(
        gpu_model, family, unroll, theta, 0, slots[:META_AGREE], 1,
        [to_device(t, "cpu") for t in trajectories[:META_AGREE]], "cpu",
    )
    worst = 0.0
    for gpu, cpu in zip(outs[:META_AGREE], cpu_outs, strict=True):
        g, c = gpu.meta_grad.cpu(), cpu.meta_grad
        worst = max(worst, float((g - c).abs().max() / c.abs().max()))
    if not worst <= 1e-3:
        raise AssertionError(f"GPU meta-gradients differ from the CPU's by {worst:.2e} (relative)")
    ratio = (META_BATCH / gpu_s) / (1 / cpu_s)
    return (
        f"meta-training: ok, {torch.cuda.get_device_name()}: {META_BATCH} instances in "
        f"{gpu_s:.3f} s per truncation ({META_BATCH / gpu_s:.1f} /s) against one CPU worker's "
        f"{cpu_s:.3f} s (fused, 1 thread): ×{ratio:.1f}; meta-gradients within {worst:.1e} "
        "of the CPU path"
    )


def _training_loop(torch, device: str, folder: Path) -> list[np.ndarray]:
    """runtime.torch.LearnedOptimizer on ``device`` with what real loops use: two param groups
    (own lr and weight decay), a bf16 parameter (fp32 master), the guard (a NaN loss at step
    3 restores the snapshot, then Adam, weight decay included, runs the fallback)."""
    from runtime.guard import GuardConfig
    from runtime.torch import LearnedOptimizer

    params, grads = _inputs()
    tensors = [torch.nn.Parameter(torch.from_numpy(p).to(device)) for p in params]
    tensors[1] = torch.nn.Parameter(tensors[1].detach().to(torch.bfloat16))
    groups = [
        {"params": tensors[:2], "weight_decay": 0.1},
        {"params": tensors[2:], "lr": 0.002, "weight_decay": 0.0},
    ]
    guard = GuardConfig(snapshot_every=1, fallback_steps=2, smoothing=0.0)
    opt = LearnedOptimizer(groups, runtime.load(folder, threads=1), lr=0.01, guard=guard,
                           guard_hook=None)  # fmt: skip
    seen = []
    for t, g in enumerate(grads):
        seen.append([p.detach().clone() for p in tensors])
        for p, x in zip(tensors, g, strict=True):
            p.grad = torch.from_numpy(x).to(device=device, dtype=p.dtype)
        opt.step(loss=float("nan") if t == 3 else 1.0 / (t + 1))
    # the NaN at step 3 took the parameters back to the snapshot of step 2, bit for bit
    if not all(torch.equal(a, b) for a, b in zip(seen[4], seen[2], strict=True)):
        raise AssertionError(f"the guard did not restore the parameters bitwise on {device}")
    if opt.num_fallbacks != 1 or opt.stepper.num_adam_steps != 1:
        raise AssertionError(f"{opt.num_fallbacks} fallbacks, {opt.stepper.num_adam_steps} Adam")
    return [p.detach().float().cpu().numpy() for p in tensors]


def check_training_loop(folder: Path) -> str:
    """Param groups, weight decay, bf16 masters and the guard on CUDA equal them on the CPU."""
    torch = _torch_cuda()
    got = _training_loop(torch, "cuda", folder)
    expected = _training_loop(torch, "cpu", folder)
    _close(got, expected, "CUDA training loop (groups, weight decay, bf16, guard)")
    return "training loop (groups + weight decay + bf16 master + guard fallback): ok"


CHECKS: dict[str, Callable[[Path], str]] = {
    "torch-cuda-fused": check_torch_cuda,
    "torch-cuda-chunked": lambda folder: check_torch_cuda(folder, chunk_size=2048),
    "stream-sync": check_stream_sync,
    "cupy": check_cupy,
    "meta-training": check_meta_training,
    "refusals": check_refusals,
    "training-loop": check_training_loop,
}


def main(argv: list[str]) -> int:
    folder = Path(argv[0]) if argv else REPO / "runtime" / "builtin" / "hyperadam"
    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}")
    failed = 0
    for name, check in CHECKS.items():
        try:
            print(f"PASS {name}: {check(folder)}")
        except Skip as reason:
            print(f"SKIP {name}: {reason}")
        except Exception as err:  # report every check, then fail
            failed += 1
            print(f"FAIL {name}: {type(err).__name__}: {err}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
