"""RunConfig: recipes per optimizer, config files, validation messages, resume identity."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from meta_train.run_config import (
    MUTABLE_ON_RESUME,
    SCHEMA_VERSION,
    RunConfig,
    build_config,
    config_digest,
    identity,
    identity_mismatches,
    identity_params,
    load_config_file,
)
from meta_train.smoke_family import QuadraticFamilyConfig
from meta_train.tasks.family import DM_FAMILY, HYPERADAM_FAMILY, RNNPROP_FAMILY


@pytest.mark.parametrize(
    "optimizer, meta_loss, family",
    [("hyperadam", "mean", HYPERADAM_FAMILY), ("rnnprop", "last", RNNPROP_FAMILY),
     ("dm", "mean", DM_FAMILY)],
)
def test_the_optimizer_chooses_its_recipe(optimizer, meta_loss, family):
    config = build_config({"optimizer": optimizer})
    assert config.unroll.meta_loss == meta_loss
    assert config.family == family
    assert (config.unroll.horizon, config.unroll.truncation) == (100, 20)
    assert config.meta_optim.lr == 1e-4 and config.meta_optim.clip_norm is None
    assert config.make_optimizer().name == optimizer


def test_layers_override_the_recipe_field_by_field():
    config = build_config({"optimizer": "rnnprop"}, {"unroll": {"horizon": 40}}, {"steps": 7})
    assert config.unroll.horizon == 40 and config.unroll.meta_loss == "last"
    assert config.steps == 7
    assert build_config({"task": "quadratic"}).family == QuadraticFamilyConfig()


def test_round_trip_and_resolution():
    config = build_config({"task": "quadratic", "seed": 4})
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    resolved = config.resolve(cpus=3)
    assert (resolved.workers, resolved.meta_batch) == (3, 3)
    fixed = dataclasses.replace(config, meta_batch=2, workers=5).resolve(cpus=8)
    assert (fixed.workers, fixed.meta_batch) == (2, 2)  # never more workers than slots


def test_config_files_json_and_toml(tmp_path):
    (tmp_path / "a.toml").write_text('optimizer = "dm"\nsteps = 3\n[unroll]\nhorizon = 40\n')
    (tmp_path / "a.json").write_text('{"optimizer": "dm", "steps": 3, "unroll": {"horizon": 40}}')
    assert load_config_file(tmp_path / "a.toml") == load_config_file(tmp_path / "a.json")
    assert build_config(load_config_file(tmp_path / "a.toml")).unroll.horizon == 40
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config file '.*b.json' is not valid: "):
        load_config_file(tmp_path / "b.json")


BAD = [
    ({"optimizer": "adam"}, "unknown optimizer 'adam'; known: hyperadam, rnnprop, dm"),
    ({"task": "cifar"}, "unknown task 'cifar'; known: mnist, quadratic"),
    ({"steps": -1}, "steps must be >= 0, got -1"),
    ({"steps": "ten"}, "steps must be an integer, got 'ten'"),
    ({"meta_batch": 0}, "meta_batch must be >= 1, got 0"),
    ({"staleness": -3}, "staleness must be >= 0, got -3"),
    ({"call_timeout_s": 0}, "call_timeout_s must be a number > 0, got 0"),
    ({"unroll": {"truncation": 0}}, "unroll: truncation must be >= 1, got 0"),
    ({"unroll": {"bogus": 1}}, r"unknown config field\(s\): unroll.bogus"),
    ({"family": {"depth": 0}}, "family: depth must be in 1..10, got 0"),
    ({"validation": {"task": "x"}}, "validation.task: unknown task 'x'"),
    ({"validation": {"runs": 0}}, "validation.runs must be >= 1, got 0"),
    ({"validation": {"task": ["mnist-nn-relu-100", "y"]}}, "validation.task: unknown task 'y'"),
    ({"validation": {"task": []}}, r"validation.task: needs distinct tasks, got \[\]"),
    ({"family": {"activation": ["relu", "relu"]}},
     "experimental.family_mix: activation: a mix needs distinct"),
    ({"experimental": {"family_mix": {"activation": ["relu"]}}},
     r"experimental.family_mix: activation: a mix needs two or more values \(one is the family's"),
    ({"experimental": {"family_mix": {"width": 3}}},
     r"unknown config field\(s\): experimental.family_mix.width"),
    ({"experimental": {"family_mix": {"model": "rnn"}}},
     r"experimental.family_mix: model must be one of \('mlp', 'lstm', 'cnn1', 'cnn2'\)"),
    ({"experimental": {"family_mix": ["mlp", "lstm"]}}, r"experimental.family_mix must be a table"),
    ({"task": "quadratic", "experimental": {"family_mix": {"model": "lstm"}}},
     "experimental.family_mix applies to task 'mnist' only, not 'quadratic'"),
    ({"family": {"activation": "relu"},
      "experimental": {"family_mix": {"activation": ["elu", "tanh"]}}},
     r"family.activation = 'relu' and experimental.family_mix.activation are both given"),
    ({"family": {"model": "lstm"}, "experimental": {"family_mix": {"x": 1}}},
     r"unknown config field\(s\): experimental.family_mix.x"),
    ({"optimizer": "dm", "num_candidates": 5}, r"num_candidates \(J\) applies to hyperadam"),
    ({"tracking": {"uri": ""}}, "tracking.uri must be a non-empty string"),
]


@pytest.mark.parametrize("data, message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_configs_are_refused_with_the_field_and_value(data, message):
    with pytest.raises(ValueError, match=message):
        build_config(data)


def test_identity_leaves_out_what_may_change_on_resume():
    config = build_config({"task": "quadratic"}).resolve(cpus=2)
    params = identity_params(config)
    for name in MUTABLE_ON_RESUME:
        assert not any(key == name or key.startswith(name + ".") for key in params)
    assert all(len(v) <= 500 for v in params.values())  # MLflow's param value limit
    bigger = dataclasses.replace(config, steps=10_000, workers=1, checkpoint_every=7)
    assert identity_mismatches(params, bigger) == []
    assert config_digest(bigger) == config_digest(config)
    other = dataclasses.replace(config, seed=9, meta_batch=3)
    assert identity_mismatches(params, other) == [
        "meta_batch (run: 2, given: 3)",
        "seed (run: 0, given: 9)",
    ]


def test_task_mixes_round_trip_and_one_member_is_the_plain_setting():
    mixed = build_config(
        {"family": {"activation": ["sigmoid", "relu"]},
         "validation": {"task": ["mnist-nn-sigmoid-100", "mnist-nn-relu-100"]}}
    )
    assert mixed.experimental.family_mix.activation == ("sigmoid", "relu")
    assert mixed.family == build_config({}).family  # the paper's family config stays plain
    assert mixed.validation.tasks == ("mnist-nn-sigmoid-100", "mnist-nn-relu-100")
    assert RunConfig.from_dict(json.loads(json.dumps(mixed.to_dict()))) == mixed
    assert identity_params(mixed)["family.activation"] == '["sigmoid", "relu"]'
    single = build_config(
        {"family": {"activation": ["sigmoid"]}, "validation": {"task": ["mnist-nn-sigmoid-100"]}}
    )
    # Runs recorded before mixes existed keep their identity and digest.
    assert single == build_config({}) and config_digest(single) == config_digest(build_config({}))
    assert single.validation.tasks == ("mnist-nn-sigmoid-100",)


MIX_DIGESTS = json.loads((Path(__file__).parent / "family_mix_digests.json").read_text())


@pytest.mark.parametrize("name", sorted(MIX_DIGESTS))
def test_configs_with_their_mixes_in_the_family_load_and_keep_every_digest(name, monkeypatch):
    """Configs written before the mixes moved to ``experimental.family_mix`` (the experiment
    files of docs/experiments, and saved configs using every mix setting): they load, with the
    mixes in their new place, and their family digest, config digest (schema 2 and 1) and logged
    params are the ones the code before the move computed (recorded in the JSON file)."""
    from meta_train.tasks.family import MetaTaskFamilyConfig

    recorded = MIX_DIGESTS[name]
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the files name θs from the root
    if name.startswith("docs/"):
        config = build_config(load_config_file(name))
    else:
        config = RunConfig.from_dict(recorded["config"])
    assert config.make_family().digest() == recorded["family_digest"]
    assert config_digest(config) == recorded["config_digest"]
    assert config_digest(config, schema=1) == recorded["config_digest_schema_1"]
    if "identity_params" in recorded:
        assert identity_params(config) == recorded["identity_params"]
    # The new layout: a plain family, the mixes in experimental; it round-trips.
    plain = config.to_dict()
    if config.task == "mnist":
        assert set(plain["family"]) == {f.name for f in dataclasses.fields(MetaTaskFamilyConfig)}
        assert all(not isinstance(v, list) for v in plain["family"].values())
    again = RunConfig.from_dict(json.loads(json.dumps(plain)))
    assert again == config and again.make_family().digest() == recorded["family_digest"]


def test_mixes_in_the_experimental_section_are_the_old_layouts_mixes():
    old = build_config(load_config_file(
        Path(__file__).resolve().parents[2] / "docs/experiments/mix-notricks-1e-3.json"))
    new = build_config({
        "meta_optim": {"lr": 1e-3},
        "family": {"random_scaling": False, "convex": False},
        "experimental": {"family_mix": {"activation": ["sigmoid", "relu", "elu", "tanh"]}},
    })
    assert new.family == old.family and new.experimental.family_mix == old.experimental.family_mix
    assert new.make_family().digest() == old.make_family().digest()
    every = build_config({"experimental": {"family_mix": {
        "model": ["mlp", "lstm"], "depth": [2, 4], "lstm_layers": [1, 2], "noise_std": 0.01}}})
    assert every.experimental.family_mix.depth == (2, 4)
    assert RunConfig.from_dict(json.loads(json.dumps(every.to_dict()))) == every
    params = identity_params(every)  # logged where runs logged mixes, under family
    assert json.loads(params["family.depth"]) == [2, 4] and params["family.noise_std"] == "0.01"
    assert not [key for key in params if key.startswith("experimental.family_mix")]
    assert every.make_family().sample(0).noise_std == 0.01
    # A mix of nothing is no mix: the paper's config, digest and all.
    paper = build_config({"experimental": {"family_mix": {"model": "mlp"}}})
    assert paper == build_config({}) and paper.experimental.family_mix is None


def test_the_shipped_thetas_recorded_family_digests_verify():
    """Every θ in the repository whose lineage names an MNIST task family: the config it was
    trained with (a schema-1 config of its run, or the trainer checkpoint's own) builds a family
    with the recorded digest."""
    from meta_train import checkpoint as ckpt
    from runtime.theta import load_theta, theta_path

    root = Path(__file__).resolve().parents[2]
    families = {name: RunConfig.from_dict(SCHEMA_1[name]["config"]).make_family().digest()
                for name in SCHEMA_1}
    for name in ("hyperadam", "dm", "rnnprop"):  # the built-in θs
        assert load_theta(theta_path(name)).meta["task_digest"] == families[name], name
    kept = sorted((root / "checkpoints").glob("*-theta.npz"))
    assert kept
    for path in kept:  # earlier θs of the same runs' families
        assert load_theta(path).meta["task_digest"] in families.values(), path.name
    trainer = ckpt.load(root / "checkpoints" / "hyperadam-seed0-step8774.ckpt")
    config = RunConfig.from_dict(trainer.config)
    assert trainer.family_digest == config.make_family().digest() != ""


def test_an_adam_start_is_an_experiment_in_the_identity():
    from meta_train.experimental import AdamStart
    from meta_train.training import ThetaInitConfig, init_theta_flat

    plain = build_config({})
    assert plain.experimental.adam_start is None
    adam = build_config({"experimental": {"adam_start": {"lr": 0.03125}}})
    assert adam.experimental.adam_start == AdamStart(lr=0.03125)
    assert identity_params(adam)["experimental.adam_start.lr"] == "0.03125"
    assert config_digest(adam) != config_digest(plain)
    assert RunConfig.from_dict(json.loads(json.dumps(adam.to_dict()))) == adam
    # A schema-1 file says the same thing in its own layout.
    assert build_config({"init": {"kind": "adam", "adam_lr": 0.03125}}) == adam
    optimizer = adam.make_optimizer()
    start = optimizer.unflatten(init_theta_flat(optimizer, 0, adam.init, adam.experimental))
    assert float(start["weight_bias"].sum()) == pytest.approx(0.03125 / 0.005)
    random = optimizer.unflatten(init_theta_flat(optimizer, 0))
    torch.testing.assert_close(start["lstm_kernel"], random["lstm_kernel"])
    with pytest.raises(ValueError, match="experimental.adam_start applies to hyperadam only"):
        build_config({"optimizer": "rnnprop", "experimental": {"adam_start": {}}})
    with pytest.raises(ValueError, match=r"init.kind must be one of \('spec', 'theta'\)"):
        ThetaInitConfig(kind="zeros")
    with pytest.raises(ValueError, match=r"adam_start.lr must be a number > 0, got -1$"):
        build_config({"experimental": {"adam_start": {"lr": -1}}})
    with pytest.raises(ValueError, match=r"unknown config field\(s\): experimental.adam_start.x"):
        build_config({"experimental": {"adam_start": {"x": 1}}})
    with pytest.raises(ValueError, match=r"experimental.validation_score must be one of"):
        build_config({"experimental": {"validation_score": "ratio"}})


def test_the_experiment_configs_of_the_report_build(monkeypatch):
    """docs/results.md quotes these files as `--config` of its experiments: they must stay valid,
    and a fine-tuning experiment's starting θ must still be the one it names (run from the
    repository root, as the docs say)."""
    from pathlib import Path

    from meta_train.training import init_theta_flat

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    files = sorted((root / "docs" / "experiments").glob("*.json"))
    assert files, "no experiment configs in docs/experiments"
    for path in files:
        config = build_config(load_config_file(path))
        assert config.optimizer == "hyperadam" and config.validation.seed == 1, path.name
        if config.init.kind == "theta":
            assert config.init.theta_sha256 is not None, path.name  # pinned in the file
            init_theta_flat(config.make_optimizer(), config.seed, config.init)  # still matches


def test_the_identity_has_a_schema_and_schema_1_is_still_computed():
    plain = build_config({})
    assert identity(plain)["schema"] == SCHEMA_VERSION == 2
    assert identity_params(plain)["experimental.validation_score"] == "loss"  # every field
    # The paper recipe's identity as runs logged it before schema versions.
    assert config_digest(plain, schema=1) == (
        "a698c1b6cfbe7c561fabc78e7966eb1b2ef2d3de33f6f828a0090d3d013d590d"
    )
    params = identity_params(plain, schema=1)
    assert "schema" not in params and "experimental.validation_score" not in params
    assert not {"validation.score", "family.model", "family.lstm_layers",
                "family.noise_std"} & set(params)
    changed = build_config({"experimental": {"validation_score": "adam_ratio"},
                            "family": {"model": ["mlp", "lstm"], "noise_std": [0.1, 0.01]}})
    params = identity_params(changed, schema=1)
    assert params["validation.score"] == "adam_ratio"
    assert json.loads(params["family.model"]) == ["mlp", "lstm"]
    assert config_digest(changed, schema=1) != config_digest(plain, schema=1)
    assert RunConfig.from_dict(json.loads(json.dumps(changed.to_dict()))) == changed
    # identity() reads plain data, in either layout, without changing it.
    for data in (changed.to_dict(), {"init": {"kind": "adam"}, "meta_optim": {"half_life": 3}}):
        before = json.dumps(data, sort_keys=True)
        identity(data)
        identity(data, schema=1)
        assert json.dumps(data, sort_keys=True) == before
    with pytest.raises(ValueError, match=r"unknown identity schema 3; known: 1, 2"):
        identity(plain, schema=3)


SCHEMA_1 = json.loads((Path(__file__).parent / "schema1_configs.json").read_text())


@pytest.mark.parametrize("name", sorted(SCHEMA_1))
def test_configs_recorded_at_schema_1_load_and_keep_their_identity(name):
    """Configs saved in checkpoints before schema versions (those of the shipped θs among them,
    and one using every experiment of that time): they load, their digest is the one recorded,
    and a resume compares them at schema 1 (their runs logged no ``schema`` param)."""
    from runtime.theta import load_theta, theta_path

    recorded = SCHEMA_1[name]
    config = RunConfig.from_dict(recorded["config"])
    digest = config_digest(config, schema=1)
    assert digest == recorded["config_digest_by_schema_1_code"]
    if name in ("hyperadam", "dm", "rnnprop"):  # the shipped θ's lineage names this config
        assert load_theta(theta_path(name)).meta["config_digest"] == digest
    assert config_digest(recorded["config"], schema=1) == digest  # from its plain data too
    logged = recorded["identity_params_by_schema_1_code"]
    assert identity_params(config, schema=1) == logged
    assert identity_mismatches(logged, config) == []
    other = dataclasses.replace(config, seed=config.seed + 1)
    assert identity_mismatches(logged, other) == [
        f"seed (run: {config.seed}, given: {config.seed + 1})"
    ]
    assert config_digest(config) != digest  # new runs log schema 2


def test_a_schema_2_run_is_compared_at_schema_2():
    config = build_config({"task": "quadratic"}).resolve(cpus=1)
    logged = identity_params(config)
    assert logged["schema"] == "2"
    assert identity_mismatches(logged, config) == []
    scheduled = build_config({"task": "quadratic", "experimental": {"meta_lr_half_life": 9}})
    assert identity_mismatches(logged, scheduled.resolve(cpus=1)) == [
        "experimental.meta_lr_half_life (run: None, given: 9.0)"
    ]
    with pytest.raises(ValueError, match=r"the run's identity has schema 7"):
        identity_mismatches({**logged, "schema": "7"}, config)


def test_a_theta_initialisation_starts_at_that_theta_pinned_by_its_digest(tmp_path):
    from meta_train.theta_source import load_theta_source
    from meta_train.training import ThetaInitConfig, init_theta_flat
    from runtime.theta import save_theta

    config = build_config({"init": {"kind": "theta", "theta": "hyperadam"}})
    optimizer, shipped = load_theta_source("hyperadam")
    assert config.init.theta_sha256 is not None  # filled in from the θ itself
    assert identity_params(config)["init.theta_sha256"] == config.init.theta_sha256
    start = init_theta_flat(config.make_optimizer(), config.seed, config.init)
    assert torch.equal(start, optimizer.flatten(shipped))
    # Runs recorded before init.theta existed keep their identity.
    adam = build_config({"experimental": {"adam_start": {}}})
    assert "init.theta" not in identity_params(adam, schema=1)

    path = tmp_path / "theta.npz"
    save_theta(path, "hyperadam", shipped)
    pinned = build_config({"init": {"kind": "theta", "theta": str(path)}})
    assert pinned.init.theta_sha256 == config.init.theta_sha256  # same content, same digest
    save_theta(path, "hyperadam", {k: v + 1 for k, v in shipped.items()})
    with pytest.raises(ValueError, match=r"init.theta .* has changed: its θ digest is"):
        init_theta_flat(pinned.make_optimizer(), 0, pinned.init)
    rnnprop = build_config(
        {"optimizer": "rnnprop", "init": {"kind": "theta", "theta": "rnnprop"}}
    )
    message = r"holds a rnnprop θ that does not fit this run's hyperadam"
    with pytest.raises(ValueError, match=message):
        init_theta_flat(config.make_optimizer(), 0, rnnprop.init)
    with pytest.raises(ValueError, match=r"init.theta: no θ artifact at"):
        build_config({"init": {"kind": "theta", "theta": str(tmp_path / "absent.npz")}})
    for bad, message in (
        ({"kind": "theta"}, r"init.kind 'theta' needs init.theta"),
        ({"theta": "hyperadam"}, r"apply to init.kind 'theta' only, not 'spec'"),
        ({"kind": "theta", "theta": "x", "theta_sha256": "abc"}, r"64 lowercase hex digits"),
    ):
        with pytest.raises(ValueError, match=message):
            ThetaInitConfig(**bad)


def test_a_pre_kernel_scale_multiplies_only_the_state_cells_input_kernel():
    from meta_train.theta_source import load_theta_source
    from meta_train.training import init_theta_flat

    plain = build_config({"init": {"kind": "theta", "theta": "hyperadam"}})
    scaled = build_config(
        {"init": {"kind": "theta", "theta": "hyperadam"},
         "experimental": {"pre_kernel_scale": 30}}
    )
    # A schema-1 file kept the scale in init.
    assert build_config(
        {"init": {"kind": "theta", "theta": "hyperadam", "pre_kernel_scale": 30}}
    ) == scaled
    optimizer = scaled.make_optimizer()
    _, shipped = load_theta_source("hyperadam")
    start = optimizer.unflatten(init_theta_flat(optimizer, 0, scaled.init, scaled.experimental))
    for name, value in shipped.items():
        expected = value * 30 if name == "pre_kernel" else value
        assert torch.equal(start[name], expected), name
    assert identity_params(scaled)["experimental.pre_kernel_scale"] == "30.0"
    assert identity_params(scaled, schema=1)["init.pre_kernel_scale"] == "30.0"
    # The default scale is no setting at all for schema 1: earlier runs keep their identity.
    assert "init.pre_kernel_scale" not in identity_params(plain, schema=1)
    assert config_digest(plain) != config_digest(scaled)
    spec = build_config({"experimental": {"pre_kernel_scale": 10.0}})
    flat = init_theta_flat(spec.make_optimizer(), spec.seed, spec.init, spec.experimental)
    unscaled = init_theta_flat(spec.make_optimizer(), spec.seed, spec.init)
    assert torch.equal(flat[:20], unscaled[:20] * 10)  # pre_kernel is θ's first tensor
    assert torch.equal(flat[20:], unscaled[20:])
    rnnprop = build_config({"optimizer": "rnnprop", "experimental": {"pre_kernel_scale": 2.0}})
    with pytest.raises(ValueError, match=r"pre_kernel_scale needs HyperAdam, not rnnprop"):
        init_theta_flat(rnnprop.make_optimizer(), 0, rnnprop.init, rnnprop.experimental)
    for bad in (0, -1.0, True, "2"):
        with pytest.raises(ValueError, match=r"experimental.pre_kernel_scale must be a number > 0"):
            build_config({"experimental": {"pre_kernel_scale": bad}})


def test_the_config_file_that_started_a_run_from_a_theta_file_resumes_it():
    # A run from a θ file pins the file's digest in its config; the file that started it says
    # None there ("pin it"), and resuming with that same file must not be refused for it.
    from pathlib import Path

    from meta_train.ablation import ARMS
    from meta_train.errors import UsageError
    from meta_train.meta_training import _continued_config
    from meta_train.run_config import identity_params

    theta = Path(__file__).resolve().parents[2] / "checkpoints/ablation/tensor-adaptive-start"
    started_with = ARMS["tensor-adaptive-small-log-pes"].run_config().to_dict()
    started_with["init"] = {"kind": "theta", "theta": str(theta / "theta.npz"),
                            "theta_sha256": None}  # fmt: skip
    run = build_config(started_with)
    assert run.init.theta_sha256 is not None
    logged = identity_params(run)
    resumed = _continued_config(run.to_dict(), [started_with], logged, "refused: ")
    assert resumed.init == run.init
    other = {**started_with, "init": {**started_with["init"], "theta_sha256": "ab" * 32}}
    with pytest.raises(UsageError, match="refused: init.theta_sha256"):
        _continued_config(run.to_dict(), [other], logged, "refused: ")
