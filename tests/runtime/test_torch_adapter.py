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


def grouped_params() -> list[torch.nn.Parameter]:
    torch.manual_seed(3)
    return [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(4))]


def run_steps(optimizer, params, steps=4):
    for t in range(steps):
        g = torch.Generator().manual_seed(10 + t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()


def test_param_groups_with_different_lrs_scale_one_global_step(opt):
    """Group lrs 0.1 and 0.004: the state (lr-free) is the one-group run's, and each group moves
    by its lr times the learned direction (the one-group run at lr 0.1 gives 0.1·d)."""
    single, grouped = grouped_params(), grouped_params()
    start = [p.detach().clone() for p in single]
    one = LearnedOptimizer(single, opt, lr=0.1)
    two = LearnedOptimizer([{"params": [grouped[0]]}, {"params": [grouped[1]], "lr": 0.004}],
                           opt, lr=0.1)  # fmt: skip
    run_steps(one, single)
    run_steps(two, grouped)
    assert torch.equal(grouped[0], single[0])  # the largest lr's group: bit for bit
    torch.testing.assert_close(
        start[1] - grouped[1], (start[1] - single[1]) * 0.04, rtol=1e-5, atol=1e-6
    )
    saved_one, saved_two = one.stepper.state_dict()["state"], two.stepper.state_dict()["state"]
    assert all(np.array_equal(saved_one[k], saved_two[k]) for k in saved_one)


def test_weight_decay_equals_adamw_exactly_when_the_learned_update_is_zero(opt):
    """At the first step with a zero gradient the learned update is exactly zero (all moments
    are zero), so what remains is the decay, which must be AdamW's bit for bit, per group."""
    ours, ref = grouped_params(), grouped_params()
    groups = lambda ps: [{"params": [ps[0]], "weight_decay": 0.1},  # noqa: E731
                         {"params": [ps[1]], "weight_decay": 0.0}]  # fmt: skip
    optimizer = LearnedOptimizer(groups(ours), opt, lr=0.01)
    adamw = torch.optim.AdamW(groups(ref), lr=0.01)
    for p, q in zip(ours, ref, strict=True):
        p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
    optimizer.step()
    adamw.step()
    assert not torch.equal(ours[0], grouped_params()[0])  # it decayed
    for p, q in zip(ours, ref, strict=True):
        assert torch.equal(p, q)


def test_weight_decay_adds_the_decay_term_to_the_learned_update(opt):
    """With gradients, the decayed run moves by the no-decay run's update plus −lr·λ·w."""
    plain, decayed = grouped_params(), grouped_params()
    start = [p.detach().clone() for p in plain]
    a = LearnedOptimizer(plain, opt, lr=0.01)
    b = LearnedOptimizer(decayed, opt, lr=0.01, weight_decay=0.5)
    run_steps(a, plain, steps=1)
    run_steps(b, decayed, steps=1)
    for w0, p, q in zip(start, plain, decayed, strict=True):
        torch.testing.assert_close(q, p - 0.01 * 0.5 * w0, rtol=0, atol=1e-6)


def scheduled_run(opt, make_scheduler, steps=8):
    """lr at each step and the size of each step, on gradients fixed by the step index."""
    params = [torch.nn.Parameter(torch.zeros(50))]
    optimizer = LearnedOptimizer(params, opt, lr=0.01)
    scheduler = make_scheduler(optimizer)
    lrs, sizes = [], []
    for t in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        before = params[0].detach().clone()
        params[0].grad = torch.randn(50, generator=torch.Generator().manual_seed(t))
        optimizer.step()
        scheduler.step()
        assert optimizer.stepper.lr == pytest.approx(lrs[-1])
        sizes.append(float((params[0].detach() - before).norm()))
    return lrs, sizes


def warmup_then_cosine(optimizer):
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: min(1.0, (t + 1) / 4))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[4])


def test_warmup_and_cosine_schedules_change_lr_and_the_step_size(opt):
    """LambdaLR warm-up then CosineAnnealingLR: the stepper runs at the group's lr each step,
    and the same gradients give steps proportional to it (the state does not depend on lr)."""
    _, base = scheduled_run(opt, lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0))
    lrs, sizes = scheduled_run(opt, warmup_then_cosine)
    assert lrs[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert lrs[4] > lrs[5] > lrs[6] > lrs[7]
    np.testing.assert_allclose(sizes, np.array(base) * np.array(lrs) / 0.01, rtol=1e-4)


def test_one_cycle_needs_cycle_momentum_false(opt):
    params = [torch.nn.Parameter(torch.zeros(5))]
    optimizer = LearnedOptimizer(params, opt)
    with pytest.raises(ValueError, match="momentum"):
        torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=10)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.01, total_steps=10, cycle_momentum=False
    )
    lrs = []
    for _ in range(9):
        params[0].grad = torch.ones(5)
        optimizer.step()
        schedule.step()
        lrs.append(optimizer.stepper.lr)
    assert max(lrs) == pytest.approx(0.01, rel=1e-6) and lrs[-1] < lrs[3]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_parameters_step_through_a_float32_master(opt, dtype):
    """The half parameters hold the fp32 master trajectory rounded; state_dict carries the
    masters, so a reloaded optimizer continues the same trajectory."""
    torch.manual_seed(4)
    init = torch.randn(6, 4)
    half = torch.nn.Parameter(init.to(dtype))
    full = torch.nn.Parameter(init.to(dtype).float())  # the same start as the half one
    a, b = LearnedOptimizer([half], opt, lr=0.01), LearnedOptimizer([full], opt, lr=0.01)
    for t in range(3):
        g = torch.randn(6, 4, generator=torch.Generator().manual_seed(t))
        half.grad, full.grad = g.to(dtype), g.to(dtype).float()
        a.step()
        b.step()
    assert half.dtype == dtype
    assert torch.equal(half, full.detach().to(dtype))
    saved = a.state_dict()
    assert torch.equal(saved["state"][0]["master"], full.detach())
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    again = torch.nn.Parameter(half.detach().clone())
    c = LearnedOptimizer([again], opt, lr=0.01)
    c.load_state_dict(torch.load(buffer, weights_only=True))
    for opt_, p in ((a, half), (c, again)):
        p.grad = torch.ones(6, 4, dtype=dtype)
        opt_.step()
    assert torch.equal(half, again)


def test_half_parameter_changed_outside_the_optimizer_rereads_its_master(opt):
    p = torch.nn.Parameter(torch.zeros(5, dtype=torch.bfloat16))
    optimizer = LearnedOptimizer([p], opt, lr=0.01)
    with torch.no_grad():
        p.copy_(torch.full((5,), 3.0))  # e.g. model.load_state_dict
    p.grad = torch.zeros(5, dtype=torch.bfloat16)
    optimizer.step()  # a zero first step: no move, so the master must be the new value
    assert torch.equal(p, torch.full((5,), 3.0, dtype=torch.bfloat16))


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


def test_guard_restores_on_a_blow_up_from_the_closure_and_survives_a_checkpoint(opt):
    """A closure whose loss turns NaN at step 5: the parameters go back bitwise to those of
    the last good step (the latest best loss: the snapshot), Adam runs the fallback, and a
    checkpoint taken in the middle of it (through torch.save / weights_only) continues
    identically."""
    from runtime.guard import GuardConfig

    config = GuardConfig(snapshot_every=1, fallback_steps=4, smoothing=0.0)

    def make():
        model = cnn()
        return model, LearnedOptimizer(model.parameters(), opt, lr=0.01, guard=config,
                                       guard_hook=None)  # fmt: skip

    def closure_for(model, optimizer, t, blow_up=False):
        def closure():
            optimizer.zero_grad()
            x, y = batch(t)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss * float("nan") if blow_up else loss

        return closure

    model, optimizer = make()
    seen, losses = [], []
    for t in range(5):
        seen.append([p.detach().clone() for p in model.parameters()])
        losses.append(float(optimizer.step(closure_for(model, optimizer, t)).detach()))
    assert optimizer.num_fallbacks == 0
    last_best = max(k for k in range(5) if losses[k] == min(losses[: k + 1]))
    optimizer.step(closure_for(model, optimizer, 5, blow_up=True))
    assert optimizer.num_fallbacks == 1
    restored = seen[last_best]
    assert all(torch.equal(a, b) for a, b in zip(restored, model.parameters(), strict=True))
    for t in range(6, 8):
        optimizer.step(closure_for(model, optimizer, t))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": optimizer.state_dict()}, buffer)
    for t in range(8, 14):  # the rest of the fallback, then learned steps again
        optimizer.step(closure_for(model, optimizer, t))
    assert optimizer.stepper.num_adam_steps == 4
    assert optimizer.stepper.num_steps == last_best + 4  # 2 learned steps after the fallback

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2, optimizer2 = make()
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["opt"])
    for t in range(8, 14):
        optimizer2.step(closure_for(model2, optimizer2, t))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(),
                                                   strict=True))  # fmt: skip
    assert optimizer2.num_fallbacks == 1


def test_guard_takes_the_loss_as_an_argument_too(opt):
    p = torch.nn.Parameter(torch.ones(4))
    optimizer = LearnedOptimizer([p], opt, guard=True, guard_hook=None)
    p.grad = torch.ones(4)
    optimizer.step(loss=torch.tensor(1.0))
    before = p.detach().clone()
    optimizer.step(loss=float("inf"))
    assert optimizer.num_fallbacks == 1 and torch.equal(p, torch.ones(4))
    assert not torch.equal(before, p)
    with pytest.raises(ValueError, match=r"^pass either a closure or a loss to step, not both"):
        optimizer.step(lambda: 1.0, loss=1.0)


def test_a_zero_lr_from_a_warm_up_advances_the_state_without_moving(opt):
    """LambdaLR warm-up from 0: the first step leaves the parameters as they were (bitwise)
    and advances the state as any step would (the state does not depend on lr)."""
    p, q = torch.nn.Parameter(torch.ones(6)), torch.nn.Parameter(torch.ones(6))
    warm = LearnedOptimizer([p], opt, lr=0.01)
    plain = LearnedOptimizer([q], opt, lr=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(warm, lambda t: t / 2)
    p.grad = q.grad = torch.linspace(-1, 1, 6)
    warm.step()
    plain.step()
    schedule.step()
    assert torch.equal(p, torch.ones(6))
    a, b = warm.stepper.state_dict()["state"], plain.stepper.state_dict()["state"]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    warm.step()
    assert not torch.equal(p, torch.ones(6))
