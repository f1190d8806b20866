"""The "VGG-like" convolutional classifiers of spec §5.2 ([TF] ``optimizee/vgg.py``).

* CNN-1 = c-c-p-f: conv(C→16) conv(16→16) pool FC(→10).
* CNN-2 = c-c-p-c-c-p-f-f: conv(C→16) conv(16→16) pool conv(16→32) conv(32→32) pool
  FC(→64) ReLU FC(64→10).

Every conv is 3×3, stride 1, SAME padding, with bias and a ReLU; pooling is 2×2 max, stride 2.
Optional batch normalisation follows each conv+ReLU: the current batch's mean and (biased)
variance over the batch axis only, per (channel, row, column) as [TF]'s
``tf.nn.moments(x, axes=[0])``, eps 1e-5, no learnable scale or shift (no parameters).
Optional dropout (CNN-2 only) keeps each hidden-FC unit with probability 0.5 and scales kept
units by 2; its mask is drawn in ``sample_batch`` so a run is a pure function of its seeds.

Flat layout: per layer weight then bias; conv weights ``[out, in, 3, 3]`` (torch layout), FC
weights ``[in, out]``. The FC input is the pooled map flattened in (C, H, W) order. Parameter
counts: MNIST 33,850 / 117,434, CIFAR-10 43,738 / 148,442.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import ImageDataset
from ._common import ImageClassificationTask, ParamLayout

ARCHITECTURES = ("cnn1", "cnn2")
# Per stage: (output channels, convs); a 2×2 max-pool ends every stage.
_STAGES = {"cnn1": ((16, 2),), "cnn2": ((16, 2), (32, 2))}
_HIDDEN_FC = {"cnn1": (), "cnn2": (64,)}
BN_EPS = 1e-5
DROPOUT_KEEP = 0.5


class CNNTask(ImageClassificationTask):
    """CNN-1 / CNN-2 classifiers on MNIST or CIFAR-10 (spec §5.2).

    Args:
      dataset (ImageDataset): the data (MNIST flat rows are viewed as ``[n, 1, 28, 28]``).
      arch (str, optional): "cnn1" (c-c-p-f) or "cnn2" (c-c-p-c-c-p-f-f) (default: "cnn1").
      batch_norm (bool, optional): batch-statistics normalisation after every conv+ReLU
        (default: False).
      dropout (bool, optional): dropout with keep probability 0.5 after the hidden FC ReLU; only
        "cnn2" has that layer (default: False).
      batch_size (int, optional): minibatch size (default: 128).
      name (str, optional): task name (default: e.g. "mnist-cnn2-dropout").

    Raises:
      ValueError: unknown arch, dropout without a hidden FC layer, or batch_size < 1.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        *,
        arch: str = "cnn1",
        batch_norm: bool = False,
        dropout: bool = False,
        batch_size: int = 128,
        name: str | None = None,
    ) -> None:
        if arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
        if dropout and not _HIDDEN_FC[arch]:
            raise ValueError(f"dropout needs a hidden FC layer, which only cnn2 has; got {arch!r}")
        suffix = "-bn" * batch_norm + "-dropout" * dropout
        super().__init__(
            dataset, batch_size=batch_size, name=name or f"{dataset.name}-{arch}{suffix}"
        )
        self.arch, self.batch_norm, self.dropout = arch, batch_norm, dropout
        channels, height, width = dataset.image_shape
        entries: list[tuple[str, tuple[int, ...]]] = []
        self._convs_per_stage = []
        for stage, (out_channels, convs) in enumerate(_STAGES[arch]):
            for k in range(convs):
                prefix = f"conv{stage}_{k}"
                entries += [
                    (f"{prefix}.weight", (out_channels, channels, 3, 3)),
                    (f"{prefix}.bias", (out_channels,)),
                ]
                channels = out_channels
            self._convs_per_stage.append(convs)
            # SAME 2×2/2 pooling keeps ceil(size/2) (ceil_mode below pads the odd edge).
            height, width = math.ceil(height / 2), math.ceil(width / 2)
        widths = [channels * height * width, *_HIDDEN_FC[arch], dataset.num_classes]
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            entries += [(f"fc{i}.weight", (fan_in, fan_out)), (f"fc{i}.bias", (fan_out,))]
        self.layout = ParamLayout(entries)
        self._num_fc = len(widths) - 1

    def _sample_extras(self, generator: torch.Generator) -> tuple[Tensor, ...]:
        if not self.dropout:
            return ()
        hidden = _HIDDEN_FC[self.arch][-1]
        keep = torch.rand(self.batch_size, hidden, generator=generator) < DROPOUT_KEEP
        return (keep.to(torch.float32).div_(DROPOUT_KEEP),)

    def logits(self, params: Tensor, images: Tensor, *extras: Tensor) -> Tensor:
        """Class scores; ``extras`` is ``(dropout_scale,)`` in training with dropout, else empty."""
        pieces = iter(self.layout.unflatten(params))
        x = images.reshape(images.shape[0], *self.dataset.image_shape)
        for convs in self._convs_per_stage:
            for _ in range(convs):
                weight, bias = next(pieces), next(pieces)
                x = torch.relu(F.conv2d(x, weight, bias, padding=1))
                if self.batch_norm:
                    mean = x.mean(dim=0, keepdim=True)
                    var = x.var(dim=0, unbiased=False, keepdim=True)
                    x = (x - mean) * torch.rsqrt(var + BN_EPS)
            x = F.max_pool2d(x, 2, 2, ceil_mode=True)
        x = x.flatten(1)
        for i in range(self._num_fc):
            weight, bias = next(pieces), next(pieces)
            x = torch.addmm(bias, x, weight)
            if i < self._num_fc - 1:
                x = torch.relu(x)
                if extras:
                    x = x * extras[0]
        return x
