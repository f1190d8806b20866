"""How the coordinates of a list of arrays are cut into chunks for the step graphs.

The model's coordinates are the arrays' elements concatenated in order (the flat vector of the
reference). A chunk is a contiguous range of those coordinates. A chunk inside one array is run
zero-copy on views of that array; small arrays are packed together into one chunk, whose
parameters and gradients are gathered into a scratch buffer (a few bytes per coordinate, against
the ≥ 176 bytes of optimizer state each coordinate owns).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

# Coordinates per chunk. A chunk's [20, n] temporaries should stay in a core's L2 cache (2 MiB
# on the project's Xeon): the step makes ~50 elementwise passes over [20, n] tensors, and each
# costs ~0.3 ns per element from L2 against several times that from memory. HyperAdam (J = 20),
# CPU time per coordinate of a staged step, measured interleaved in one process on the busy
# 2-core machine (benchmarks/bench_runtime.py for the method), 1 thread at p ≈ 10⁵:
# 1024: 708 ns, 1536: 662, 2048: 650, 3072: 709, 4096: ~700–770; 2 threads at 10⁶: 1536: 690,
# 2048: 716, 3072: 730, 4096: 772. Below ~1024 the per-node and per-call overheads
# (~0.5 µs per node, ~5 µs per graph call) start to show; one fused whole-model graph at 10⁶ is
# 2–3× slower than any of these, since its temporaries stream from memory.
DEFAULT_CHUNK_SIZE = 2048


@dataclasses.dataclass(frozen=True)
class Piece:
    """Elements ``[start, stop)`` of array ``array`` (flattened), at ``offset`` in its chunk."""

    array: int
    start: int
    stop: int
    offset: int


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Coordinates ``[start, stop)`` of the model, made of one or more pieces."""

    start: int
    stop: int
    pieces: tuple[Piece, ...]

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def zero_copy(self) -> bool:
        return len(self.pieces) == 1


def plan_chunks(sizes: Sequence[int], chunk_size: int) -> list[Chunk]:
    """Cuts arrays of ``sizes`` elements into chunks of at most ``chunk_size`` coordinates.

    An array of at least ``chunk_size`` elements is split into ``ceil(size / chunk_size)``
    near-equal zero-copy chunks; runs of smaller arrays are packed into shared chunks. Empty
    arrays own no coordinates. The chunks tile ``[0, sum(sizes))`` in order.
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    chunks: list[Chunk] = []
    group: list[Piece] = []
    group_start = position = 0

    def flush() -> None:
        nonlocal group
        if group:
            chunks.append(Chunk(group_start, position, tuple(group)))
            group = []

    for index, size in enumerate(sizes):
        if size == 0:
            continue
        if size >= chunk_size:
            flush()
            count = math.ceil(size / chunk_size)
            bounds = [size * k // count for k in range(count + 1)]
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                chunks.append(Chunk(position + lo, position + hi, (Piece(index, lo, hi, 0),)))
            position += size
            continue
        if position - group_start + size > chunk_size:
            flush()
        if not group:
            group_start = position
        group.append(Piece(index, 0, size, position - group_start))
        position += size
    flush()
    return chunks
