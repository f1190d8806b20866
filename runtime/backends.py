"""Where a stepper's buffers live: host memory (numpy) or CUDA memory (torch or CuPy).

A ``Stepper`` asks its backend for the few things that depend on the memory: allocating state,
binding a buffer to an onnxruntime ``IOBinding`` without a copy, Σg² and finiteness of the
gradients, copies to and from the host for checkpoints, and synchronising the producer's stream.
Small per-step values (lr, Σg², per-column sums) always stay on the host.

CUDA buffers are bound through DLPack (``OrtValue.from_dlpack``), falling back to the raw device
pointer of ``__cuda_array_interface__``. onnxruntime runs on its own CUDA stream and does not wait
on the producer's, so ``synchronize`` waits for the producer's current stream before every step.
Frameworks are imported inside the CUDA backends only, which exist only when given their arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

_ortvalue = ort.OrtValue.ortvalue_from_numpy


def sum_of_squares(arrays: Sequence[np.ndarray], block: int = 8192) -> float:
    """Σx² over 1-D float32 arrays: fp32 dot products of short blocks, added exactly.

    One fp32 ``dot`` over 10⁶ values is off by ~1e-6 relative; 8192-value blocks summed with
    ``math.fsum`` stay at ~1e-9, without a float64 copy of the gradient. A block whose fp32 dot
    overflows is redone in float64, so only NaN/inf inputs give a non-finite result.
    """
    total = []
    with np.errstate(over="ignore", invalid="ignore"):
        for a in arrays:
            for i in range(0, a.size, block):
                part = a[i : i + block]
                value = float(np.dot(part, part))
                if not math.isfinite(value):
                    wide = part.astype(np.float64)
                    value = float(np.dot(wide, wide))
                total.append(value)
    return math.fsum(total)


class HostBackend:
    """numpy buffers; arrays of other frameworks arrive here as zero-copy numpy views."""

    device = "cpu"
    is_host = True
    binding = "OrtValue.ortvalue_from_numpy"

    def zeros(self, size: int) -> np.ndarray:
        return np.zeros(size, np.float32)

    def bind(self, binding: ort.IOBinding, name: str, buffer: np.ndarray, *, output: bool) -> None:
        value = _ortvalue(buffer)
        if output:
            binding.bind_ortvalue_output(name, value)
        else:
            binding.bind_ortvalue_input(name, value)

    def sum_of_squares(self, flat_grads: Sequence[np.ndarray]) -> float:
        return sum_of_squares(flat_grads)

    def all_finite(self, buffers: Sequence[np.ndarray]) -> bool:
        return all(bool(np.isfinite(b).all()) for b in buffers)

    def copy(self, buffer: np.ndarray) -> np.ndarray:
        return buffer.copy()

    def assign(self, buffer: np.ndarray, value: np.ndarray) -> None:
        np.copyto(buffer, value)

    def to_host(self, buffer: np.ndarray) -> np.ndarray:
        """The buffer itself: host code may read and write it in place."""
        return buffer

    def from_host(self, buffer: np.ndarray, host: np.ndarray) -> None:
        if host is not buffer:
            buffer[...] = host

    def synchronize(self) -> None:
        """Nothing to wait for: numpy work is finished when its call returns."""


class CudaBackend:
    """CUDA buffers of torch or CuPy on one device; the sessions run the CUDA provider."""

    is_host = False

    def __init__(self, kind: str, device: str) -> None:
        if kind not in ("torch", "cupy"):
            raise ValueError(f"CUDA arrays of {kind} are not supported (torch or cupy)")
        self.kind = kind
        self.device = device
        self.device_id = int(device.split(":")[1])
        self.binding = "OrtValue.from_dlpack"
        if kind == "torch":
            import torch

            self._xp: Any = torch
            self._torch_device = torch.device(device)
        else:
            import cupy

            self._xp = cupy

    def zeros(self, size: int) -> Any:
        if self.kind == "torch":
            return self._xp.zeros(size, dtype=self._xp.float32, device=self._torch_device)
        with self._xp.cuda.Device(self.device_id):
            return self._xp.zeros(size, dtype=self._xp.float32)

    def bind(self, binding: ort.IOBinding, name: str, buffer: Any, *, output: bool) -> None:
        """Host numpy buffers as OrtValues (onnxruntime copies them); device buffers zero-copy."""
        if isinstance(buffer, np.ndarray):
            HostBackend.bind(self, binding, name, buffer, output=output)  # type: ignore[arg-type]
            return
        try:
            value = ort.OrtValue.from_dlpack(buffer)
        except (TypeError, RuntimeError, BufferError):
            # An onnxruntime build without DLPack for this device: bind the raw pointer.
            self.binding = "__cuda_array_interface__ pointer"
            interface = buffer.__cuda_array_interface__
            bind = binding.bind_output if output else binding.bind_input
            bind(
                name, "cuda", self.device_id, np.float32, list(interface["shape"]),
                interface["data"][0],
            )  # fmt: skip
            return
        if output:
            binding.bind_ortvalue_output(name, value)
        else:
            binding.bind_ortvalue_input(name, value)

    def sum_of_squares(self, flat_grads: Sequence[Any]) -> float:
        xp = self._xp
        if self.kind == "torch":
            parts = [(g.double() ** 2).sum() for g in flat_grads]
            return float(xp.stack(parts).sum())  # one device → host sync
        with xp.cuda.Device(self.device_id):
            parts = [xp.square(g, dtype=xp.float64).sum() for g in flat_grads]
            return float(xp.stack(parts).sum())

    def all_finite(self, buffers: Sequence[Any]) -> bool:
        return all(bool(self._xp.isfinite(b).all()) for b in buffers)

    def copy(self, buffer: Any) -> Any:
        return buffer.clone() if self.kind == "torch" else buffer.copy()

    def assign(self, buffer: Any, value: Any) -> None:
        if self.kind == "torch":
            buffer.copy_(value)
        else:
            buffer[...] = value

    def to_host(self, buffer: Any) -> np.ndarray:
        """A host copy (writing it changes nothing until ``from_host``)."""
        if self.kind == "torch":
            return buffer.detach().cpu().numpy()
        return buffer.get()

    def from_host(self, buffer: Any, host: np.ndarray) -> None:
        if self.kind == "torch":
            buffer.copy_(self._xp.from_numpy(np.ascontiguousarray(host)))
        else:
            buffer.set(np.ascontiguousarray(host))
        self.synchronize()

    def synchronize(self) -> None:
        """Waits for the producer's current stream: onnxruntime does not wait on it."""
        if self.kind == "torch":
            self._xp.cuda.current_stream(self._torch_device).synchronize()
        else:
            with self._xp.cuda.Device(self.device_id):
                self._xp.cuda.get_current_stream().synchronize()


Backend = HostBackend | CudaBackend


def backend_for(kind: str, device: str) -> Backend:
    return HostBackend() if device == "cpu" else CudaBackend(kind, device)
