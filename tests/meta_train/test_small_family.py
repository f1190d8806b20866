"""The small family's optional members (convex problems, full-MNIST MLPs): off by default, so a
3-weight config draws the same tasks and keeps its digest; on, they build the tasks they name."""

import math

import pytest
import torch

from meta_train.ablation import ARMS
from meta_train.run_config import build_config, config_digest
from meta_train.tasks.heldout import LeastSquaresTask
from meta_train.tasks.small_family import (
    MODELS,
    ConvexObjectiveTask,
    SmallFamilyConfig,
    SmallTaskFamily,
)

WIDE = (0.2, 0.2, 0.2, 0.2, 0.2)


def test_the_default_family_draws_and_digests_as_before_the_new_members():
    family = SmallTaskFamily()
    # The digest the family had before the convex member existed (sessions 11–15's runs).
    assert family.digest() == "a0adf831dc36a8cfe29e5ed269337115ba9e8c2a56289cee6f6c461ad5879105"
    assert "convex_conditions" not in family.to_dict()
    drawn = [family.sample(seed) for seed in range(300)]
    assert {task.model for task in drawn} == {"mlp", "cnn", "lstm"}
    assert all("condition" not in task.to_dict() for task in drawn)
    # Spelling the same three weights out as five with two zeros changes no draw's model.
    padded = SmallTaskFamily(SmallFamilyConfig(model_weights=(0.6, 0.2, 0.2, 0.0, 0.0)))
    assert [padded.sample(s).model for s in range(300)] == [t.model for t in drawn]


def test_the_run_configs_identity_is_unchanged_by_the_new_field():
    before = build_config({"task": "small"})
    spelled = build_config({"task": "small", "family": {"convex_conditions": [10.0, 1e4]}})
    assert config_digest(spelled) == config_digest(before)
    other = build_config({"task": "small", "family": {"convex_conditions": [10.0, 1e3]}})
    assert config_digest(other) != config_digest(before)
    spelled = build_config({"task": "small", "family": {"mnist28_max_depth": 3}})
    assert config_digest(spelled) == config_digest(before)
    deeper = build_config({"task": "small", "family": {"mnist28_max_depth": 10}})
    assert config_digest(deeper) != config_digest(before)
    spelled = build_config({"task": "small", "family": {"convex_excess_floor": None}})
    assert config_digest(spelled) == config_digest(before)
    excess = build_config({"task": "small", "family": {"convex_excess_floor": 1e-5}})
    assert config_digest(excess) != config_digest(before)


def test_the_wide_family_draws_every_member_and_builds_it():
    family = SmallTaskFamily(SmallFamilyConfig(model_weights=WIDE, widths=(16,)))
    drawn = [family.sample(seed) for seed in range(60)]
    assert {task.model for task in drawn} == set(MODELS)
    for config in drawn:
        if config.model not in ("convex", "mnist28"):
            continue
        task = family.build(config)
        g = torch.Generator().manual_seed(0)
        params = task.init_params(g)
        loss, grad = task.loss_and_grad(params, task.sample_batch(g))
        assert math.isfinite(float(loss)) and torch.isfinite(grad).all()
        if config.model == "mnist28":
            assert 1 <= config.depth <= 3 and config.condition is None
            assert task.tensor_sizes[0] == 784 * 16  # the first layer reads all 28×28 pixels
        else:
            assert 10 <= config.condition <= 1e4
            inner = task.inner if isinstance(task, ConvexObjectiveTask) else task.inner.inner
            # Scored by the raw objective: never below the optimum the excess is measured from.
            assert float(inner.objective(params, *inner.sample_batch(g))) >= inner.optimum


def test_a_convex_task_is_scored_by_its_objective_not_the_excess():
    family = SmallTaskFamily(
        SmallFamilyConfig(model_weights=(0, 0, 0, 1, 0), reparam_probability=0.0)
    )
    config = family.sample(3)
    task = family.build(config)
    assert isinstance(task, ConvexObjectiveTask)
    params = task.init_params(torch.Generator().manual_seed(1))
    batch = task.sample_batch(torch.Generator())
    assert float(task.loss(params, batch)) == pytest.approx(
        float(task.inner.loss(params, batch)) + task.inner.optimum, rel=1e-6
    )
    # The task is the config's: the same seed builds the same design.
    again = family.build(family.sample(3))
    assert torch.equal(again.inner.features, task.inner.features)


def test_a_convex_task_with_an_excess_floor_is_scored_by_its_floored_excess():
    weights = (0, 0, 0, 1, 0)
    plain = SmallTaskFamily(SmallFamilyConfig(model_weights=weights, reparam_probability=0.0))
    floored = SmallTaskFamily(
        SmallFamilyConfig(model_weights=weights, reparam_probability=0.0, convex_excess_floor=1e-5)
    )
    assert "convex_excess_floor" not in plain.to_dict()
    assert floored.to_dict()["convex_excess_floor"] == 1e-5 and floored.digest() != plain.digest()
    kinds = set()
    for seed in range(6):  # both kinds (least squares, logistic regression), several sizes
        config = floored.sample(seed)
        assert config == plain.sample(seed)  # the knob changes the score, never a draw
        task = floored.build(config)
        assert isinstance(task, ConvexObjectiveTask)
        kinds.add(type(task.inner).__name__)
        batch = task.sample_batch(torch.Generator())
        params = task.init_params(torch.Generator().manual_seed(seed))
        loss = float(task.loss(params, batch))
        assert loss == pytest.approx(float(task.inner.loss(params, batch)) + 1e-5, rel=1e-5)
        assert loss > 1e-3  # a random start is far from the optimum
        # At the float64 optimum the score is the floor, whatever fp32 rounding does to f − f*.
        features, targets = (x.double() for x in batch)
        if isinstance(task.inner, LeastSquaresTask):
            w = torch.linalg.lstsq(features, targets.unsqueeze(1)).solution.squeeze(1)
            assert float(task.loss(w.float(), batch)) == pytest.approx(1e-5, rel=1e-2)
        # Its gradient is the objective's wherever the excess is positive.
        scored, objective = params.clone().requires_grad_(True), params.clone().requires_grad_(True)
        task.loss(scored, batch).backward()
        task.inner.objective(objective, *batch).backward()
        assert torch.allclose(scored.grad, objective.grad)
    assert kinds == {"LeastSquaresTask", "LogisticRegressionTask"}


def test_deeper_28x28_mlps_change_no_other_draw_and_build_at_every_depth():
    weights = (0.15, 0.05, 0.25, 0.2, 0.35)
    shallow = SmallTaskFamily(SmallFamilyConfig(model_weights=weights))
    deep = SmallTaskFamily(SmallFamilyConfig(model_weights=weights, mnist28_max_depth=10))
    assert "mnist28_max_depth" not in shallow.to_dict()
    assert deep.to_dict()["mnist28_max_depth"] == 10 and deep.digest() != shallow.digest()
    # Spelling out the default changes nothing: not the digest, not a draw.
    spelled = SmallTaskFamily(SmallFamilyConfig(model_weights=weights, mnist28_max_depth=3))
    assert spelled.digest() == shallow.digest()
    pairs = [(shallow.sample(seed), deep.sample(seed)) for seed in range(400)]
    assert all(s == spelled.sample(i) for i, (s, _) in enumerate(pairs[:50]))
    # Every task but the 28×28 MLPs is drawn exactly as before (their extra draw is their own).
    assert all(s == d for s, d in pairs if s.model != "mnist28")
    depths = {d.depth for _, d in pairs if d.model == "mnist28"}
    assert depths == set(range(1, 11))
    assert max(s.depth for s, _ in pairs if s.model == "mnist28") == 3
    config = next(d for _, d in pairs if d.model == "mnist28" and d.depth == 10)
    task = deep.build(config)
    g = torch.Generator().manual_seed(0)
    loss, grad = task.loss_and_grad(task.init_params(g), task.sample_batch(g))
    assert math.isfinite(float(loss)) and torch.isfinite(grad).all()
    assert len(task.tensor_sizes) == 2 * (10 + 1) + 2 * 10 * config.layernorm


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mnist28_max_depth": 0}, "mnist28_max_depth must be"),
        ({"convex_excess_floor": 0.0}, "convex_excess_floor must be"),
        ({"convex_excess_floor": -1e-5}, "convex_excess_floor must be"),
        ({"convex_excess_floor": math.inf}, "convex_excess_floor must be"),
        ({"convex_excess_floor": math.nan}, "convex_excess_floor must be"),
        ({"convex_excess_floor": True}, "convex_excess_floor must be"),
        ({"convex_excess_floor": "1e-5"}, "convex_excess_floor must be"),
        ({"mnist28_max_depth": 2.5}, "mnist28_max_depth must be"),
        ({"mnist28_max_depth": True}, "mnist28_max_depth must be"),
        ({"model_weights": (1, 1, 1, 1)}, "model_weights needs 3 or 5 weights"),
        ({"model_weights": (1, 1, 1, 1, -1)}, "model_weights needs 3 or 5 weights"),
        ({"convex_conditions": (1e4, 10)}, "convex_conditions must be"),
        ({"convex_conditions": (0.5, 10)}, "convex_conditions must be"),
        ({"convex_conditions": (10,)}, "convex_conditions must be"),
        ({"convex_conditions": (10, math.inf)}, "convex_conditions must be"),
        ({"convex_conditions": (True, 10)}, "convex_conditions must be"),
    ],
)
def test_bad_family_fields_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        SmallFamilyConfig(**fields)


def test_the_wide_arms_train_the_wide_family():
    for name in ("cells", "schedule"):
        arm = ARMS[f"tensor-trend-annealed-wide-log-pes10k-{name}"]
        config = arm.run_config()
        assert config.task == "small" and len(config.family.model_weights) == len(MODELS)
        assert config.experimental.horizons.max_steps == 10000
        assert config.experimental.estimator.sigma == 0.003
