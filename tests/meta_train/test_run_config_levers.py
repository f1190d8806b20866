"""Issue 15's levers as RunConfig fields: variant, family, meta-loss, estimator, horizons.

Their defaults leave every recorded identity and digest as it was; each non-default value is part
of the identity, builds what it names, and a bad value is refused with its field's name.
"""

import json

import pytest

from meta_train.experimental import EstimatorConfig, ExperimentalConfig, HorizonConfig
from meta_train.optimizers.hyperadam import HyperAdam
from meta_train.optimizers.hyperadam_tensor import TensorwiseHyperAdam
from meta_train.run_config import (
    RunConfig,
    build_config,
    config_digest,
    identity,
    load_config_file,
)
from meta_train.tasks.small_family import SmallFamilyConfig, SmallTaskFamily

PES = {"kind": "pes", "sigma": 0.05, "pairs": 2}
LOG_UNIFORM = {"kind": "log_uniform", "min_steps": 100, "max_steps": 2000, "offsets": True}
LEVERS = [
    {"experimental": {"variant": "tensor"}},
    {"experimental": {"variant": "tensor-unbounded"}},
    {"experimental": {"variant": "tensor-trend-annealed"}},
    {"experimental": {"variant": "tensor-trend-annealed", "frozen": ["scale_rate"]}},
    {"task": "small"},
    {"unroll": {"meta_loss": "log"}},
    {"experimental": {"estimator": PES}},
    {"experimental": {"estimator": {"kind": "pes"}}},
    {"experimental": {"horizons": LOG_UNIFORM}},
]


def test_the_defaults_leave_the_identity_as_it_was():
    plain = identity(build_config({}))
    assert set(plain["experimental"]) == {
        "adam_start", "pre_kernel_scale", "meta_lr_half_life", "validation_score"
    }  # fmt: skip
    spelled_out = build_config(
        {"experimental": {"variant": "paper", "estimator": {"kind": "tbptt", "sigma": 0.01},
                          "horizons": {"kind": "fixed"}}}  # fmt: skip
    )
    assert config_digest(spelled_out) == config_digest(build_config({}))
    assert config_digest(spelled_out, schema=1) == config_digest(build_config({}), schema=1)


@pytest.mark.parametrize("lever", LEVERS, ids=json.dumps)
def test_each_lever_is_part_of_the_identity_and_survives_a_round_trip(lever, tmp_path):
    config = build_config(lever)
    assert config_digest(config) != config_digest(build_config({}))
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config.to_dict()))
    again = build_config(load_config_file(path))
    assert again == config and config_digest(again) == config_digest(config)
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_the_variant_builds_that_hyperadam():
    assert isinstance(build_config({}).make_optimizer(), HyperAdam)
    tensor = build_config({"experimental": {"variant": "tensor"}, "num_candidates": 4})
    optimizer = tensor.make_optimizer()
    assert isinstance(optimizer, TensorwiseHyperAdam) and optimizer.bounded
    assert optimizer.num_candidates == 4 and optimizer.name == "hyperadam-tensor"
    unbounded = build_config({"experimental": {"variant": "tensor-unbounded"}}).make_optimizer()
    assert isinstance(unbounded, TensorwiseHyperAdam) and not unbounded.bounded
    for variant, name in [
        ("tensor-adaptive", "hyperadam-tensor-adaptive"),
        ("tensor-trend", "hyperadam-tensor-trend"),
        ("tensor-trend-annealed", "hyperadam-tensor-trend-annealed"),
    ]:
        scaled = build_config({"experimental": {"variant": variant}}).make_optimizer()
        assert scaled.name == name and scaled.adaptive_scale
        assert scaled.anneal_rate == (variant == "tensor-trend-annealed")


def test_task_small_builds_the_small_family_from_its_own_section():
    config = build_config({"task": "small", "family": {"max_depth": 2, "widths": [16]}})
    assert config.family == SmallFamilyConfig(max_depth=2, widths=(16,))
    family = config.make_family()
    assert isinstance(family, SmallTaskFamily) and family.config == config.family
    assert build_config({"task": "small"}).family == SmallFamilyConfig()


def test_the_log_meta_loss_is_the_unrolls():
    assert build_config({"unroll": {"meta_loss": "log"}}).unroll.meta_loss == "log"


BAD = [
    ({"experimental": {"variant": "tensorwise"}}, "experimental.variant must be one of"),
    ({"optimizer": "rnnprop", "experimental": {"variant": "tensor"}},
     "experimental.variant applies to hyperadam only, not rnnprop"),
    ({"experimental": {"variant": "tensor"}, "batch_slots": True,
      "implementation": "reference"}, "variant 'tensor' has no batched step"),
    ({"experimental": {"variant": "tensor", "adam_start": {"lr": 0.05}}},
     r"adam_start.lr must be < 0.03 with variant 'tensor'"),
    ({"experimental": {"variant": "tensor-trend", "adam_start": {"lr": 0.05}}},
     r"adam_start.lr must be < 0.03 with variant 'tensor-trend'"),
    ({"task": "tiny"}, "unknown task 'tiny'; known: mnist, quadratic, small"),
    ({"task": "small", "family": {"widths": [16], "hidden": 3}},
     r"unknown config field\(s\): family.hidden"),
    ({"task": "small", "family": {"reparam_probability": 2}},
     r"family: reparam_probability must be a probability in \[0, 1\]"),
    ({"task": "small", "family": {"batch_size": 0}}, "family: batch_size must be an integer"),
    ({"unroll": {"meta_loss": "logmean"}}, "meta_loss must be one of"),
    ({"experimental": {"estimator": {"kind": "es"}}}, "experimental.estimator.kind must be one"),
    ({"experimental": {"estimator": {"kind": "pes", "sigma": 0}}},
     "experimental.estimator.sigma must be a number > 0"),
    ({"experimental": {"estimator": {"kind": "pes", "sigma": float("inf")}}},
     "experimental.estimator.sigma must be finite"),
    ({"experimental": {"estimator": {"kind": "pes", "pairs": 0}}},
     "experimental.estimator.pairs must be an integer >= 1"),
    ({"experimental": {"estimator": {"sigma": 0.1}}}, "apply to kind 'pes' only, not 'tbptt'"),
    ({"experimental": {"estimator": {"kind": "pes", "antithetic": True}}},
     r"unknown config field\(s\): experimental.estimator.antithetic"),
    ({"experimental": {"estimator": "pes"}}, "experimental.estimator must be a table"),
    ({"experimental": {"estimator": PES}, "batch_slots": True, "implementation": "reference"},
     "experimental.estimator.kind 'pes' is not supported by batched workers"),
    ({"experimental": {"horizons": LOG_UNIFORM}, "device": "cuda",
      "implementation": "reference"},
     "experimental.horizons.kind 'log_uniform' is not supported by batched workers"),
    ({"experimental": {"horizons": {"kind": "log_uniform", "min_steps": 5, "max_steps": 15}}},
     r"no multiple of unroll.truncation \(20\) lies between min_steps \(5\) and max_steps"),
    ({"experimental": {"horizons": {"kind": "fixed", "max_steps": 200}}},
     "apply to kind 'log_uniform' only"),
    ({"experimental": {"variant": "tensor", "frozen": ["scale_rate"]}},
     r"experimental.frozen: hyperadam-tensor has no θ entries scale_rate"),
    ({"experimental": {"frozen": "weight_bias"}}, "experimental.frozen must be a list"),
]


@pytest.mark.parametrize(("data", "message"), BAD, ids=lambda x: str(x)[:60])
def test_bad_lever_values_are_refused_with_their_fields_name(data, message):
    with pytest.raises(ValueError, match=message):
        build_config(data)


def test_the_experimental_dataclasses_take_tables_or_themselves():
    given = ExperimentalConfig(estimator=EstimatorConfig("pes"), horizons=HorizonConfig())
    assert ExperimentalConfig(estimator={"kind": "pes"}, horizons={}) == given
