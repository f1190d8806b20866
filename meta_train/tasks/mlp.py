"""Fully connected softmax classifiers on MNIST: the meta-training learner and spec §5.1 tasks.

The network is 784 → (``hidden`` units, activation) × ``depth`` → 10 logits, softmax
cross-entropy averaged over the minibatch. Flat layout: per layer the weight ``[in, out]``
(applied as ``x @ W``, as in [TF]) then the bias ``[out]``. With hidden = 20 that is
p = 15,910 for one hidden layer and 420 more per extra layer (19,690 for ten).

Meta-training and the baselines' evaluation call ``loss_and_grad`` of the 784-20-10 network
millions of times on a few CPU cores, so this task overrides it with a hand-written backward
pass: no autograd graph, fused activation-backward kernels, one-op ``as_strided`` views of the
flat vectors, and the gradient written in place into one flat vector allocated per call. On
one thread of this machine that is ≈ 300 µs per call against ≈ 500 µs for autograd; the two
big 128×784×20 matmuls (≈ 60 µs each) are the floor, the rest is per-op dispatch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import ImageDataset
from ._common import ImageClassificationTask, ParamLayout
from .base import Batch

ACTIVATIONS = ("sigmoid", "relu", "elu", "tanh")
_FORWARD = {"sigmoid": torch.sigmoid, "relu": torch.relu, "elu": F.elu, "tanh": torch.tanh}


# Backward of each activation written in terms of its output a = act(z): these are the fused
# kernels autograd itself calls, one op instead of two or three.
# (grad of the output, output) → grad of the input, for each activation.
_BACKWARD: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "sigmoid": torch.ops.aten.sigmoid_backward,
    "tanh": torch.ops.aten.tanh_backward,
    "relu": lambda grad, out: torch.ops.aten.threshold_backward(grad, out, 0),
    "elu": lambda grad, out: torch.ops.aten.elu_backward(grad, 1.0, 1, 1, True, out),
}


class MLPTask(ImageClassificationTask):
    """An MLP classifier on flat images (spec §3 learner, §5.1 test tasks).

    Args:
      dataset (ImageDataset): the data; images are flattened to ``[n, C·H·W]``.
      hidden (int, optional): units per hidden layer (default: 20).
      depth (int, optional): number of hidden layers, >= 1 (default: 1).
      activation (str, optional): one of ``ACTIVATIONS`` (default: "sigmoid").
      batch_size (int, optional): minibatch size (default: 128).
      name (str, optional): task name (default: e.g. "mnist-mlp-sigmoid-l1-h20").

    Raises:
      ValueError: hidden, depth or batch_size < 1, or an unknown activation.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        *,
        hidden: int = 20,
        depth: int = 1,
        activation: str = "sigmoid",
        batch_size: int = 128,
        name: str | None = None,
    ) -> None:
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        default_name = f"{dataset.name}-mlp-{activation}-l{depth}-h{hidden}"
        super().__init__(dataset, batch_size=batch_size, name=name or default_name)
        self.hidden, self.depth, self.activation = hidden, depth, activation
        self._act = _FORWARD[activation]
        self._act_backward = _BACKWARD[activation]
        widths = [
            int(torch.Size(dataset.image_shape).numel()),
            *[hidden] * depth,
            dataset.num_classes,
        ]
        entries = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            entries += [(f"fc{i}.weight", (fan_in, fan_out)), (f"fc{i}.bias", (fan_out,))]
        self.layout = ParamLayout(entries)

    def logits(self, params: Tensor, images: Tensor, *extras: Tensor) -> Tensor:
        del extras
        pieces = self.layout.unflatten(params)
        h = images.reshape(images.shape[0], -1)
        for i in range(0, len(pieces) - 2, 2):
            h = self._act(torch.addmm(pieces[i + 1], h, pieces[i]))
        return torch.addmm(pieces[-1], h, pieces[-2])

    def loss_and_grad(self, params: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """Mean CE and its gradient by a hand-written backward pass (equal to autograd's).

        Backward of ``L = mean_n CE(softmax(z_n), y_n)``: ``dL/dz = (softmax(z) − onehot(y))/n``,
        then for each layer ``dW = aᵀ·δ``, ``db = Σ_n δ`` and ``δ_prev = (δ·Wᵀ) ⊙ act'(a)``.
        """
        images, labels = batch[0], batch[1]
        with torch.no_grad():
            params = params.contiguous()
            weights = self.layout.views(params)
            grad = torch.empty(params.shape, dtype=params.dtype)
            grads = self.layout.views(grad)
            outs = [images.reshape(images.shape[0], -1)]  # outs[l] is the input of layer l
            for i in range(self.depth):
                outs.append(self._act(torch.addmm(weights[2 * i + 1], outs[-1], weights[2 * i])))
            log_probs = torch.log_softmax(torch.addmm(weights[-1], outs[-1], weights[-2]), dim=1)
            loss = F.nll_loss(log_probs, labels)
            n = labels.shape[0]
            delta = log_probs.exp_()  # softmax
            delta.scatter_add_(1, labels.view(n, 1), torch.full((n, 1), -1.0))
            delta.div_(n)
            for layer in range(self.depth, -1, -1):
                torch.mm(outs[layer].t(), delta, out=grads[2 * layer])
                torch.sum(delta, dim=0, out=grads[2 * layer + 1])
                if layer:
                    delta = self._act_backward(delta.mm(weights[2 * layer].t()), outs[layer])
        return loss, grad
