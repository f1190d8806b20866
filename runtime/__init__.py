"""hyperadam runtime: apply an exported learned optimizer to numpy arrays through onnxruntime.

Only numpy and onnxruntime are imported here (style §6.15); framework adapters import their
framework lazily, and MLflow is imported only to resolve ``models:/`` / ``runs:/`` URIs.

Example::

    opt = runtime.load("path/to/exported")           # an ExportedOptimizer, hashes verified
    stepper = opt.bind([w1, b1, w2, b2])              # float32 arrays, updated in place
    stepper.step([g_w1, g_b1, g_w2, g_b2])            # one global step over all of them

The arrays may also be torch/CuPy tensors on the CPU (zero-copy views) or on a CUDA device (the
CUDA provider, through DLPack). Adapters, each importing its framework: ``runtime.torch``
(``LearnedOptimizer``, a ``torch.optim.Optimizer``) and ``runtime.jax`` (``learned_optimizer``,
an optax-style ``GradientTransformation``). Every adapter takes ``weight_decay=`` (AdamW's
decoupled decay) and an opt-in ``guard=`` (``runtime.guard``: the loss, or without it the update
size, is watched; a blow-up restores the last good parameters and state and runs Adam a while).
"""

from .guard import GuardConfig
from .guarded import GuardedStepper, GuardEvent
from .manifest import Manifest, ManifestError, load_manifest
from .optimizer import ExportedOptimizer, load
from .plan import DEFAULT_CHUNK_SIZE
from .stepper import NonFiniteGradientError, NonFiniteStepError, Stepper

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ExportedOptimizer",
    "GuardConfig",
    "GuardEvent",
    "GuardedStepper",
    "Manifest",
    "ManifestError",
    "NonFiniteGradientError",
    "NonFiniteStepError",
    "Stepper",
    "load",
    "load_manifest",
]


def __getattr__(name: str) -> object:
    # ``runtime.LearnedOptimizer`` was this class's name until it was renamed apart from
    # ``runtime.torch.LearnedOptimizer`` (a different class); old code keeps working, warned.
    if name == "LearnedOptimizer":
        import warnings

        warnings.warn(
            "runtime.LearnedOptimizer is now runtime.ExportedOptimizer "
            "(runtime.torch.LearnedOptimizer is the torch.optim.Optimizer)",
            DeprecationWarning,
            stacklevel=2,
        )
        return ExportedOptimizer
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
