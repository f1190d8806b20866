"""The single-process meta-training loop on the real meta-training problem (spec §3)."""

import pytest
import torch

from meta_train.experimental import ExperimentalConfig
from meta_train.optimizers import make_learned_optimizer
from meta_train.tasks.family import DM_FAMILY, HYPERADAM_FAMILY, RNNPROP_FAMILY, MetaTaskFamily
from meta_train.training import MetaOptimConfig, position, task_seed, train_local
from meta_train.unroll import UnrollConfig

RECIPES = {  # optimizer → (task family, meta-loss), spec §3 and §7
    "hyperadam": (HYPERADAM_FAMILY, "mean"),
    "rnnprop": (RNNPROP_FAMILY, "last"),
    "dm": (DM_FAMILY, "mean"),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_few_meta_updates_move_theta_deterministically(name):
    family_config, meta_loss = RECIPES[name]
    optimizer = make_learned_optimizer(name)
    family = MetaTaskFamily(family_config)
    unroll = UnrollConfig(horizon=4, truncation=2, meta_loss=meta_loss)
    kwargs = dict(steps=3, run_seed=5, unroll=unroll, meta_optim=MetaOptimConfig(lr=1e-3))
    theta, history = train_local(optimizer, family, **kwargs)
    again, _ = train_local(optimizer, family, **kwargs)
    assert torch.equal(theta, again)
    assert len(history) == 3 and all(h["rejected"] == 0 for h in history)
    assert all(torch.isfinite(torch.tensor(h["meta_loss"])) for h in history)
    from meta_train.training import init_theta_flat

    start = init_theta_flat(optimizer, 5)
    moved = (theta - start).abs()
    # Three Adam steps move each coordinate by about lr each (a little more once moments differ).
    assert moved.max() <= 3.5e-3 and (moved > 0).float().mean() > 0.5


def test_meta_batch_slots_run_their_own_trajectories():
    unroll = UnrollConfig(horizon=100, truncation=20)
    assert position(0, unroll) == (0, 0) and position(4, unroll) == (0, 4)
    assert position(5, unroll) == (1, 0)
    seeds = {task_seed(0, slot, traj) for slot in range(3) for traj in range(3)}
    assert len(seeds) == 9


def test_training_arguments_are_validated():
    optimizer = make_learned_optimizer("hyperadam")
    family = MetaTaskFamily()
    with pytest.raises(ValueError, match="steps must be >= 0, got -1"):
        train_local(optimizer, family, steps=-1, run_seed=0)
    with pytest.raises(ValueError, match="meta_batch must be >= 1, got 0"):
        train_local(optimizer, family, steps=1, run_seed=0, meta_batch=0)
    with pytest.raises(ValueError, match="meta lr must be > 0, got 0"):
        MetaOptimConfig(lr=0)


def test_a_meta_lr_half_life_decays_the_step_size():
    config = ExperimentalConfig(meta_lr_half_life=2)
    assert [config.meta_lr_at(1e-3, k) for k in (0, 2, 4)] == [1e-3, 5e-4, 2.5e-4]
    assert ExperimentalConfig().meta_lr_at(1e-3, 10_000) == 1e-3  # the paper: constant
    optimizer = make_learned_optimizer("hyperadam")
    family = MetaTaskFamily(HYPERADAM_FAMILY)
    unroll = UnrollConfig(horizon=4, truncation=2)

    def theta_after(steps, half_life):
        theta, _ = train_local(
            optimizer,
            family,
            steps=steps,
            run_seed=5,
            unroll=unroll,
            meta_optim=MetaOptimConfig(lr=1e-3),
            experimental=ExperimentalConfig(meta_lr_half_life=half_life),
        )
        return theta

    # A half-life of 1/100 step leaves the first step at lr and the later ones at ~1e-33.
    one = theta_after(1, 0.01)
    torch.testing.assert_close(theta_after(3, 0.01), one, rtol=0, atol=1e-12)
    assert (theta_after(3, None) - one).abs().max() > 1e-4


@pytest.mark.parametrize("half_life", [0, -1, float("inf"), True, "10"])
def test_a_bad_half_life_is_refused(half_life):
    with pytest.raises(ValueError, match="meta_lr_half_life must be (a number > 0|finite)"):
        ExperimentalConfig(meta_lr_half_life=half_life)
