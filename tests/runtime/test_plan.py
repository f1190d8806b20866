"""runtime.plan: chunks tile the coordinates; big arrays zero-copy, small ones packed."""

from __future__ import annotations

import pytest

from runtime.plan import Chunk, Piece, plan_chunks


@pytest.mark.parametrize(
    "sizes, chunk_size, expected",
    [
        ([5], 10, [Chunk(0, 5, (Piece(0, 0, 5, 0),))]),
        ([3, 4], 10, [Chunk(0, 7, (Piece(0, 0, 3, 0), Piece(1, 0, 4, 3)))]),
        (
            [10],
            4,
            [
                Chunk(0, 3, (Piece(0, 0, 3, 0),)),
                Chunk(3, 6, (Piece(0, 3, 6, 0),)),
                Chunk(6, 10, (Piece(0, 6, 10, 0),)),
            ],
        ),
        (
            [2, 9, 0, 3, 3],
            4,
            [
                Chunk(0, 2, (Piece(0, 0, 2, 0),)),
                Chunk(2, 5, (Piece(1, 0, 3, 0),)),
                Chunk(5, 8, (Piece(1, 3, 6, 0),)),
                Chunk(8, 11, (Piece(1, 6, 9, 0),)),
                Chunk(11, 14, (Piece(3, 0, 3, 0),)),
                Chunk(14, 17, (Piece(4, 0, 3, 0),)),
            ],
        ),
    ],
    ids=["one-array", "packed", "split-evenly", "mixed-with-empty"],
)
def test_plan(sizes, chunk_size, expected):
    assert plan_chunks(sizes, chunk_size) == expected


@pytest.mark.parametrize("sizes", [[1] * 50, [4097, 3, 5000, 1, 1, 8192], [12345]])
def test_chunks_tile_the_coordinates_and_respect_the_size(sizes):
    chunks = plan_chunks(sizes, 4096)
    assert chunks[0].start == 0 and chunks[-1].stop == sum(sizes)
    assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:], strict=False))
    assert all(1 <= c.size <= 4096 for c in chunks)
    assert all(sum(p.stop - p.start for p in c.pieces) == c.size for c in chunks)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_chunk_size_is_validated(bad):
    with pytest.raises(ValueError, match=r"^chunk_size must be an integer >= 1, got "):
        plan_chunks([3], bad)
