"""LSTM sequence prediction on noisy sines (spec §5.3, [TF]/[RP] ``optimizee/lstm.py``).

One or two stacked LSTM layers of 20 units read the 10 scalar inputs of a sequence from a zero
initial state; a linear readout of the last layer's final hidden state predicts the noiseless
next value, scored by the mean squared error over the minibatch.

Cell (gate order i, f, o, g; no forget-gate bias): ``[i, f, o, g] = [x, h] W + b``,
``c' = σ(f)⊙c + σ(i)⊙tanh(g)``, ``h' = σ(o)⊙tanh(c')``. Flat layout: per layer the fused kernel
``W`` ``[in + 20, 80]`` (input rows first, then recurrent rows) and bias ``b`` ``[80]``, then the
readout weight ``[20, 1]`` and bias ``[1]``: p = 1,781 for one layer, 5,061 for two.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..data.sine import SEQ_LEN, sample_sine_batch
from ._common import ParamLayout, normal_init
from .base import Batch, Task


class SineLSTMTask(Task):
    """Predict the next value of a noisy sine with a small LSTM (spec §5.3).

    Args:
      num_layers (int, optional): stacked LSTM layers, >= 1 (default: 1).
      hidden (int, optional): units per layer (default: 20).
      noise_std (float, optional): σ of the input noise; 0.1 or 0.01 in the paper (default: 0.1).
      batch_size (int, optional): sequences per minibatch (default: 128).
      seq_len (int, optional): inputs per sequence (default: 10).
      name (str, optional): task name (default: e.g. "sine-lstm-x1-noise0.1").

    Raises:
      ValueError: a size < 1 or noise_std < 0.
    """

    def __init__(
        self,
        *,
        num_layers: int = 1,
        hidden: int = 20,
        noise_std: float = 0.1,
        batch_size: int = 128,
        seq_len: int = SEQ_LEN,
        name: str | None = None,
    ) -> None:
        for arg, value in (
            ("num_layers", num_layers),
            ("hidden", hidden),
            ("batch_size", batch_size),
            ("seq_len", seq_len),
        ):
            if value < 1:
                raise ValueError(f"{arg} must be >= 1, got {value}")
        if not noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.num_layers, self.hidden, self.noise_std = num_layers, hidden, noise_std
        self.batch_size, self.seq_len = batch_size, seq_len
        self.name = name or f"sine-lstm-x{num_layers}-noise{noise_std:g}"
        entries: list[tuple[str, tuple[int, ...]]] = []
        for layer in range(num_layers):
            fan_in = (1 if layer == 0 else hidden) + hidden
            entries += [
                (f"lstm{layer}.weight", (fan_in, 4 * hidden)),
                (f"lstm{layer}.bias", (4 * hidden,)),
            ]
        entries += [("readout.weight", (hidden, 1)), ("readout.bias", (1,))]
        self.layout = ParamLayout(entries)

    @property
    def num_params(self) -> int:
        return self.layout.num_params

    @property
    def tensor_sizes(self) -> tuple[int, ...]:
        return self.layout.sizes

    def init_params(self, generator: torch.Generator) -> Tensor:
        return normal_init(self.num_params, generator)

    def sample_batch(self, generator: torch.Generator) -> Batch:
        return sample_sine_batch(
            generator, self.batch_size, noise_std=self.noise_std, seq_len=self.seq_len
        )

    def predict(self, params: Tensor, inputs: Tensor) -> Tensor:
        """Predicted next values ``[n]`` for input sequences ``[n, seq_len]``."""
        pieces = self.layout.unflatten(params)
        n, hidden = inputs.shape[0], self.hidden
        # Split each fused kernel into its input rows and recurrent rows (views, no copies).
        kernels = []
        for layer in range(self.num_layers):
            weight, bias = pieces[2 * layer], pieces[2 * layer + 1]
            fan_in = weight.shape[0] - hidden
            kernels.append((weight[:fan_in], weight[fan_in:], bias))
        # Layer 0 sees a scalar per step, so its input term is an outer product for all steps.
        w_x0, _, b0 = kernels[0]
        input_terms = inputs.unsqueeze(2) * w_x0 + b0  # [n, seq_len, 4H]
        h = [inputs.new_zeros(n, hidden) for _ in range(self.num_layers)]
        c = [inputs.new_zeros(n, hidden) for _ in range(self.num_layers)]
        for k in range(inputs.shape[1]):
            x = h[0]  # the input of layers > 0, set by the layer below (layer 0 reads the step's)
            for layer, (w_x, w_h, bias) in enumerate(kernels):
                if layer == 0:
                    gates = torch.addmm(input_terms[:, k], h[0], w_h)
                else:
                    gates = torch.addmm(bias, x, w_x).addmm_(h[layer], w_h)
                i, f, o, g = gates.chunk(4, dim=1)
                c[layer] = torch.sigmoid(f) * c[layer] + torch.sigmoid(i) * torch.tanh(g)
                h[layer] = torch.sigmoid(o) * torch.tanh(c[layer])
                x = h[layer]
        return torch.addmm(pieces[-1], h[-1], pieces[-2]).squeeze(1)

    def loss(self, params: Tensor, batch: Batch) -> Tensor:
        inputs, targets = batch
        return (self.predict(params, inputs) - targets).square().mean()
