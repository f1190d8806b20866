"""Subnormal floats as zero while the runtime computes (glibc on x86-64; elsewhere a no-op).

A coordinate whose gradient stays zero (a dead unit, a network a bad step killed) decays its
moments geometrically, into the subnormal range within a few hundred steps at the learned decay
rates; x86 then takes a microcode assist on every operation that touches them, and a step from
such a state measured 8-14x slower (``benchmarks/bench_runtime.py --subnormals``). Values below
1.2e-38 are nothing next to the moment epsilon, so treating them as zero changes no update that
matters.

The floating-point mode is per thread. onnxruntime's ``session.set_denormal_as_zero`` covers
its own pool threads, but the runtime's chunks run on the threads that call ``run`` (the chunk
threads, or the caller's); so each of those sets flush-to-zero and denormals-are-zero for the
duration of its share of a step and restores the mode it found, through ``fegetenv`` /
``fesetenv`` with the MXCSR bits set (checked once at import on a real subnormal; where the check
fails the runtime computes without the flush). A caller's own arithmetic is never affected.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import sys
from collections.abc import Iterator

# fenv_t on x86-64 glibc: the 28-byte x87 environment, then MXCSR (the SSE/AVX control word).
_FENV_BYTES = 32
_MXCSR_OFFSET = 28
_MXCSR_FTZ_DAZ = 0x8040  # flush-to-zero (bit 15) and denormals-are-zero (bit 6)


def _load_libm() -> ctypes.CDLL | None:
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libm = ctypes.CDLL("libm.so.6")  # glibc's soname; find_library would spawn ldconfig
        libm.fegetenv.argtypes = libm.fesetenv.argtypes = [ctypes.c_void_p]
        libm.fegetenv.restype = libm.fesetenv.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libm


_LIBM = _load_libm()


@contextlib.contextmanager
def _flushing(libm: ctypes.CDLL, flush: bool = True) -> Iterator[None]:
    saved = ctypes.create_string_buffer(_FENV_BYTES)
    if libm.fegetenv(saved) != 0:
        yield
        return
    if flush:
        flushing = ctypes.create_string_buffer(saved.raw, _FENV_BYTES)
        mxcsr = int.from_bytes(saved.raw[_MXCSR_OFFSET:], "little") | _MXCSR_FTZ_DAZ
        # typeshed types a char array's slice assignment as a list of chars; bytes work.
        flushing[_MXCSR_OFFSET:] = mxcsr.to_bytes(4, "little")  # type: ignore[call-overload]
        libm.fesetenv(flushing)
    try:
        yield
    finally:
        libm.fesetenv(saved)


def _verify(libm: ctypes.CDLL | None) -> bool:
    """True if the flush really takes effect in this process (checked once, on a subnormal)."""
    if libm is None:
        return False
    import numpy as np

    tiny = np.array([1e-39], np.float32)  # subnormal in float32
    with _flushing(libm):
        flushed = float((tiny * np.float32(1.0))[0]) == 0.0
    restored = float((tiny * np.float32(1.0))[0]) != 0.0
    return flushed and restored


SUPPORTED: bool = _verify(_LIBM)


@contextlib.contextmanager
def flush_subnormals() -> Iterator[None]:
    """Subnormals as zero in the calling thread for the duration; its mode restored after."""
    if not SUPPORTED or _LIBM is None:
        yield
        return
    with _flushing(_LIBM):
        yield


@contextlib.contextmanager
def preserved_float_mode() -> Iterator[None]:
    """Restores the calling thread's floating-point mode after the block, whatever it did."""
    if _LIBM is None:
        yield
        return
    with _flushing(_LIBM, flush=False):
        yield
