"""meta_train.meta_update: the one meta-update, bitwise torch's Adam, pure, and resumable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meta_train.experimental import ExperimentalConfig
from meta_train.meta_update import (
    MetaOptimConfig,
    adam_arrays,
    init_meta_state,
    meta_update,
)

P = 50


def gradients(step: int, count: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(P, generator=g) * 10.0 ** (step % 3 - 1) for _ in range(count)]


def torch_adam_reference(theta0, steps, config, experimental, rejected):
    """θ after ``steps`` updates by hand: torch.optim.Adam, the lr set per step."""
    theta = theta0.clone().requires_grad_(True)
    adam = torch.optim.Adam(
        [theta], lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps
    )
    for k in range(steps):
        grads = [g for i, g in enumerate(gradients(k)) if (k, i) not in rejected]
        if not grads:
            continue
        mean = torch.stack(grads).mean(dim=0)
        norm = float(mean.norm())
        if config.clip_norm is not None and norm > config.clip_norm:
            mean = mean * (config.clip_norm / norm)
        adam.param_groups[0]["lr"] = experimental.meta_lr_at(config.lr, k)
        theta.grad = mean
        adam.step()
    return theta.detach(), adam


def poisoned(k: int, rejected) -> list[torch.Tensor]:
    grads = gradients(k)
    for step, i in rejected:
        if step == k:
            grads[i] = torch.full((P,), float("nan"))
    return grads


@pytest.mark.parametrize("clip_norm", [None, 0.5], ids=["no-clip", "clip"])
@pytest.mark.parametrize("half_life", [None, 2.0], ids=["constant", "half-life"])
def test_equals_torch_adam_bitwise(clip_norm, half_life):
    config = MetaOptimConfig(lr=1e-2, clip_norm=clip_norm)
    experimental = ExperimentalConfig(meta_lr_half_life=half_life)
    rejected = {(1, 0), (3, 0), (3, 1), (3, 2)}  # step 3: every gradient rejected
    theta0 = torch.randn(P, generator=torch.Generator().manual_seed(0))
    state = init_meta_state(theta0)
    infos = []
    for k in range(6):
        state, info = meta_update(state, poisoned(k, rejected), config, experimental)
        infos.append(info)
    want, adam = torch_adam_reference(theta0, 6, config, experimental, rejected)
    assert torch.equal(state.theta, want)
    torch_state = adam.state_dict()["state"][0]
    for name, value in adam_arrays(state).items():
        assert np.array_equal(value, torch.as_tensor(torch_state[name]).numpy()), name
    assert state.step == 6 and float(state.adam.step) == 5  # step 3 took no Adam step
    assert [(i.accepted, i.rejected) for i in infos][1] == (2, 1)
    assert infos[3].accepted == 0 and np.isnan(infos[3].grad_norm)
    assert infos[4].lr == experimental.meta_lr_at(1e-2, 4)


def test_is_pure_and_an_all_rejected_step_changes_nothing_but_the_count():
    state = init_meta_state(torch.ones(P))
    state, _ = meta_update(state, gradients(0), MetaOptimConfig())
    before = (state.theta.clone(), [t.clone() for t in state.adam])
    new, info = meta_update(state, gradients(1), MetaOptimConfig())
    assert torch.equal(state.theta, before[0])  # the input state is left as it was
    assert all(torch.equal(a, b) for a, b in zip(state.adam, before[1], strict=True))
    assert not torch.equal(new.theta, state.theta) and info.accepted == 3
    nan = [torch.full((P,), float("inf"))] * 2
    same, info = meta_update(state, nan, MetaOptimConfig())
    assert same.step == state.step + 1 and (info.accepted, info.rejected) == (0, 2)
    assert same.theta is state.theta and same.adam is state.adam


def test_saved_adam_state_resumes_exactly():
    config = MetaOptimConfig(lr=1e-2)
    state = init_meta_state(torch.zeros(P))
    assert adam_arrays(state) == {}  # before Adam's first step, as torch's lazy state
    for k in range(3):
        state, _ = meta_update(state, gradients(k), config)
    resumed = init_meta_state(state.theta, step=state.step, adam=adam_arrays(state))
    for k in range(3, 5):
        state, _ = meta_update(state, gradients(k), config)
        resumed, _ = meta_update(resumed, gradients(k), config)
    assert torch.equal(state.theta, resumed.theta) and resumed.step == 5
    with pytest.raises(ValueError, match=r"^Adam state lacks \['exp_avg_sq'\]$"):
        init_meta_state(state.theta, adam={"step": np.zeros(()), "exp_avg": np.zeros(P)})
    with pytest.raises(ValueError, match=r"^Adam exp_avg has shape \(3,\), θ \(50,\)$"):
        init_meta_state(
            state.theta,
            adam={"step": np.ones(()), "exp_avg": np.zeros(3), "exp_avg_sq": np.zeros(3)},
        )


def test_frozen_coordinates_never_move_and_the_rest_train_as_without_a_mask():
    from meta_train.meta_update import trainable_mask
    from meta_train.optimizers.hyperadam_tensor import TensorwiseHyperAdam

    optimizer = TensorwiseHyperAdam(4, adaptive_scale=True, scale_reference="trend")
    frozen = ("scale_rate", "weight_bias")
    mask = trainable_mask(optimizer, frozen)
    theta0 = optimizer.flatten(optimizer.init_theta(torch.Generator().manual_seed(0)))
    assert mask is not None and mask.shape == theta0.shape
    assert int((mask == 0).sum()) == 1 + 4  # κ and the J biases of ρ
    n = theta0.numel()
    masked, plain = init_meta_state(theta0), init_meta_state(theta0)
    for step in range(6):
        g = torch.Generator().manual_seed(step)
        grads = [torch.randn(n, generator=g) for _ in range(3)]
        masked, _ = meta_update(masked, grads, MetaOptimConfig(lr=1e-2), trainable=mask)
        plain, _ = meta_update(plain, [x * mask for x in grads], MetaOptimConfig(lr=1e-2))
    start = optimizer.unflatten(theta0)
    after = optimizer.unflatten(masked.theta)
    for name in frozen:
        assert torch.equal(after[name], start[name]), name  # bitwise: Adam's step there is 0
    assert not torch.equal(after["weight_kernel"], start["weight_kernel"])
    # Masking inside the update is masking the gradients before it (the clip sees the same).
    assert torch.equal(masked.theta, plain.theta)
    assert trainable_mask(optimizer, ()) is None


def test_a_bad_frozen_list_is_refused_with_the_entries_there_are():
    from meta_train.meta_update import trainable_mask
    from meta_train.optimizers.hyperadam_tensor import TensorwiseHyperAdam

    optimizer = TensorwiseHyperAdam(4)
    with pytest.raises(ValueError, match=r"no θ entries scale_rate \(it has pre_kernel"):
        trainable_mask(optimizer, ("scale_rate",))
    with pytest.raises(ValueError, match="nothing would be trained"):
        trainable_mask(optimizer, tuple(optimizer.theta_shapes()))
    with pytest.raises(ValueError, match="list of θ entry names"):
        ExperimentalConfig(frozen="weight_bias")
    with pytest.raises(ValueError, match="distinct θ entries"):
        ExperimentalConfig(frozen=["weight_bias", "weight_bias"])
