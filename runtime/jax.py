"""``runtime.jax.learned_optimizer``: an exported learned optimizer as an optax-style transform.

Imports jax; the rest of the runtime does not. optax is not needed: a ``GradientTransformation``
is a NamedTuple of two pure functions, ``init(params) -> state`` and ``update(updates, state,
params=None, **extra_args) -> (updates, state)``, so the result also works inside
``optax.chain``; with optax installed it *is* an ``optax.GradientTransformationExtraArgs``, so
``chain`` hands it the ``loss=`` extra argument the guard reads.

Following optax's conventions, ``learning_rate`` (and ``weight_decay``) may be a float or a
schedule ``count -> value``, and the factory works under ``optax.inject_hyperparams`` (its
hyperparameters then arrive as arrays; pass a loaded ``runtime.load(...)`` as ``source`` so the
factory does not reload the model at each call, and ``static_args=("chunk_size",)`` if you set
one).

How it runs: ``update`` calls onnxruntime through ``jax.pure_callback``, so it works eagerly and
under ``jax.jit`` alike (the learned step is ONE global step over every leaf, which no per-leaf
XLA op expresses, and onnxruntime cannot be traced). The callback receives host copies of the
gradients and of the state, loads the state into a ``Stepper`` bound to zero "parameters", steps,
and returns the new state and the update. Because the graphs compute ``w' = w − x``, stepping
zeros yields ``−x`` exactly, and ``optax.apply_updates`` then computes ``w + (−x)``, which is
``w − x`` bit for bit: the trajectory equals the numpy runtime's on the same gradients.

Example::

    import optax
    from runtime.jax import learned_optimizer

    tx = optax.chain(optax.clip_by_global_norm(1.0), learned_optimizer("hyperadam"))
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grads, state)
    params = optax.apply_updates(params, updates)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import arrays, jax_guard, per_array, validation
from . import guard as gd
from . import optimizer as _optimizer
from .jax_guard import JaxGuardState
from .stepper import NonFiniteGradientError, Stepper

try:  # optax is optional; with it, chain() passes extra arguments (the guard's loss) through
    from optax import GradientTransformationExtraArgs as _OptaxTransformation
except ImportError:  # pragma: no cover - optax is installed wherever the tests run
    _OptaxTransformation = None

Schedule = Callable[[jax.Array], jax.Array]


class LearnedOptimizerState(NamedTuple):
    """State of ``learned_optimizer``.

    ``state`` holds the optimizer state in the runtime stepper's own layout (per-coordinate
    fields flat and chunk-wise feature-major, e.g. HyperAdam's h, c, m, v, b, γ each
    ``[num_coords × J]`` float32; carried values such as ``m_col_sum_sq`` ``[J]``); it is
    portable between transforms made with the same source and ``chunk_size`` for the same
    parameter shapes. ``guard`` is None unless the transform was made with ``guard=``.
    """

    # optax's name for the step count; it shadows tuple.count on purpose, as optax's does.
    count: jax.Array  # type: ignore[assignment]  # [] int32: learned steps applied
    num_skipped: jax.Array  # [] int32: steps skipped for non-finite gradients
    state: dict[str, jax.Array]
    guard: JaxGuardState | None = None


if _OptaxTransformation is not None:

    class GradientTransformation(_OptaxTransformation):
        """optax's ``GradientTransformationExtraArgs`` (optax is installed)."""

        __slots__ = ()

else:  # pragma: no cover

    class GradientTransformation(NamedTuple):  # type: ignore[no-redef]
        """optax's ``GradientTransformation`` contract, without needing optax."""

        init: Callable[[Any], LearnedOptimizerState]
        update: Callable[..., tuple[Any, LearnedOptimizerState]]


def num_fallbacks(state: Any) -> int:
    """Guard fallbacks recorded in an optimizer state (ours, or a chain/inject state holding
    it); 0 when it holds no guarded ``LearnedOptimizerState``."""
    found = [
        s
        for s in jax.tree_util.tree_leaves(
            state, is_leaf=lambda x: isinstance(x, LearnedOptimizerState)
        )
        if isinstance(s, LearnedOptimizerState) and s.guard is not None
    ]
    return sum(int(s.guard.scalars["num_fallbacks"]) for s in found if s.guard is not None)


# noqa: C901 below: the branches are argument checks and the two closures optax asks for
# (init_fn, update_fn), which must close over the stepper; split apart they would pass it around.
def learned_optimizer(  # noqa: C901
    source: str | os.PathLike[str] | _optimizer.ExportedOptimizer = "hyperadam",
    learning_rate: float | Schedule | None = None,
    *,
    weight_decay: float | Schedule = 0.0,
    guard: bool | gd.GuardConfig | None = None,
    chunk_size: int | None = None,
    on_nonfinite: str = "raise",
    threads: int | None = None,
    lr: float | Schedule | None = None,
) -> GradientTransformation:
    """A learned optimizer (HyperAdam by default) as ``(init, update)``.

    The updates it returns are the full steps (learning rate included), to be *added* to the
    parameters (``optax.apply_updates``); one update is one global step over every leaf.

    Args:
      source: an exported folder, a built-in name, an MLflow URI, or a loaded
        ``runtime.ExportedOptimizer`` (default ``"hyperadam"``).
      learning_rate: step size α, or a schedule ``count -> α`` (optax's, e.g.
        ``optax.warmup_cosine_decay_schedule``; count = learned steps taken). Default: the
        export's. ``lr`` is the same argument under its older name.
      weight_decay: decoupled weight decay λ (a float or a schedule): the update gains
        ``−lr·(λ·w)``, optax ``adamw``'s decay term; needs ``params`` in ``update``.
      guard: ``True`` or a ``runtime.guard.GuardConfig``: ``update(..., params, loss=L)``
        watches the loss of ``params`` (passed through ``optax.chain`` as an extra argument);
        on a blow-up the update takes the parameters back to the last good ones
        (``snapshot − params``: bitwise while they are within a factor 2, else to one rounding),
        restores the state and runs Adam for a while (see ``runtime/guard.py``). Without a
        loss, a learned update whose RMS exceeds ``max_update_rms·lr`` (or that is not
        finite) is never returned: Adam takes over instead. ``num_fallbacks(state)`` counts.
      chunk_size: as ``runtime.ExportedOptimizer.bind``.
      on_nonfinite: ``"raise"`` (default) raises ``NonFiniteGradientError`` when ``update`` is
        called on concrete arrays. Under ``jax.jit`` a callback must not raise (JAX leaves that
        undefined), so there a non-finite step is skipped: zero update, state unchanged,
        ``num_skipped`` incremented — check it. ``"skip"`` skips everywhere.
      threads: CPU threads for chunks.

    Raises:
      TypeError / ValueError: bad arguments, leaves that are not float32, or a state that does
        not match the updates.
    """
    runtime = (
        source
        if isinstance(source, _optimizer.ExportedOptimizer)
        else _optimizer.load(source, threads=threads)
    )
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite must be one of ('raise', 'skip'), got {on_nonfinite!r}")
    if lr is not None and learning_rate is not None:
        raise ValueError("pass learning_rate or lr (its older name), not both")
    learning_rate = lr if learning_rate is None else learning_rate
    lr_of = _hyperparameter(
        "learning_rate", runtime.default_lr if learning_rate is None else learning_rate
    )
    decay_of = _hyperparameter("weight_decay", weight_decay)
    needs_params = not (isinstance(weight_decay, (int, float)) and weight_decay == 0)
    config = gd.guard_config(guard)
    if chunk_size is not None and not isinstance(chunk_size, int):
        chunk_size = int(chunk_size)  # from inject_hyperparams (a concrete array)
    steppers: dict[tuple[tuple[int, ...], ...], tuple[Stepper, list[np.ndarray]]] = {}
    lock = threading.Lock()

    def stepper_for(shapes: tuple[tuple[int, ...], ...]) -> tuple[Stepper, list[np.ndarray]]:
        with lock:
            if shapes not in steppers:
                zeros = [np.zeros(s, np.float32) for s in shapes]
                stepper = runtime.bind(zeros, chunk_size=chunk_size, on_nonfinite="skip")
                steppers[shapes] = (stepper, zeros)
            return steppers[shapes]

    def leaves_of(tree: Any, what: str) -> tuple[list[Any], Any, tuple[tuple[int, ...], ...]]:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        for i, leaf in enumerate(leaves):
            if jnp.result_type(leaf) != jnp.float32:
                raise ValueError(
                    f"{what} leaf {i} has dtype {jnp.result_type(leaf)}; the runtime steps "
                    f"float32 only"
                )
        return leaves, treedef, tuple(tuple(np.shape(leaf)) for leaf in leaves)

    def init_fn(params: Any) -> LearnedOptimizerState:
        _, _, shapes = leaves_of(params, "params")
        stepper, _ = stepper_for(shapes)
        raw_shapes = stepper.raw_state_shapes()
        state = {name: jnp.zeros(shape, jnp.float32) for name, shape in raw_shapes.items()}
        guard_state = None
        if config is not None:
            leaves = [jnp.zeros(s, jnp.float32) for s in shapes]
            scalars = jax_guard.scalars_of(
                gd.init_guard(), adam_count=0, snapshot_count=0, num_adam_steps=0
            )
            guard_state = JaxGuardState(
                {k: jnp.asarray(v) for k, v in scalars.items()},
                leaves,
                {name: jnp.zeros(shape, jnp.float32) for name, shape in raw_shapes.items()},
                list(leaves),
                list(leaves),
            )
        zero = jnp.zeros((), jnp.int32)
        return LearnedOptimizerState(zero, zero, state, guard_state)

    def host_learned(
        stepper: Stepper, zeros: list[np.ndarray], names: list[str], lr_value: float,
        grads: list[Any], raw: list[Any],
    ) -> tuple[list[np.ndarray], dict[str, np.ndarray], bool]:  # fmt: skip
        """−x (the learned update) for ``grads`` from state ``raw``: the stepper on zeros. An
        lr of 0 (a warm-up's first step) advances the state and returns zeros."""
        stepper.load_raw_state({n: arrays.host_view(v) for n, v in zip(names, raw, strict=True)})
        for z in zeros:
            z[...] = 0.0
        stepper.lr = lr_value or 1.0
        applied = stepper.step([arrays.host_view(g) for g in grads])
        deltas = [z.copy() if lr_value else np.zeros_like(z) for z in zeros]
        return deltas, stepper.raw_state(), applied

    def update_fn(
        updates: Any,
        state: LearnedOptimizerState,
        params: Any = None,
        *,
        loss: Any = None,
        **extra_args: Any,
    ) -> tuple[Any, LearnedOptimizerState]:
        del extra_args  # other transforms' extra arguments, passed along by optax.chain
        leaves, treedef, shapes = leaves_of(updates, "updates")
        stepper, zeros = stepper_for(shapes)
        expected = stepper.raw_state_shapes()
        got = {name: tuple(np.shape(v)) for name, v in state.state.items()}
        if got != expected:
            raise ValueError(
                f"state does not match these updates (state {got}, updates need {expected}); "
                f"call init with parameters of the same shapes first"
            )
        if (config is not None) != (state.guard is not None):
            raise ValueError(
                "state and transform disagree on the guard: init the state with this transform"
            )
        param_leaves: list[Any] = []
        if params is not None:
            param_leaves = jax.tree_util.tree_leaves(params)
        elif needs_params or config is not None:
            raise ValueError(
                "this learned_optimizer needs the current parameters (weight decay or the guard "
                "read them): call update(updates, state, params)"
            )
        concrete = not any(isinstance(leaf, jax.core.Tracer) for leaf in leaves)
        if on_nonfinite == "raise" and concrete and config is None:
            for i, leaf in enumerate(leaves):
                if not np.isfinite(np.asarray(leaf)).all():
                    raise NonFiniteGradientError(
                        f"gradient {i} contains NaN or inf (on_nonfinite='raise'); nothing "
                        f"was changed"
                    )
        names = sorted(expected)
        lr_value = jnp.asarray(lr_of(state.count), jnp.float32)
        rate = jnp.asarray(decay_of(state.count), jnp.float32)
        if config is None:
            return plain_update(state, leaves, treedef, shapes, names, param_leaves, lr_value, rate)
        has_loss = loss is not None
        loss_value = jnp.asarray(jnp.nan if loss is None else loss, jnp.float32)
        return guarded_update(
            state, leaves, treedef, shapes, names, param_leaves, lr_value, rate, loss_value,
            has_loss,
        )  # fmt: skip

    def plain_update(state, leaves, treedef, shapes, names, param_leaves, lr_value, rate):
        stepper, zeros = stepper_for(shapes)
        expected = stepper.raw_state_shapes()

        def host_step(lr_v, rate_v, grads, raw, params):
            with lock:  # one stepper per shape set; calls may come from several threads
                lr_f = float(np.asarray(lr_v))
                deltas, new, applied = host_learned(stepper, zeros, names, lr_f, grads, raw)
                if applied:
                    per_array.add_decay_term(deltas, params, lr_f, float(np.asarray(rate_v)))
                return deltas, [new[n] for n in names], np.asarray(applied, np.bool_)

        out_shapes = (
            [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes],
            [jax.ShapeDtypeStruct(expected[n], jnp.float32) for n in names],
            jax.ShapeDtypeStruct((), jnp.bool_),
        )
        deltas, new_raw, applied = jax.pure_callback(
            host_step, out_shapes, lr_value, rate, list(leaves),
            [state.state[n] for n in names], list(param_leaves), vmap_method="sequential",
        )  # fmt: skip
        new_state = LearnedOptimizerState(
            state.count + applied.astype(jnp.int32),
            state.num_skipped + (~applied).astype(jnp.int32),
            dict(zip(names, new_raw, strict=True)),
        )
        return jax.tree_util.tree_unflatten(treedef, deltas), new_state

    def guarded_update(
        state, leaves, treedef, shapes, names, param_leaves, lr_value, rate, loss, has_loss
    ):
        assert config is not None
        stepper, zeros = stepper_for(shapes)

        def learned(lr_value: float, grads: list[Any], raw: list[Any]) -> tuple[Any, ...]:
            return host_learned(stepper, zeros, names, lr_value, grads, raw)

        def host_step(inputs: dict[str, Any]) -> dict[str, Any]:
            with lock:
                return jax_guard.host_step(config, inputs, has_loss, learned, names)

        g = state.guard
        inputs = {
            "lr": lr_value, "rate": rate, "loss": loss, "grads": list(leaves),
            "raw": [state.state[n] for n in names], "params": list(param_leaves),
            "count": state.count, "num_skipped": state.num_skipped, "scalars": g.scalars,
            "snapshot_params": g.snapshot_params,
            "snapshot_state": [g.snapshot_state[n] for n in names],
            "adam_m": g.adam_m, "adam_v": g.adam_v,
        }  # fmt: skip
        out_shapes = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)),
            {k: v for k, v in inputs.items() if k not in ("lr", "rate", "loss", "grads", "params")},
        )
        out_shapes["deltas"] = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
        out = jax.pure_callback(host_step, out_shapes, inputs, vmap_method="sequential")
        new_state = LearnedOptimizerState(
            out["count"],
            out["num_skipped"],
            dict(zip(names, out["raw"], strict=True)),
            JaxGuardState(
                out["scalars"],
                out["snapshot_params"],
                dict(zip(names, out["snapshot_state"], strict=True)),
                out["adam_m"],
                out["adam_v"],
            ),
        )
        return jax.tree_util.tree_unflatten(treedef, out["deltas"]), new_state

    return GradientTransformation(init_fn, update_fn)


def _hyperparameter(name: str, value: Any) -> Callable[[jax.Array], Any]:
    """``count -> value`` for a float, an array (``optax.inject_hyperparams`` passes those,
    traced under jit) or a schedule; plain numbers are checked here."""
    if callable(value):
        return value
    if isinstance(value, (jax.Array, np.ndarray, jax.core.Tracer)):
        return lambda count: value
    checked = (
        validation.check_lr(value)
        if name == "learning_rate"
        else per_array.check_weight_decay(value, 1)[0]
    )
    return lambda count: checked
