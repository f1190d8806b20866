"""A random least-squares problem: the smallest real optimizee, for tests and parity checks."""

from __future__ import annotations

import torch
from torch import Tensor

from ..seeding import generator
from .base import Batch, Task


class QuadraticTask(Task):
    """L(w) = ½·mean_rows (A_r·w − y_r)² over a minibatch of rows of a fixed random system."""

    name = "quadratic"

    def __init__(
        self,
        dim: int = 10,
        rows: int = 64,
        batch_size: int = 16,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if dim < 1 or rows < 1 or not 1 <= batch_size <= rows:
            raise ValueError(
                f"need dim >= 1 and 1 <= batch_size <= rows, got {dim=}, {rows=}, {batch_size=}"
            )
        g = generator(seed)
        self.a = torch.randn(rows, dim, generator=g, dtype=dtype)
        self.y = torch.randn(rows, generator=g, dtype=dtype)
        self.batch_size = batch_size
        self.dtype = dtype

    @property
    def num_params(self) -> int:
        return self.a.shape[1]

    def init_params(self, generator: torch.Generator) -> Tensor:
        return 0.1 * torch.randn(self.num_params, generator=generator, dtype=self.dtype)

    def sample_batch(self, generator: torch.Generator) -> Batch:
        rows = torch.randint(self.a.shape[0], (self.batch_size,), generator=generator)
        return self.a[rows], self.y[rows]

    def loss(self, params: Tensor, batch: Batch) -> Tensor:
        a, y = batch
        return 0.5 * (a @ params - y).square().mean()
