"""HyperAdam's step as fused CPU kernels with a hand-derived backward (hyperadam-spec.md §2).

``hyperadam_step_fast`` has the signature and the results (to round-off) of the reference
``hyperadam.hyperadam_step``, and is differentiable with respect to θ and the incoming state (not
the gradient, and not twice). It exists for meta-training, where the reference spends most of its
time not in the matmuls but in ~180 elementwise passes per step over [p, J..4J] tensors and in
autograd's bookkeeping for them.

How: ``hyperadam_fast.cpp`` does the whole step in two passes over blocks of rows (forward) and
two more (backward). Inside a block the gates, decay logits and their gradients stay in cache;
the small matmuls are register-tiled in the same kernel; the only global couplings (‖g‖ and the
column norms of h_t and M_{t-1}) are reductions between the passes. The column normalisation is
folded into the decay kernel, ``N(X) W_a = X diag(n) W_a``, and its gradient comes back as
``dX_i += −n_i³ (Σ_k dW'_ik W_ik) X_i`` with ``dW' = Xᵀ dz``. The rest of the backward is the
chain rule written out once (LSTM gates, the moment/bias recursions, ``M̂ = M̃ (Ṽ + ε)^-½``, ELU);
the kernel source follows it line by line. One ``torch.autograd.Function`` per step replaces
~200 autograd nodes.

Layout: the kernels keep every [p, J] state tensor as J contiguous planes of ``ld`` rows (ld =
p rounded up to ``block_rows()``); the returned state tensors are [p, J] *views* of such planes
(strides ``(1, ld)``), so consecutive fast steps pass state without copies. Their values are those
of the reference; call ``.contiguous()`` where row-major memory matters. Row-major input state
(e.g. ``HyperAdam.init_state``) is converted once.

The C++ source is compiled on first use with the system compiler (``$CXX``, default ``c++``; g++
or clang++ with OpenMP) into a per-machine cache (``$HYPERADAM_KERNEL_CACHE``, default
``~/.cache/hyperadam/kernels``), which takes a few seconds; no Python build tool is needed. It uses
torch's OpenMP thread pool, with ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from .base import Theta
from .hyperadam import (
    DEFAULT_LR,
    FORGET_BIAS,
    MOMENT_EPS,
    NORM_EPS,
    HyperAdam,
    HyperAdamState,
    inverse_norm,
)

SOURCE = Path(__file__).with_suffix(".cpp")
CXX_FLAGS = (
    "-O3",
    "-march=native",  # the cache key includes this machine's CPU flags
    "-fopenmp",  # links libgomp.so.1, which resolves to the copy torch has already loaded
    "-fno-math-errno",  # lets sqrt vectorise; changes no result
    "-fPIC",
    "-shared",
    "-std=c++17",
)
CACHE_ENV = "HYPERADAM_KERNEL_CACHE"
COMPILE_TIMEOUT_S = 300

THETA_ORDER = (
    "pre_kernel",
    "pre_bias",
    "lstm_kernel",
    "lstm_bias",
    "decay_kernel",
    "decay_bias",
    "weight_kernel",
    "weight_bias",
)
STATE_ORDER = HyperAdamState._fields  # h, c, m, v, b, gamma

# Pointer slots of the C entry points, in the order of ForwardSlot / BackwardSlot in the source.
FORWARD_SLOTS = (
    "grad",
    *STATE_ORDER,
    *THETA_ORDER,
    *(f"{name}_out" for name in STATE_ORDER),
    "direction",
    "gates",
    "decays",
    "rho",
    "norms",
)
BACKWARD_SLOTS = (
    "grad",
    *STATE_ORDER,
    "pre_kernel",
    "pre_bias",
    "lstm_kernel",
    "decay_kernel",
    "weight_kernel",
    *(f"{name}_out" for name in STATE_ORDER),
    "gates",
    "decays",
    "rho",
    "norms",
    "d_direction",
    *(f"d_{name}_out" for name in STATE_ORDER),
    *(f"d_{name}" for name in STATE_ORDER),
    *(f"d_{name}" for name in THETA_ORDER),
)


# -- building and loading the kernels ----------------------------------------------------------


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hyperadam" / "kernels"


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags (or its name off Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def library_path() -> Path:
    """Where this machine's build of the kernels lives (source, compiler, flags and CPU)."""
    cxx = _compiler()
    try:
        version = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except OSError as err:
        raise RuntimeError(
            f"hyperadam_step_fast needs a C++ compiler with OpenMP; {cxx!r} failed: {err}. "
            "Install g++ (or set $CXX), or use the reference implementation."
        ) from err
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), cxx.encode(), version.encode(), " ".join(CXX_FLAGS).encode()):
        key.update(part)
        key.update(b"\0")
    key.update(_cpu_signature().encode())
    return _cache_dir() / f"hyperadam_fast-{key.hexdigest()[:20]}.so"


def build(path: Path) -> None:
    """Compiles the kernels to ``path`` (atomically: concurrent builders just race to rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp.so")
    os.close(fd)
    try:
        cmd = [_compiler(), *CXX_FLAGS, "-o", tmp, str(SOURCE)]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"compiling the HyperAdam kernels failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}"
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class _Kernels:
    """The loaded library: its block size and the four entry points."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        self.path = path
        self.block_rows = int(lib.hyperadam_block_rows())
        counts = (lib.hyperadam_forward_slots(), lib.hyperadam_backward_slots())
        if counts != (len(FORWARD_SLOTS), len(BACKWARD_SLOTS)):
            raise RuntimeError(f"{path} has {counts} slots; this module expects others")
        argtypes = [
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_double),
            ctypes.POINTER(ctypes.c_void_p),
        ]
        self._entry = {}
        for kind in ("forward", "backward"):
            for dtype, suffix in ((torch.float32, "f32"), (torch.float64, "f64")):
                fn = getattr(lib, f"hyperadam_{kind}_{suffix}")
                fn.argtypes, fn.restype = argtypes, None
                self._entry[kind, dtype] = fn

    def __call__(
        self,
        kind: str,
        dtype: torch.dtype,
        shape: tuple[int, int, int],
        grad_inv_norm: float,
        slots: dict[str, Tensor | None],
    ) -> None:
        names = FORWARD_SLOTS if kind == "forward" else BACKWARD_SLOTS
        pointers = (ctypes.c_void_p * len(names))(
            *(None if slots[n] is None else slots[n].data_ptr() for n in names)
        )
        scalars = (ctypes.c_double * 4)(grad_inv_norm, NORM_EPS, MOMENT_EPS, FORGET_BIAS)
        ld, p, j = shape
        self._entry[kind, dtype](ld, p, j, torch.get_num_threads(), scalars, pointers)


@functools.cache
def kernels() -> _Kernels:
    """Builds (first time on this machine) and loads the kernels; cached per process."""
    path = library_path()
    if not path.exists():
        build(path)
    return _Kernels(path)


def block_rows() -> int:
    """Rows per kernel block; planes are padded to a multiple of it."""
    return kernels().block_rows


# -- layout -----------------------------------------------------------------------------------


def _planes(x: Tensor, ld: int) -> Tensor:
    """``x`` ([p, J]) as a [J, ld] tensor of contiguous planes: a view if it already is one."""
    p, j = x.shape
    if (
        x.stride() == (1, ld)
        and x.storage_offset() + j * ld <= x.untyped_storage().nbytes() // x.element_size()
    ):
        return x.as_strided((j, ld), (ld, 1))
    planes = x.new_zeros(j, ld)
    planes[:, :p] = x.t()
    return planes


def _padded(x: Tensor, ld: int) -> Tensor:
    out = x.new_zeros(ld)
    out[: x.numel()] = x
    return out


def _rows(planes: Tensor, p: int) -> Tensor:
    """The [p, J] view of a [J, ld] planes tensor."""
    return planes[:, :p].t()


# -- autograd ---------------------------------------------------------------------------------


class _HyperAdamStep(torch.autograd.Function):
    """Inputs: ld, save, grad, the six state tensors, θ in ``THETA_ORDER``.

    Outputs: the direction Σ_j ρ_j M̂_j ([p]) and the six new state tensors.
    """

    @staticmethod
    def forward(ctx, ld: int, save: bool, grad: Tensor, *tensors: Tensor):
        ctx.set_materialize_grads(False)
        state, theta = tensors[:6], tensors[6:]
        p, j = state[0].shape
        dtype = grad.dtype
        kernel = kernels()
        # Exactly the reference's ops, so ĝ is bit-identical.
        grad_inv_norm = float(inverse_norm(grad.square().sum()))
        slots: dict[str, Tensor | None] = {"grad": _padded(grad, ld)}
        for name, x in zip(STATE_ORDER, state, strict=True):
            slots[name] = _planes(x, ld)
        for name, x in zip(THETA_ORDER, theta, strict=True):
            slots[name] = x.detach().contiguous()
        # One allocation for the new state and what the backward needs (4J + 2J + J planes).
        planes = torch.empty((6 + (7 if save else 0)) * j, ld, dtype=dtype)
        for i, name in enumerate(STATE_ORDER):
            slots[f"{name}_out"] = planes[i * j : (i + 1) * j]
        slots["gates"] = planes[6 * j : 10 * j] if save else None
        slots["decays"] = planes[10 * j : 12 * j] if save else None
        slots["rho"] = planes[12 * j : 13 * j] if save else None
        slots["direction"] = torch.empty(ld, dtype=dtype)
        slots["norms"] = torch.empty(2 * j, dtype=dtype)
        kernel("forward", dtype, (ld, p, j), grad_inv_norm, slots)
        if save:
            ctx.grad_inv_norm = grad_inv_norm
            ctx.shape = (ld, p, j)
            ctx.names = [n for n in BACKWARD_SLOTS[:22] if n != "grad"]
            ctx.save_for_backward(slots["grad"], *(slots[n] for n in ctx.names))
        new_state = (_rows(slots[f"{name}_out"], p) for name in STATE_ORDER)
        return (slots["direction"][:p], *new_state)

    @staticmethod
    def backward(ctx, d_direction: Tensor | None, *d_state: Tensor | None):
        ld, p, j = ctx.shape
        grad, *saved = ctx.saved_tensors
        dtype = grad.dtype
        slots: dict[str, Tensor | None] = {"grad": grad, **dict(zip(ctx.names, saved, strict=True))}
        slots["d_direction"] = None if d_direction is None else _padded(d_direction, ld)
        for name, d in zip(STATE_ORDER, d_state, strict=True):
            slots[f"d_{name}_out"] = None if d is None else _planes(d, ld)
        wanted = ctx.needs_input_grad[3:9]
        d_prev = torch.empty(sum(wanted) * j, ld, dtype=dtype)
        row = 0
        for name, want in zip(STATE_ORDER, wanted, strict=True):
            slots[f"d_{name}"] = d_prev[row : row + j] if want else None
            row += j if want else 0
        shapes = HyperAdam(j).theta_shapes()
        d_theta = [torch.empty(shapes[name], dtype=dtype) for name in THETA_ORDER]
        for name, d in zip(THETA_ORDER, d_theta, strict=True):
            slots[f"d_{name}"] = d
        kernels()("backward", dtype, ctx.shape, ctx.grad_inv_norm, slots)
        d_state_prev = [
            None if slots[f"d_{n}"] is None else _rows(slots[f"d_{n}"], p) for n in STATE_ORDER
        ]
        return (None, None, None, *d_state_prev, *d_theta)


# -- the step ---------------------------------------------------------------------------------


def _validate(theta: Theta, grad: Tensor, state: HyperAdamState) -> None:
    if grad.ndim != 1:
        raise ValueError(f"grad must be a flat [p] tensor, got shape {tuple(grad.shape)}")
    if grad.dtype not in (torch.float32, torch.float64) or grad.device.type != "cpu":
        raise ValueError(
            f"hyperadam_step_fast runs on CPU float32/float64, got {grad.dtype} on {grad.device}"
        )
    if grad.requires_grad:
        raise ValueError(
            "hyperadam_step_fast does not differentiate through the gradient (first-order "
            "meta-gradients only); pass grad.detach() or use the reference implementation"
        )
    j = state.h.shape[-1] if state.h.ndim == 2 else -1
    for name, x in zip(STATE_ORDER, state, strict=True):
        if tuple(x.shape) != (grad.numel(), j) or x.dtype != grad.dtype or x.device != grad.device:
            raise ValueError(
                f"state.{name} must be a [{grad.numel()}, J] {grad.dtype} tensor like state.h, "
                f"got shape {tuple(x.shape)} and {x.dtype}"
            )
    for name, shape in HyperAdam(max(j, 1)).theta_shapes().items():
        x = theta[name]
        if tuple(x.shape) != shape or x.dtype != grad.dtype:
            raise ValueError(
                f"theta[{name!r}] must have shape {shape} and dtype {grad.dtype} for J = {j}, "
                f"got {tuple(x.shape)} and {x.dtype}"
            )


def hyperadam_step_fast(
    theta: Theta, grad: Tensor, state: HyperAdamState, *, lr: float | Tensor = DEFAULT_LR
) -> tuple[Tensor, HyperAdamState]:
    """One HyperAdam step (spec §2, Alg. 2): the fused equivalent of ``hyperadam_step``.

    Args:
      theta: meta-parameters (see ``HyperAdam.theta_shapes``); float32 (or float64, for tests).
      grad: [p] gradient of the whole model, flattened; must not require grad.
      state: the previous ``HyperAdamState``.
      lr: step size α (0.005 in the paper).

    Returns:
      ``(delta, new_state)`` as ``hyperadam_step`` returns them, to round-off; the state tensors
      are [p, J] views of planes (see the module docstring). Differentiable once in θ and state.

    Raises:
      ValueError: on a shape/dtype/device mismatch, or if ``grad`` requires grad.
      RuntimeError: if the kernels cannot be compiled (no C++ compiler with OpenMP).
    """
    _validate(theta, grad, state)
    ld = -(-grad.numel() // block_rows()) * block_rows()
    inputs = (*state, *(theta[name] for name in THETA_ORDER))
    save = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    direction, *new_state = _HyperAdamStep.apply(ld, save, grad, *inputs)
    return -lr * direction, HyperAdamState(*new_state)
