"""runtime.torch.LearnedOptimizer: a torch.optim.Optimizer over the runtime (CNN, schedulers,
checkpoints, missing gradients, param groups, bad input)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import runtime
from runtime.torch import LearnedOptimizer


@pytest.fixture(scope="module")
def opt(hyperadam_folder):
    return runtime.load(hyperadam_folder, threads=1)


def cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 3 * 3, 10),
    )


def batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(t)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def train(model, optimizer, scheduler, steps: range) -> list[float]:
    losses = []
    for t in steps:
        x, y = batch(t)

        def closure(x=x, y=y):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        losses.append(float(optimizer.step(closure).detach()))
        scheduler.step()
    return losses


def test_cnn_trains_with_a_scheduler_and_a_checkpoint_continues_identically(opt):
    model = cnn()
    optimizer = LearnedOptimizer(model.parameters(), opt, lr=0.01, chunk_size=64)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    pointers = [p.data_ptr() for p in model.parameters()]
    losses = train(model, optimizer, scheduler, range(10))
    assert losses[-1] < losses[0]
    assert [p.data_ptr() for p in model.parameters()] == pointers  # updated in place
    # steps 5–9 ran at the scheduler's second lr; the group already holds the third
    assert optimizer.stepper.lr == pytest.approx(0.005)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0025)

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": optimizer.state_dict(),
                "sched": scheduler.state_dict()}, buffer)  # fmt: skip
    expected = train(model, optimizer, scheduler, range(10, 15))

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain tensors and numbers only
    model2 = cnn()
    model2.load_state_dict(saved["model"])
    optimizer2 = LearnedOptimizer(model2.parameters(), opt, lr=0.01, chunk_size=64)
    scheduler2 = torch.optim.lr_scheduler.StepLR(optimizer2, step_size=5, gamma=0.5)
    optimizer2.load_state_dict(saved["opt"])
    scheduler2.load_state_dict(saved["sched"])
    assert train(model2, optimizer2, scheduler2, range(10, 15)) == expected
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert saved["opt"]["state"][0]["h"].shape == (4 * 9, 20)  # the conv weight's rows


def test_steps_equal_the_numpy_stepper_and_missing_grads_count_as_zero(opt):
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    arrays = [p.detach().numpy().copy() for p in params]
    stepper = opt.bind(arrays)
    optimizer = LearnedOptimizer(params, opt)
    assert optimizer.step() is None and optimizer.stepper.num_steps == 0  # no grads: no step
    for t in range(3):
        g = torch.randn(5, 3, generator=torch.Generator().manual_seed(t))
        params[0].grad, params[1].grad = g, None
        optimizer.step()
        stepper.step([g.numpy(), np.zeros(4, np.float32)])
    assert all(np.array_equal(a, p.detach().numpy()) for a, p in zip(arrays, params, strict=True))


def test_param_groups_share_the_step_and_new_groups_keep_the_old_state(opt):
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    optimizer = LearnedOptimizer([{"params": [a]}], opt)
    a.grad = torch.full((3,), 0.5)
    optimizer.step()
    h = optimizer.stepper.state_dict()["state"]["h"].copy()
    optimizer.add_param_group({"params": [b]})
    state = optimizer.stepper.state_dict()["state"]
    assert np.array_equal(state["h"][:3], h) and not state["h"][3:].any()
    optimizer.param_groups[1]["lr"] = 0.1
    b.grad = torch.ones(2)
    with pytest.raises(ValueError, match=r"^param groups have learning rates \[0\.005, 0\.1\]"):
        optimizer.step()


BAD_GRADS = [
    ("numpy", lambda g: g[0].numpy(), TypeError, r"^gradient 0 must be a torch\.Tensor, got numpy"),
    ("shape", lambda g: torch.zeros(3, 5), ValueError, r"^gradient 0 has shape \(3, 5\) but"),
    ("dtype", lambda g: g[0].double(), ValueError, r"^gradient 0 has dtype float64 but parameter"),
]


@pytest.mark.parametrize(
    "make, error, message", [c[1:] for c in BAD_GRADS], ids=[c[0] for c in BAD_GRADS]
)
def test_bad_gradients_change_nothing(opt, make, error, message):
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    optimizer = LearnedOptimizer(params, opt)
    for p in params:
        p.grad = torch.full_like(p, 0.1)
    optimizer.step()
    before = [p.detach().clone() for p in params]
    state = optimizer.stepper.state_dict()
    grads = [p.grad for p in params]
    with pytest.raises(error, match=message):
        optimizer.stepper.step([make(grads), grads[1]])
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    after = optimizer.stepper.state_dict()
    assert after["num_steps"] == 1
    assert all(np.array_equal(state["state"][k], after["state"][k]) for k in state["state"])


def test_replaced_parameter_storage_is_refused(opt):
    p = torch.nn.Parameter(torch.ones(4))
    optimizer = LearnedOptimizer([p], opt)
    p.data = torch.zeros(4)
    p.grad = torch.ones(4)
    with pytest.raises(ValueError, match=r"^parameter 0 changed since bind: its memory moved"):
        optimizer.step()


def test_foreign_state_dict_is_refused_before_anything_changes(opt):
    p = torch.nn.Parameter(torch.ones(4))
    optimizer = LearnedOptimizer([p], opt)
    with pytest.raises(ValueError, match=r"has no 'hyperadam_runtime' entry"):
        optimizer.load_state_dict(torch.optim.Adam([p]).state_dict())
    saved = optimizer.state_dict()
    saved["state"][0]["h"] = torch.zeros(3, 20)
    with pytest.raises(ValueError, match=r"^state entry 'h' must be a float32 array of shape"):
        optimizer.load_state_dict(saved)
