"""Framework-neutral array plumbing: what an array is, where it lives, and zero-copy views of it.

The runtime steps numpy, torch, CuPy and JAX arrays without importing any of them: an array is
recognised by the package its type comes from and read through the standard protocols —
``__dlpack_device__`` for where it lives, DLPack (``numpy.from_dlpack``) for a zero-copy numpy
view of CPU memory, ``__cuda_array_interface__`` for CUDA memory. ``adopt_params`` and
``adopt_grads`` turn what a user passes into the arrays the stepper binds, after checking every
one (framework, device, dtype, shape, layout) so that nothing changes on bad input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import validation

# How each framework's array type is named in messages.
KIND_NAMES = {
    "numpy": "numpy.ndarray",
    "torch": "torch.Tensor",
    "cupy": "cupy.ndarray",
    "jax": "jax.Array",
}
_DL_CPU, _DL_CUDA = 1, 2  # DLPack device types (dlpack.h: kDLCPU, kDLCUDA)


def kind_of(x: Any) -> str:
    """The framework an array comes from: the top-level package of its type (jaxlib → jax)."""
    root = type(x).__module__.split(".")[0]
    return "jax" if root == "jaxlib" else root


def kind_name(kind: str) -> str:
    return KIND_NAMES.get(kind, f"{kind} array")


def type_name(x: Any) -> str:
    kind = kind_of(x)
    return KIND_NAMES[kind] if kind in KIND_NAMES and _is_array(x) else type(x).__name__


def _is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray) or hasattr(x, "__dlpack__")


def _detached(x: Any) -> Any:
    """torch refuses DLPack export of a tensor that requires grad; its detached view shares
    the same storage, so stepping it updates the parameter."""
    return x.detach() if getattr(x, "requires_grad", False) else x


def device_of(x: Any) -> str:
    """``"cpu"`` or ``"cuda:N"`` from ``__dlpack_device__``; numpy arrays are on the CPU."""
    if isinstance(x, np.ndarray):
        return "cpu"
    if not hasattr(x, "__dlpack_device__"):
        return "cpu"  # only __array_interface__: host memory by definition
    device_type, device_id = (int(v) for v in x.__dlpack_device__())
    if device_type == _DL_CPU:
        return "cpu"
    if device_type == _DL_CUDA:
        return f"cuda:{device_id}"
    return f"dlpack-device-{device_type}:{device_id}"


def dtype_name(x: Any) -> str:
    """``"float32"`` for numpy, CuPy, JAX and torch dtypes alike."""
    return str(getattr(x, "dtype", type(x).__name__)).removeprefix("torch.")


def host_view(x: Any) -> np.ndarray:
    """A numpy array sharing ``x``'s CPU memory (no copy): numpy as is, others through DLPack,
    ``__array_interface__`` as the fallback for producers without DLPack."""
    if isinstance(x, np.ndarray):
        return x
    x = _detached(x)
    if hasattr(x, "__dlpack__"):
        return np.from_dlpack(x)
    if hasattr(x, "__array_interface__"):
        return np.asarray(x)
    raise TypeError(f"{type(x).__name__} exposes neither DLPack nor __array_interface__")


@dataclasses.dataclass(frozen=True)
class Adopted:
    """Arrays accepted for one stepper: their framework, device and the views it binds.

    ``arrays`` are numpy views of host memory when ``device == "cpu"``, else the framework's
    own (detached) CUDA arrays, bound to onnxruntime through DLPack.
    """

    kind: str
    device: str
    arrays: list[Any]
    pointers: list[int]
    shapes: list[tuple[int, ...]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.shapes:  # recorded now: a numpy view IS the user's array and may change
            self.shapes.extend(tuple(a.shape) for a in self.arrays)


def _pointer(x: Any, device: str) -> int:
    if device == "cpu":
        return int(host_view(x).__array_interface__["data"][0])
    return int(_detached(x).__cuda_array_interface__["data"][0])


def _check_device_array(x: Any, i: int, what: str) -> None:
    """dtype, layout and writeability of a CUDA array, read from ``__cuda_array_interface__``."""
    if dtype_name(x) != "float32":
        raise ValueError(f"{what} {i} has dtype {dtype_name(x)}; the runtime steps float32 only")
    interface = _detached(x).__cuda_array_interface__
    shape, strides = tuple(interface["shape"]), interface.get("strides")
    contiguous = strides is None or strides == tuple(
        4 * int(np.prod(shape[k + 1 :])) for k in range(len(shape))
    )
    if not contiguous and what == "gradient":
        raise ValueError(f"gradient {i} is not C-contiguous; pass a contiguous copy of it")
    if not contiguous:
        raise ValueError(
            f"{what} {i} is not C-contiguous: it is updated in place, and a contiguous "
            f"copy would silently not be; pass the array that owns the memory"
        )
    if what == "parameter" and interface["data"][1]:
        raise ValueError(f"{what} {i} is read-only; it must be writeable to be updated")


def adopt_params(params: Any) -> Adopted:
    """Checks parameters and returns the views a stepper binds (no copy anywhere).

    All parameters must come from one framework and live on one device: one step covers all of
    them with one set of onnxruntime sessions.

    Raises:
      TypeError / ValueError: naming the parameter and what is wrong (nothing is bound).
    """
    if not isinstance(params, (list, tuple)):
        raise TypeError(
            f"params must be a list or tuple of numpy arrays, got {type(params).__name__}"
        )
    if not params:
        raise ValueError("params must hold at least one array, got an empty sequence")
    first = params[0]
    kind = kind_of(first) if _is_array(first) else "numpy"
    for i, p in enumerate(params):
        if not _is_array(p) or kind_of(p) != kind:
            expected = "a numpy.ndarray" if kind == "numpy" else f"a {kind_name(kind)}"
            detail = "" if i == 0 or kind == "numpy" else " like parameter 0"
            raise TypeError(f"parameter {i} must be {expected}{detail}, got {type_name(p)}")
    if kind == "jax":
        raise TypeError(
            "JAX arrays are immutable and cannot be updated in place; use "
            "runtime.jax.learned_optimizer(...) (an optax-style GradientTransformation)"
        )
    devices = [device_of(p) for p in params]
    device = devices[0]
    for i, d in enumerate(devices):
        if d != device:
            raise ValueError(f"parameter {i} is on {d} but parameter 0 is on {device}")
    if device == "cpu":
        views = validation.check_params([host_view(p) for p in params])
        return Adopted(kind, device, views, [_pointer(v, device) for v in views])
    if not device.startswith("cuda:") or kind not in ("torch", "cupy"):
        raise ValueError(
            f"{kind_name(kind)} arrays on {device} are not supported: the runtime steps host "
            f"memory (any framework) and CUDA memory of torch or CuPy"
        )
    for i, p in enumerate(params):
        _check_device_array(p, i, "parameter")
    arrays = [_detached(p) for p in params]
    pointers = [_pointer(p, device) for p in arrays]
    _check_no_overlap(arrays, pointers)
    if not any(int(np.prod(a.shape)) for a in arrays):
        raise ValueError("params hold no elements (every array is empty)")
    return Adopted(kind, device, arrays, pointers)


def _check_no_overlap(arrays: Sequence[Any], pointers: Sequence[int]) -> None:
    spans = sorted(
        (ptr, ptr + 4 * int(np.prod(a.shape)), i)
        for i, (a, ptr) in enumerate(zip(arrays, pointers, strict=True))
        if int(np.prod(a.shape))
    )
    for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
        if start < end:
            i, j = sorted((first, second))
            raise ValueError(f"parameter {j} overlaps parameter {i} in memory")


def check_unchanged(sources: Sequence[Any], adopted: Adopted) -> None:
    """A parameter reshaped, re-typed or moved (``p.data = …``) since bind would be stepped
    wrongly, or not at all."""
    for i, (p, was, ptr) in enumerate(zip(sources, adopted.shapes, adopted.pointers, strict=True)):
        shape, dtype = tuple(p.shape), dtype_name(p)
        if shape != was or dtype != "float32":
            raise ValueError(
                f"parameter {i} changed since bind: now shape {shape} dtype {dtype}, was "
                f"shape {was} float32; bind the arrays again"
            )
        if isinstance(p, np.ndarray):
            if not p.flags.c_contiguous:
                raise ValueError(f"parameter {i} changed since bind: no longer C-contiguous")
            continue
        if int(np.prod(shape)) and device_of(p) == adopted.device:
            now = _pointer(p, adopted.device)
            if now != ptr:
                raise ValueError(
                    f"parameter {i} changed since bind: its memory moved (0x{ptr:x} → "
                    f"0x{now:x}, e.g. after `param.data = ...`); bind the arrays again"
                )


def adopt_grads(grads: Any, adopted: Adopted) -> list[Any]:
    """Checks gradients against the parameters; returns flat views (host: numpy, CUDA: native).

    Gradients must come from the parameters' framework and device: a numpy gradient for a
    torch parameter would work on the CPU but hide a device mismatch on the GPU, so it is
    refused everywhere alike.
    """
    kind, device = adopted.kind, adopted.device
    if not isinstance(grads, (list, tuple)):
        plural = "numpy arrays" if kind == "numpy" else f"{kind_name(kind)}s"
        raise TypeError(f"grads must be a list or tuple of {plural}, got {type(grads).__name__}")
    if len(grads) != len(adopted.arrays):
        raise ValueError(
            f"expected {len(adopted.arrays)} gradients (one per parameter), got {len(grads)}"
        )
    for i, g in enumerate(grads):
        if not _is_array(g) or kind_of(g) != kind:
            raise TypeError(f"gradient {i} must be a {kind_name(kind)}, got {type_name(g)}")
        if device_of(g) != device:
            raise ValueError(f"gradient {i} is on {device_of(g)} but parameter {i} is on {device}")
    if device == "cpu":
        return validation.check_grads([host_view(g) for g in grads], adopted.arrays)
    flat = []
    for i, (g, p) in enumerate(zip(grads, adopted.arrays, strict=True)):
        if dtype_name(g) != "float32":
            raise ValueError(
                f"gradient {i} has dtype {dtype_name(g)} but parameter {i} has float32"
            )
        if tuple(g.shape) != tuple(p.shape):
            raise ValueError(
                f"gradient {i} has shape {tuple(g.shape)} but parameter {i} has {tuple(p.shape)}"
            )
        _check_device_array(g, i, "gradient")
        flat.append(_detached(g).reshape(-1))
    return flat
