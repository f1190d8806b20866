"""A character corpus every machine has: the sources of Python's own standard library.

The held-out language-model tasks need text that ships with the project's dependencies; the
standard library's ``.py`` files are on every Python installation. The corpus is a fixed list of
modules read in a fixed order and mapped to bytes 0–127 (any other byte becomes ``?``), so its
vocabulary is always 128 symbols. Python versions differ in these files, so the corpus's sha256
is part of every result that uses it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import sysconfig
from pathlib import Path

import torch
from torch import Tensor

VOCAB_SIZE = 128

# Long, stable, plain-prose-and-code modules present in every CPython 3.10+.
CORPUS_MODULES = (
    "argparse.py",
    "dataclasses.py",
    "functools.py",
    "textwrap.py",
    "pathlib.py",
    "inspect.py",
    "typing.py",
    "json/decoder.py",
    "json/encoder.py",
    "collections/__init__.py",
)


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    """A training/test split of one byte sequence (``[N]`` int64 codes < ``VOCAB_SIZE``)."""

    train: Tensor
    test: Tensor
    sha256: str


@functools.lru_cache(maxsize=1)
def load_stdlib_corpus(test_fraction: float = 0.1) -> TextCorpus:
    """Reads ``CORPUS_MODULES`` from this interpreter's standard library.

    Raises:
      FileNotFoundError: a module is missing (a stripped Python installation); names it.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks = []
    for name in CORPUS_MODULES:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"standard-library source {path} not found (stripped Python?)")
        chunks.append(path.read_bytes())
    data = b"\n".join(chunks)
    codes = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
    codes = torch.where(codes < VOCAB_SIZE, codes, torch.full_like(codes, ord("?")))
    split = int(codes.numel() * (1.0 - test_fraction))
    return TextCorpus(codes[:split], codes[split:], hashlib.sha256(data).hexdigest())


def sample_windows(
    codes: Tensor, *, batch_size: int, length: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``batch_size`` random windows: inputs ``[B, length]`` and next-symbol targets."""
    starts = torch.randint(codes.numel() - length - 1, (batch_size,), generator=generator)
    index = starts.unsqueeze(1) + torch.arange(length + 1).unsqueeze(0)
    windows = codes[index]
    return windows[:, :-1], windows[:, 1:]
