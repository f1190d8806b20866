"""Pieces shared by the image classifiers: the flat parameter layout and the minibatch/metric code.

Every optimizee keeps its parameters in ONE flat fp32 vector (spec §1); a ``ParamLayout`` says
which slice of it is which tensor. Flat order is layer by layer, weight then bias; the maths
does not depend on the order (spec §8 #14), but the export/runtime and the tests do.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import ImageDataset
from .base import Batch, Task

INIT_STD = 0.1  # every optimizee coordinate starts N(0, 0.1²) ([TF] initial_param_scale)
EVAL_BATCH_SIZE = 500  # test-set examples per forward pass in test_metrics (bounds memory)

# Keys of ``Task.test_metrics`` for the image classifiers (spec §5.2, Table 3): mean test CE and
# top-1/top-2 accuracy as fractions in [0, 1]. Consumers add their own prefix
# (meta_train.evaluate reports them as test_loss_mean, test_top1_mean, ...).
TEST_LOSS = "loss"
TEST_TOP1 = "top1"
TEST_TOP2 = "top2"


class ParamLayout:
    """Names and shapes of the tensors packed, in order, into a flat parameter vector."""

    def __init__(self, entries: Sequence[tuple[str, tuple[int, ...]]]) -> None:
        self.names = tuple(name for name, _ in entries)
        self.shapes = tuple(tuple(shape) for _, shape in entries)
        self.sizes = tuple(math.prod(shape) for shape in self.shapes)
        self.num_params = sum(self.sizes)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"duplicate parameter names in {self.names}")
        # (shape, contiguous strides, offset) of every piece, for the one-op views of ``views``.
        offsets = [0]
        for size in self.sizes[:-1]:
            offsets.append(offsets[-1] + size)
        self._strided = tuple(
            (shape, tuple(math.prod(shape[i + 1 :]) for i in range(len(shape))), offset)
            for shape, offset in zip(self.shapes, offsets, strict=True)
        )

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """Views of ``flat`` ([p]) with the layout's shapes (no copies; autograd-friendly)."""
        pieces = flat.split(self.sizes)
        return [piece.view(shape) for piece, shape in zip(pieces, self.shapes, strict=True)]

    def views(self, flat: Tensor) -> list[Tensor]:
        """Like ``unflatten`` but one ``as_strided`` per piece: for no-grad hot paths only.

        ``flat`` must be contiguous (checked); the storage offset of a sliced vector is honoured.
        """
        if not flat.is_contiguous() or flat.shape != (self.num_params,):
            raise ValueError(
                f"views needs a contiguous [{self.num_params}] vector, got {tuple(flat.shape)}"
            )
        base = flat.storage_offset()
        return [flat.as_strided(shape, stride, base + off) for shape, stride, off in self._strided]

    def __repr__(self) -> str:
        body = ", ".join(f"{n}{list(s)}" for n, s in zip(self.names, self.shapes, strict=True))
        return f"ParamLayout({body}; p={self.num_params})"


def normal_init(num_params: int, generator: torch.Generator) -> Tensor:
    """Draws ``num_params`` coordinates from N(0, INIT_STD²) (spec §5)."""
    return torch.randn(num_params, generator=generator).mul_(INIT_STD)


class ImageClassificationTask(Task):
    """A softmax classifier over an ``ImageDataset`` (mean cross-entropy, random minibatches).

    Subclasses define ``layout`` and ``logits``. A minibatch is ``(images, labels, *extras)``:
    ``batch_size`` indices drawn uniformly (with replacement) from the training split, then any
    extras from ``_sample_extras`` (e.g. a dropout mask), all from the one generator.
    """

    layout: ParamLayout

    def __init__(self, dataset: ImageDataset, *, batch_size: int, name: str) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.name = name

    @property
    def num_params(self) -> int:
        return self.layout.num_params

    @property
    def tensor_sizes(self) -> tuple[int, ...]:
        return self.layout.sizes

    def init_params(self, generator: torch.Generator) -> Tensor:
        return normal_init(self.num_params, generator)

    def sample_batch(self, generator: torch.Generator) -> Batch:
        index = torch.randint(self.dataset.num_train, (self.batch_size,), generator=generator)
        images = self.dataset.train_images.index_select(0, index)
        labels = self.dataset.train_labels.index_select(0, index)
        return (images, labels, *self._sample_extras(generator))

    def _sample_extras(self, generator: torch.Generator) -> tuple[Tensor, ...]:
        """Per-batch randomness beyond the examples (none by default)."""
        del generator
        return ()

    @abc.abstractmethod
    def logits(self, params: Tensor, images: Tensor, *extras: Tensor) -> Tensor:
        """Class scores ``[n, num_classes]``; ``extras`` empty means evaluation mode."""

    def loss(self, params: Tensor, batch: Batch) -> Tensor:
        images, labels, *extras = batch
        return F.cross_entropy(self.logits(params, images, *extras), labels)

    def test_metrics(self, params: Tensor) -> dict[str, float]:
        """Mean CE, top-1 and top-2 accuracy on the test split (spec §5.2 Table 3).

        Evaluated in chunks of ``EVAL_BATCH_SIZE`` examples, in evaluation mode (no dropout);
        batch normalisation uses the statistics of each chunk (the task keeps no running ones).
        """
        images, labels = self.dataset.test_images, self.dataset.test_labels
        total_loss, top1, top2 = 0.0, 0, 0
        with torch.no_grad():
            params = params.detach()
            for start in range(0, labels.shape[0], EVAL_BATCH_SIZE):
                x = images[start : start + EVAL_BATCH_SIZE]
                y = labels[start : start + EVAL_BATCH_SIZE]
                scores = self.logits(params, x)
                total_loss += float(F.cross_entropy(scores, y, reduction="sum"))
                hits = scores.topk(2, dim=1).indices == y.unsqueeze(1)
                top1 += int(hits[:, 0].sum())
                top2 += int(hits.any(dim=1).sum())
        n = max(int(labels.shape[0]), 1)
        return {TEST_LOSS: total_loss / n, TEST_TOP1: top1 / n, TEST_TOP2: top2 / n}
