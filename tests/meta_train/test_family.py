"""The meta-training task family: validated configs, seeded sampling, building, lineage digest."""

import dataclasses
import json

import pytest
import torch

from meta_train import config as config_lib
from meta_train.seeding import generator
from meta_train.tasks import (
    DM_FAMILY,
    HYPERADAM_FAMILY,
    RNNPROP_FAMILY,
    CNNTask,
    FamilyMix,
    MetaTaskConfig,
    MetaTaskFamily,
    MetaTaskFamilyConfig,
    MixedTask,
    SineLSTMTask,
)

# sha256 of the default family's canonical JSON. It is the task-distribution digest logged with
# every run: if this changes, the lineage of every earlier run changes meaning. Change it only
# together with FAMILY_VERSION.
DEFAULT_DIGEST = "80f660c6200530210b38dbc1594870ec9945487f9de19eb0e434a86b96d8ba90"
# The family of the shipped HyperAdam θ (four activations, no tricks), as its lineage records it.
SHIPPED_MIX_DIGEST = "a3fe29dc0b03e70b65d19c267c9a4515e4ce20653f2831503178bcbd95b9f2ca"
ACTIVATIONS = ("sigmoid", "relu", "elu", "tanh")


def test_defaults_are_the_hyperadam_recipe():
    cfg = MetaTaskFamilyConfig()
    assert (cfg.dataset, cfg.hidden, cfg.depth, cfg.activation, cfg.batch_size) == (
        "mnist",
        20,
        1,
        "sigmoid",
        128,
    )
    assert cfg.random_scaling and cfg.convex
    assert (cfg.num_convex, cfg.log_scale_w, cfg.log_scale_z) == (20, 3.0, 1.0)
    assert HYPERADAM_FAMILY == RNNPROP_FAMILY == cfg  # spec §3.1 and §7.2 use the same tricks
    assert not DM_FAMILY.random_scaling and not DM_FAMILY.convex  # spec §7.1: no tricks


CONFIG_ERRORS = [
    ({"depth": 0}, r"depth must be in 1\.\.10, got 0"),
    ({"depth": 11}, r"depth must be in 1\.\.10, got 11"),
    ({"depth": 2.0}, r"depth must be an int, got 2\.0"),
    ({"depth": True}, r"depth must be an int, got True"),
    ({"hidden": 0}, r"hidden must be >= 1, got 0"),
    ({"batch_size": -5}, r"batch_size must be >= 1, got -5"),
    ({"num_convex": 0}, r"num_convex must be >= 1, got 0"),
    ({"activation": "gelu"}, r"activation must be one of \('sigmoid', 'relu', 'elu', 'tanh'\)"),
    ({"dataset": "cifar10"}, r"dataset must be one of \('mnist',\), got 'cifar10'"),
    ({"random_scaling": 1}, r"random_scaling must be a bool, got 1"),
    ({"convex": "yes"}, r"convex must be a bool, got 'yes'"),
    ({"log_scale_w": -1.0}, r"log_scale_w must be a number >= 0, got -1\.0"),
    ({"log_scale_z": float("nan")}, r"log_scale_z must be a number >= 0, got nan"),
]


@pytest.mark.parametrize(("kwargs", "message"), CONFIG_ERRORS, ids=lambda x: str(x))
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MetaTaskFamilyConfig(**kwargs)


def test_int_and_float_log_scales_are_one_setting():
    assert MetaTaskFamilyConfig(log_scale_w=3) == MetaTaskFamilyConfig()
    assert MetaTaskFamily(MetaTaskFamilyConfig(log_scale_w=3)).digest() == DEFAULT_DIGEST


def test_sample_is_deterministic_hashable_and_seed_dependent():
    family = MetaTaskFamily()
    a, b, c = family.sample(7), family.sample(7), family.sample(8)
    assert a == b and hash(a) == hash(b) and len({a, b, c}) == 2
    assert a.trick_seed != c.trick_seed and a.trick_seed != a.seed
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.depth = 2


def test_config_round_trips_through_json():
    cfg = MetaTaskFamily(MetaTaskFamilyConfig(depth=3, activation="relu")).sample(123)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert MetaTaskConfig.from_dict(data) == cfg
    with pytest.raises(ValueError, match=r"unknown MetaTaskConfig fields: colour"):
        MetaTaskConfig.from_dict({**data, "colour": "red"})


@pytest.mark.parametrize("seed", [-1, 1.5, True, "3"], ids=["negative", "float", "bool", "str"])
def test_sample_rejects_bad_seeds(seed):
    with pytest.raises(ValueError, match=r"seed must be a non-negative int, got"):
        MetaTaskFamily().sample(seed)


def test_build_gives_the_mixed_task_of_the_config():
    family = MetaTaskFamily()
    cfg = family.sample(5)
    task = family.build(cfg)
    assert isinstance(task, MixedTask) and task.num_params == 15_910 + 20
    assert task.seed == cfg.trick_seed and task.random_scaling and task.convex
    again = family.build(family.sample(5))
    assert torch.equal(task.c1, again.c1) and torch.equal(task.eta, again.eta)
    assert not torch.equal(task.c1, family.build(family.sample(6)).c1)
    params = task.init_params(generator(5, 0))
    loss, grad = task.loss_and_grad(params, task.sample_batch(generator(5, 1, 0)))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_dm_recipe_builds_the_plain_mlp_problem():
    family = MetaTaskFamily(DM_FAMILY)
    task = family.build(family.sample(0))
    assert task.num_params == 15_910 and torch.equal(task.c1, torch.ones(15_910))


def test_build_respects_the_family_settings():
    family = MetaTaskFamily(MetaTaskFamilyConfig(depth=3, activation="tanh", num_convex=5))
    task = family.build(family.sample(1))
    assert task.inner.depth == 3 and task.inner.activation == "tanh"
    assert task.num_params == 15_910 + 2 * 420 + 5


def test_build_rejects_other_configs():
    with pytest.raises(TypeError, match=r"expected a MetaTaskConfig, got dict"):
        MetaTaskFamily().build({"seed": 1})


def test_digest_is_stable_and_tracks_the_config():
    family = MetaTaskFamily()
    assert family.digest() == DEFAULT_DIGEST
    assert family.digest() == config_lib.digest(family.to_dict())
    assert MetaTaskFamily(data_dir="/elsewhere").digest() == DEFAULT_DIGEST  # a location only
    assert MetaTaskFamily(DM_FAMILY).digest() != DEFAULT_DIGEST
    json.dumps(family.to_dict())  # JSON-ready


def test_family_round_trips_through_to_dict():
    family = MetaTaskFamily(MetaTaskFamilyConfig(depth=4, convex=False))
    again = MetaTaskFamily.from_dict(json.loads(json.dumps(family.to_dict())))
    assert again.config == family.config and again.digest() == family.digest()
    with pytest.raises(ValueError, match=r"expected family 'mnist-mlp-mixed' version 1"):
        MetaTaskFamily.from_dict({**family.to_dict(), "version": 2})
    with pytest.raises(ValueError, match=r"unknown MetaTaskFamilyConfig fields: width"):
        MetaTaskFamilyConfig.from_dict({"width": 3})


def test_an_activation_mix_draws_one_activation_per_task_from_its_seed():
    mix = ACTIVATIONS
    family = MetaTaskFamily(mix=FamilyMix(activation=list(mix)))  # a config file's list
    assert family.mix.activation == mix and family.config == MetaTaskFamilyConfig()
    drawn = [family.sample(seed).activation for seed in range(40)]
    assert drawn == [family.sample(seed).activation for seed in range(40)]
    assert set(drawn) == set(mix)
    task = family.sample(3)
    assert isinstance(task.activation, str)
    assert task.trick_seed == MetaTaskFamily().sample(3).trick_seed  # same seeds as ever
    assert family.build(task).inner.activation == task.activation
    # The mix is part of the task distribution, so of its digest; one activation is no mix.
    assert family.digest() != DEFAULT_DIGEST
    assert MetaTaskFamily(MetaTaskFamilyConfig(activation=["sigmoid"])).digest() == DEFAULT_DIGEST


@pytest.mark.parametrize(
    ("mix", "message"),
    [([], r"activation: a mix needs two or more values .*got \[\]"),
     (["relu"], r"activation: a mix needs two or more values \(one is the family's activation\)"),
     ("relu", r"activation: a mix needs two or more values"),
     (["relu", "relu"], r"activation: a mix needs distinct values"),
     (["relu", "gelu"], r"activation must be one of .*got 'gelu'")],
)
def test_bad_activation_mixes_are_refused(mix, message):
    with pytest.raises(ValueError, match=message):
        FamilyMix(activation=mix)


def test_the_paper_family_config_holds_no_mix():
    """Several values are an experiment: the plain config refuses them and says where they go."""
    with pytest.raises(ValueError, match=r"activation: several values are a mix, an experiment: "
                       r"give them as experimental.family_mix.activation"):
        MetaTaskFamilyConfig(activation=["relu", "elu"])
    with pytest.raises(ValueError, match=r"depth: several values .* experimental.family_mix.depth"):
        MetaTaskFamilyConfig(depth=(1, 2))
    for name in ("model", "lstm_layers", "noise_std"):
        assert name not in {f.name for f in dataclasses.fields(MetaTaskFamilyConfig)}
    with pytest.raises(ValueError, match=r"unknown MetaTaskFamilyConfig fields: model"):
        MetaTaskFamilyConfig.from_dict({"model": "lstm"})
    # A mix replaces the family's setting; both given is refused, not one silently ignored.
    with pytest.raises(ValueError, match=r"family.depth = 3 and experimental.family_mix.depth "
                       r"are both given; .* leave family.depth at 1"):
        MetaTaskFamily(MetaTaskFamilyConfig(depth=3), mix=FamilyMix(depth=(1, 2)))
    # A mix of nothing is the paper's family.
    assert MetaTaskFamily(mix=FamilyMix()).mix is None
    assert MetaTaskFamily(mix=FamilyMix(model=["mlp"], noise_std=1e-1)).digest() == DEFAULT_DIGEST


def test_a_family_written_with_its_mixes_in_the_config_loads_with_the_same_digest():
    """The family's plain data keeps the layout of before the mixes moved (settings and mixes in
    one table): recorded digests verify, and such data loads into config and mix."""
    old = {"family": "mnist-mlp-mixed", "version": 1, "config": {
        "activation": list(ACTIVATIONS), "batch_size": 128, "convex": False, "dataset": "mnist",
        "depth": 1, "hidden": 20, "log_scale_w": 3.0, "log_scale_z": 1.0, "num_convex": 20,
        "random_scaling": False}}
    assert config_lib.digest(old) == SHIPPED_MIX_DIGEST
    family = MetaTaskFamily.from_dict(old)
    assert family.config == DM_FAMILY  # no tricks, one sigmoid MLP
    assert family.mix == FamilyMix(activation=ACTIVATIONS)
    assert family.to_dict() == old and family.digest() == SHIPPED_MIX_DIGEST
    built = MetaTaskFamily(DM_FAMILY, mix=FamilyMix(activation=ACTIVATIONS))
    assert built.digest() == SHIPPED_MIX_DIGEST
    every = MetaTaskFamily(mix=FamilyMix(model=("mlp", "lstm"), activation=("relu", "elu"),
                                         depth=(1, 3), lstm_layers=2, noise_std=(0.1, 0.01)))
    plain = every.to_dict()["config"]
    assert plain["model"] == ["mlp", "lstm"] and plain["depth"] == [1, 3]
    assert plain["lstm_layers"] == 2 and plain["noise_std"] == [0.1, 0.01]
    again = MetaTaskFamily.from_dict(json.loads(json.dumps(every.to_dict())))
    assert (again.config, again.mix) == (every.config, every.mix)
    assert again.digest() == every.digest()


def test_a_model_mix_draws_sine_lstms_beside_the_mlp():
    family = MetaTaskFamily(
        MetaTaskFamilyConfig(convex=False),
        mix=FamilyMix(model=["mlp", "lstm"], lstm_layers=[1, 2], noise_std=[0.1, 0.01]),
    )
    tasks = [family.sample(seed) for seed in range(60)]
    assert tasks == [family.sample(seed) for seed in range(60)]
    assert {t.model for t in tasks} == {"mlp", "lstm"}
    lstms = [t for t in tasks if t.model == "lstm"]
    drawn = {(t.lstm_layers, t.noise_std) for t in lstms}
    assert drawn == {(1, 0.1), (1, 0.01), (2, 0.1), (2, 0.01)}
    built = family.build(lstms[0])
    assert isinstance(built.inner, SineLSTMTask)
    assert (built.inner.num_layers, built.inner.noise_std) == (lstms[0].lstm_layers,
                                                               lstms[0].noise_std)
    assert built.num_params == (1781 if lstms[0].lstm_layers == 1 else 5061)
    mlp = next(t for t in tasks if t.model == "mlp")
    assert family.build(mlp).inner.activation == "sigmoid"
    # Each setting is drawn from its own stream: the activation a seed picks is unchanged.
    mixed = MetaTaskFamily(mix=FamilyMix(model=["mlp", "lstm"], activation=["relu", "elu"]))
    alone = MetaTaskFamily(mix=FamilyMix(activation=["relu", "elu"]))
    assert [mixed.sample(s).activation for s in range(20)] == [
        alone.sample(s).activation for s in range(20)
    ]


@pytest.mark.parametrize(("model", "num_params"), [("cnn1", 33_850), ("cnn2", 117_434)])
def test_the_family_builds_the_mnist_cnns(model, num_params):
    family = MetaTaskFamily(
        MetaTaskFamilyConfig(convex=False, batch_size=8), mix=FamilyMix(model=model)
    )
    task = family.build(family.sample(4))
    assert isinstance(task.inner, CNNTask) and task.inner.arch == model
    assert task.num_params == num_params
    params = task.init_params(generator(0))
    loss, grad = task.loss_and_grad(params, task.sample_batch(generator(1)))
    assert grad.shape == params.shape and torch.isfinite(loss) and grad.abs().sum() > 0


def test_settings_added_later_keep_the_paper_familys_digest():
    plain = MetaTaskFamily().to_dict()["config"]
    assert not {"model", "lstm_layers", "noise_std"} & set(plain)
    assert MetaTaskFamily(mix=FamilyMix(model="mlp", lstm_layers=[1], noise_std=1e-1)
                          ).digest() == DEFAULT_DIGEST
    lstm = MetaTaskFamily(mix=FamilyMix(model="lstm"))
    assert lstm.to_dict()["config"]["model"] == "lstm" and lstm.digest() != DEFAULT_DIGEST
    again = MetaTaskFamily.from_dict(json.loads(json.dumps(lstm.to_dict())))
    assert (again.config, again.mix) == (lstm.config, lstm.mix)


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"model": "cnn"}, r"model must be one of \('mlp', 'lstm', 'cnn1', 'cnn2'\), got 'cnn'"),
     ({"model": ["mlp", "mlp"]}, r"model: a mix needs distinct values"),
     ({"lstm_layers": 0}, r"lstm_layers must be an int >= 1, got 0"),
     ({"lstm_layers": [1, True]}, r"lstm_layers must be an int >= 1, got True"),
     ({"noise_std": -0.1}, r"noise_std must be a number >= 0, got -0.1"),
     ({"noise_std": [0.1, 0.1]}, r"noise_std: a mix needs distinct values")],
)
def test_bad_model_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        FamilyMix(**settings)


def test_a_depth_mix_draws_deeper_mlps():
    family = MetaTaskFamily(MetaTaskFamilyConfig(convex=False), mix=FamilyMix(depth=[1, 3, 5]))
    drawn = [family.sample(seed).depth for seed in range(30)]
    assert set(drawn) == {1, 3, 5}
    task = family.sample(drawn.index(5))
    assert family.build(task).inner.depth == 5
    assert MetaTaskFamily(MetaTaskFamilyConfig(depth=[1])).digest() == DEFAULT_DIGEST
    with pytest.raises(ValueError, match=r"depth must be in 1\.\.10, got 11"):
        FamilyMix(depth=[2, 11])


def test_every_family_digests_through_the_one_base_method():
    from meta_train.smoke_family import QuadraticFamily, QuadraticFamilyConfig
    from meta_train.tasks.base import TaskFamily

    class Listed(TaskFamily):  # the least a family must define
        def sample(self, seed):
            raise NotImplementedError

        def build(self, config):
            raise NotImplementedError

        def to_dict(self):
            return {"family": "listed", "version": 1}

    assert Listed().digest() == config_lib.digest({"family": "listed", "version": 1})
    quadratic = QuadraticFamily(QuadraticFamilyConfig())
    assert quadratic.digest() == config_lib.digest(quadratic.to_dict())
    for family in (MetaTaskFamily, QuadraticFamily):
        assert "digest" not in vars(family)  # no copy that could drift
