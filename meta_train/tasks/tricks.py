"""The meta-training optimizee with RNNprop's two tricks (spec §3.1, [TF] ``optimizee/tricks.py``).

Parameters are ``[w ; z]``: ``w`` drives an inner task, ``z`` (``num_convex`` coordinates, only
with the convex trick) an auxiliary convex function. The loss is

    L(w, z) = inner.loss(c1 ⊙ w) + mean_k clip((c2 ⊙ z − η)_k², 0, 10)

* Random Scaling: ``c1 = exp(U(−r_w, r_w))`` per coordinate of w, ``c2 = exp(U(−r_z, r_z))``
  per coordinate of z (r_w = 3, r_z = 1), so the optimizer sees ``c1 ⊙ ∇L(c1 ⊙ w)``. Without
  it, c1 = c2 = 1.
* Combination with a Convex function: ``η ~ U(−1, 1)^k``, ``z_0 = 0``, clip at 10.

All draws (c1, c2, η) come from ``seed``; η does not depend on whether scaling is on. The
optimizer works on the unscaled variables, so ``w_0 = w_init / c1``: the effective network
``c1 ⊙ w_0`` starts at the inner task's N(0, 0.1²).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Batch, Task

CONVEX_CLIP = 10.0


class MixedTask(Task):
    """An inner task with random scaling and/or an appended convex problem (spec §3.1).

    Args:
      inner (Task): the task on the first ``inner.num_params`` coordinates.
      seed (int): the seed of c1, c2 and η.
      random_scaling (bool): scale w by c1 and z by c2.
      convex (bool): append ``num_convex`` coordinates z with the clipped quadratic.
      num_convex (int, optional): k, the size of z (default: 20).
      log_scale_w (float, optional): r_w, c1 = exp(U(−r_w, r_w)) (default: 3.0).
      log_scale_z (float, optional): r_z, c2 = exp(U(−r_z, r_z)) (default: 1.0).

    Raises:
      ValueError: num_convex < 1 with convex on, or a negative log scale.
    """

    def __init__(
        self,
        inner: Task,
        *,
        seed: int,
        random_scaling: bool,
        convex: bool,
        num_convex: int = 20,
        log_scale_w: float = 3.0,
        log_scale_z: float = 1.0,
    ) -> None:
        if convex and num_convex < 1:
            raise ValueError(f"num_convex must be >= 1, got {num_convex}")
        if not (log_scale_w >= 0 and log_scale_z >= 0):
            raise ValueError(
                f"log scales must be >= 0, got log_scale_w={log_scale_w}, log_scale_z={log_scale_z}"
            )
        self.inner = inner
        self.seed, self.random_scaling, self.convex = seed, random_scaling, convex
        self.num_inner = inner.num_params
        self.num_convex = num_convex if convex else 0
        tricks = "+".join(["rs"] * random_scaling + ["cc"] * convex) or "plain"
        self.name = f"mixed[{tricks}]({inner.name})"
        g = torch.Generator().manual_seed(seed)
        # Fixed draw order (u_w, u_z, η), drawn whether or not scaling is on, so that η and
        # the inner coordinates' draws do not depend on the random_scaling flag.
        u_w = torch.rand(self.num_inner, generator=g) * 2 - 1
        u_z = torch.rand(self.num_convex, generator=g) * 2 - 1
        self.eta = torch.rand(self.num_convex, generator=g) * 2 - 1
        if random_scaling:
            self.c1, self.c2 = torch.exp(u_w * log_scale_w), torch.exp(u_z * log_scale_z)
        else:
            self.c1, self.c2 = torch.ones(self.num_inner), torch.ones(self.num_convex)
        # Precomputed for loss_and_grad: r = c2 ⊙ z − η as one addcmul, and dr²/dz · 1/k.
        self._neg_eta = -self.eta
        self._grad_scale_z = self.c2 * (2.0 / max(self.num_convex, 1))

    @property
    def num_params(self) -> int:
        return self.num_inner + self.num_convex

    @property
    def tensor_sizes(self) -> tuple[int, ...]:
        return tuple(self.inner.tensor_sizes) + ((self.num_convex,) if self.num_convex else ())

    def init_params(self, generator: torch.Generator) -> Tensor:
        """``[w_init / c1 ; 0]`` with w_init from the inner task's initialiser."""
        w0 = self.inner.init_params(generator) / self.c1
        return torch.cat([w0, w0.new_zeros(self.num_convex)])

    def sample_batch(self, generator: torch.Generator) -> Batch:
        return self.inner.sample_batch(generator)

    def convex_loss(self, z: Tensor) -> Tensor:
        """``mean_k clip((c2 ⊙ z − η)_k², 0, 10)`` (0 without the convex trick)."""
        if not self.convex:
            return z.new_zeros(())
        return (self.c2 * z - self.eta).square().clamp(max=CONVEX_CLIP).mean()

    def loss(self, params: Tensor, batch: Batch) -> Tensor:
        w, z = params[: self.num_inner], params[self.num_inner :]
        return self.inner.loss(self.c1 * w, batch) + self.convex_loss(z)

    def loss_and_grad(self, params: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """Uses the inner task's own (possibly hand-written) gradient: ∇_w = c1 ⊙ ∇L(c1 ⊙ w)."""
        params = params.detach()
        w, z = params[: self.num_inner], params[self.num_inner :]
        inner_loss, inner_grad = self.inner.loss_and_grad(self.c1 * w, batch)
        grad = torch.empty_like(params)
        torch.mul(self.c1, inner_grad, out=grad[: self.num_inner])
        if not self.convex:
            return inner_loss, grad
        residual = torch.addcmul(self._neg_eta, self.c2, z)
        square = residual * residual
        # d/dz clip(r², 0, 10)/k = 2 r c2 / k where r² <= 10 (as torch.clamp's backward), else 0.
        grad_z = torch.mul(residual, self._grad_scale_z, out=grad[self.num_inner :])
        grad_z.mul_(square <= CONVEX_CLIP)
        return inner_loss + square.clamp_(max=CONVEX_CLIP).mean(), grad

    def test_metrics(self, params: Tensor) -> dict[str, float]:
        """The inner task's held-out metrics at the effective parameters ``c1 ⊙ w``."""
        return self.inner.test_metrics(self.c1 * params[: self.num_inner].detach())
