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
p rounded up to ``block_rows()``), each tensor in a storage of its own; the returned state
tensors are [p, J] *views* of such planes (strides ``(1, ld)``), so consecutive fast steps pass
state without copies. Their values are those of the reference; call ``.contiguous()`` where
row-major memory matters. Row-major input state (e.g. ``HyperAdam.init_state``) is converted once.

Precision: float32 uses a fitted polynomial for e^x (relative error 4e-9) and the hardware
reciprocal / reciprocal-square-root estimates refined by one Newton step (an ulp or two), so
results differ from the reference by round-off: ~1e-6 relative per step, ~1e-5 after a
20-step truncation (tests: ``tests/meta_train/test_hyperadam_fast.py``). float64, for checking
the derivation, is exact to ~1e-15.

The C++ source is compiled on first use with the system compiler (``$CXX``, default ``c++``; g++
or clang++ with OpenMP) into a per-machine cache (``$HYPERADAM_KERNEL_CACHE``, default
``~/.cache/hyperadam/kernels``, else ``<tmp>/hyperadam-kernels-<uid>``), which takes a few seconds;
no Python build tool is needed. It uses torch's OpenMP thread pool, with ``torch.get_num_threads()``
threads.

Loading a library runs its code, so the cache must be private: a folder is used only if this
user owns it and nobody else can write it (created 0700; a group- or world-writable or
foreign-owned folder, or one in a world-writable parent without the sticky bit, is refused),
and a library is loaded only if it is this user's, private, and matches the sha256 recorded
beside it when it was built. Anything else is rebuilt, never loaded; the verified file is
loaded through the descriptor that was hashed, so it cannot be swapped in between.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import stat
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
DIGEST_SUFFIX = ".sha256"  # beside each library: the sha256 of the bytes this user built
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
_PREV_SAVED = ("h", "c", "m")  # what the backward reads of the previous state

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
    *_PREV_SAVED,
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


class UnsafeCacheError(PermissionError):
    """A kernel folder or file that another user could have written."""


def _check_private(path: Path, what: str) -> os.stat_result:
    """Refuses ``path`` unless it is no symlink, this user's, and not group/world-writable."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeCacheError(f"{what} {path} is a symbolic link")
    if st.st_uid != os.getuid():
        raise UnsafeCacheError(f"{what} {path} is owned by uid {st.st_uid}, not {os.getuid()}")
    if st.st_mode & 0o022:
        raise UnsafeCacheError(
            f"{what} {path} is writable by its group or others (mode {stat.S_IMODE(st.st_mode):o})"
        )
    return st


def _private_folder(folder: Path) -> Path:
    """``folder``, created 0700 if absent, if only this user can change what is in it.

    Raises:
      OSError: it cannot be created or written, or another user could write it (or replace it:
        a world-writable parent needs the sticky bit).
    """
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(folder, "kernel folder")
    parent = os.stat(folder.parent)
    if parent.st_mode & 0o022 and not parent.st_mode & stat.S_ISVTX:
        raise UnsafeCacheError(
            f"kernel folder {folder} is in {folder.parent}, which others can write (mode "
            f"{stat.S_IMODE(parent.st_mode):o}, no sticky bit)"
        )
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"kernel folder {folder} is not writable")
    return folder


def _cache_dir() -> Path:
    """$HYPERADAM_KERNEL_CACHE, else ~/.cache/hyperadam/kernels, else a per-user temp folder;
    only a private one (see ``_private_folder``)."""
    if os.environ.get(CACHE_ENV):
        folder = Path(os.environ[CACHE_ENV])
        try:
            return _private_folder(folder)
        except OSError as error:
            raise RuntimeError(f"${CACHE_ENV}: {error}") from None
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    refused = []
    for folder in (
        base / "hyperadam" / "kernels",
        Path(tempfile.gettempdir()) / f"hyperadam-kernels-{os.getuid()}",
    ):
        try:
            return _private_folder(folder)
        except OSError as error:
            refused.append(str(error))
    raise RuntimeError(
        "no private folder to build the HyperAdam kernels in (" + "; ".join(refused) + f"); set "
        f"${CACHE_ENV} to a folder only you can write, or use implementation='reference'"
    )


def _sha256_fd(fd: int) -> str:
    digest = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def _open_verified(path: Path) -> int | None:
    """An open descriptor of the library at ``path`` if it is this user's, private, and has the
    sha256 recorded beside it at build time; None otherwise (the caller rebuilds)."""
    digest_path = path.with_name(path.name + DIGEST_SUFFIX)
    try:
        _check_private(digest_path, "kernel digest")
        recorded = digest_path.read_text().strip()
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        private = st.st_uid == os.getuid() and not st.st_mode & 0o022
        if stat.S_ISREG(st.st_mode) and private and _sha256_fd(fd) == recorded:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


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
        os.chmod(tmp, 0o700)
        with open(tmp, "rb") as built:
            digest = _sha256_fd(built.fileno())
        # The digest first: a reader that sees the new library also sees its digest (or, in a
        # race with another builder, a mismatch, which only means one more build).
        digest_tmp = Path(f"{tmp}{DIGEST_SUFFIX}")
        digest_tmp.write_text(digest + "\n")
        os.chmod(digest_tmp, 0o600)
        os.replace(digest_tmp, path.with_name(path.name + DIGEST_SUFFIX))
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, f"{tmp}{DIGEST_SUFFIX}"):
            if os.path.exists(leftover):
                os.unlink(leftover)


class _Kernels:
    """The loaded library: its block size and the four entry points."""

    def __init__(self, path: Path, load_from: str | None = None) -> None:
        lib = ctypes.CDLL(load_from or str(path))
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
        addresses: list[int | None],
    ) -> None:
        """Runs one entry point on raw addresses (the caller keeps their tensors alive)."""
        pointers = (ctypes.c_void_p * len(addresses))(*addresses)
        scalars = (ctypes.c_double * 4)(grad_inv_norm, NORM_EPS, MOMENT_EPS, FORGET_BIAS)
        ld, p, j = shape
        self._entry[kind, dtype](ld, p, j, torch.get_num_threads(), scalars, pointers)


@functools.cache
def kernels() -> _Kernels:
    """Builds (first time on this machine) and loads the kernels; cached per process.

    Only a library that verifies (``_open_verified``) is loaded; any other is rebuilt over. A
    second build covers a race with another process building at the same moment.
    """
    path = library_path()
    fd, builds = _open_verified(path), 0
    while fd is None:
        if builds == 2:
            raise RuntimeError(f"the kernel library {path} does not match the digest built for it")
        build(path)
        builds += 1
        fd = _open_verified(path)
    try:
        # Load the very file that was hashed (Linux); elsewhere the private folder suffices.
        by_fd = f"/proc/self/fd/{fd}"
        return _Kernels(path, by_fd if os.path.exists(by_fd) else None)
    finally:
        os.close(fd)


def block_rows() -> int:
    """Rows per kernel block; planes are padded to a multiple of it."""
    return kernels().block_rows


@functools.cache
def _theta_shapes(j: int) -> dict[str, tuple[int, ...]]:
    return HyperAdam(j).theta_shapes()


# -- layout -----------------------------------------------------------------------------------


def _as_planes(x: Tensor, ld: int) -> Tensor:
    """A tensor whose memory holds ``x`` ([p, J]) as J contiguous planes of ``ld`` rows.

    That is ``x`` itself when it already is such a view (a state this module returned): its
    ``data_ptr()`` is then the first plane. Otherwise a zero-padded copy.
    """
    p, j = x.shape
    if (
        x.stride() == (1, ld)
        and x.storage_offset() + j * ld <= x.untyped_storage().nbytes() // x.element_size()
    ):
        return x
    planes = x.new_zeros(j, ld)
    planes[:, :p] = x.t()
    return planes


def _padded(x: Tensor, ld: int) -> Tensor:
    out = x.new_zeros(ld)
    out[: x.numel()] = x
    return out


def _rows(buffer: Tensor, first_plane: int, p: int, j: int, ld: int) -> Tensor:
    """The [p, J] view of planes ``first_plane .. first_plane + J`` of a [*, ld] buffer."""
    return buffer.as_strided((p, j), (1, ld), buffer.storage_offset() + first_plane * ld)


_FORWARD = {name: i for i, name in enumerate(FORWARD_SLOTS)}
_BACKWARD = {name: i for i, name in enumerate(BACKWARD_SLOTS)}
_SAVED_THETA = ("pre_kernel", "pre_bias", "lstm_kernel", "decay_kernel", "weight_kernel")
# What the backward needs besides inputs and outputs: first plane of each, in units of J (7 J).
_SAVED_PLANES = {"gates": 0, "decays": 4, "rho": 6}


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
        dtype, size = grad.dtype, grad.element_size()
        # Exactly the reference's ops, so ĝ is bit-identical.
        grad_inv_norm = float(inverse_norm(grad.square().sum()))
        grad_padded = _padded(grad, ld)
        prev = [_as_planes(x, ld) for x in state]
        theta = tuple(x if x.is_contiguous() else x.contiguous() for x in theta)
        # One buffer per new state tensor: trajectories are pickled between processes, and
        # pickle writes the whole storage of every view.
        new_planes = [torch.empty(j, ld, dtype=dtype) for _ in STATE_ORDER]
        saved_buffer = torch.empty(7 * j, ld, dtype=dtype) if save else None
        direction = torch.empty(ld, dtype=dtype)
        norms = torch.empty(2 * j, dtype=dtype)
        plane = j * ld * size
        addresses: list[int | None] = [None] * len(FORWARD_SLOTS)
        addresses[_FORWARD["grad"]] = grad_padded.data_ptr()
        for i, (name, x) in enumerate(zip(STATE_ORDER, prev, strict=True)):
            addresses[_FORWARD[name]] = x.data_ptr()
            addresses[_FORWARD[f"{name}_out"]] = new_planes[i].data_ptr()
        for name, x in zip(THETA_ORDER, theta, strict=True):
            addresses[_FORWARD[name]] = x.data_ptr()
        if saved_buffer is not None:
            for name, first in _SAVED_PLANES.items():
                addresses[_FORWARD[name]] = saved_buffer.data_ptr() + first * plane
        addresses[_FORWARD["direction"]] = direction.data_ptr()
        addresses[_FORWARD["norms"]] = norms.data_ptr()
        kernels()("forward", dtype, (ld, p, j), grad_inv_norm, addresses)
        if save:
            ctx.grad_inv_norm, ctx.shape = grad_inv_norm, (ld, p, j)
            saved_theta = [theta[THETA_ORDER.index(name)] for name in _SAVED_THETA]
            ctx.save_for_backward(
                grad_padded, *prev[:3], *saved_theta, *new_planes, saved_buffer, norms
            )
        new_state = (_rows(x, 0, p, j, ld) for x in new_planes)
        return (direction[:p], *new_state)

    @staticmethod
    def backward(ctx, d_direction: Tensor | None, *d_state: Tensor | None):
        ld, p, j = ctx.shape
        grad, *rest = ctx.saved_tensors
        prev, theta, new_planes = rest[:3], rest[3:8], rest[8:14]
        saved_buffer, norms = rest[14:]
        dtype, size = grad.dtype, grad.element_size()
        plane = j * ld * size
        keep = []  # tensors whose addresses the kernel uses
        addresses: list[int | None] = [None] * len(BACKWARD_SLOTS)
        addresses[_BACKWARD["grad"]] = grad.data_ptr()
        for name, x in zip(_PREV_SAVED, prev, strict=True):
            addresses[_BACKWARD[name]] = x.data_ptr()
        for name, x in zip(STATE_ORDER, new_planes, strict=True):
            addresses[_BACKWARD[f"{name}_out"]] = x.data_ptr()
        for name, x in zip(_SAVED_THETA, theta, strict=True):
            addresses[_BACKWARD[name]] = x.data_ptr()
        for name, first in _SAVED_PLANES.items():
            addresses[_BACKWARD[name]] = saved_buffer.data_ptr() + first * plane
        addresses[_BACKWARD["norms"]] = norms.data_ptr()
        if d_direction is not None:
            keep.append(_padded(d_direction, ld))
            addresses[_BACKWARD["d_direction"]] = keep[-1].data_ptr()
        for name, d in zip(STATE_ORDER, d_state, strict=True):
            if d is not None:
                keep.append(_as_planes(d, ld))
                addresses[_BACKWARD[f"d_{name}_out"]] = keep[-1].data_ptr()
        wanted = [i for i, want in enumerate(ctx.needs_input_grad[3:9]) if want]
        d_prev = torch.empty(len(wanted) * j, ld, dtype=dtype)
        for k, i in enumerate(wanted):
            addresses[_BACKWARD[f"d_{STATE_ORDER[i]}"]] = d_prev.data_ptr() + k * plane
        shapes = _theta_shapes(j)
        sizes = [math.prod(shapes[name]) for name in THETA_ORDER]
        d_flat = torch.empty(sum(sizes), dtype=dtype)
        d_theta = [x.view(shapes[n]) for n, x in zip(THETA_ORDER, d_flat.split(sizes), strict=True)]
        for name, x in zip(THETA_ORDER, d_theta, strict=True):
            addresses[_BACKWARD[f"d_{name}"]] = x.data_ptr()
        kernels()("backward", dtype, ctx.shape, ctx.grad_inv_norm, addresses)
        d_state_prev: list[Tensor | None] = [None] * 6
        for k, i in enumerate(wanted):
            d_state_prev[i] = _rows(d_prev, k * j, p, j, ld)
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
    for name, shape in _theta_shapes(max(j, 1)).items():
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
