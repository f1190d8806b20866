"""``runtime.jax.learned_optimizer``: an exported learned optimizer as an optax-style transform.

Imports jax; the rest of the runtime does not. optax is not needed: a ``GradientTransformation``
is a NamedTuple of two pure functions, ``init(params) -> state`` and ``update(updates, state,
params=None) -> (updates, state)``, so the result also works inside ``optax.chain``.

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

from . import arrays, validation
from . import optimizer as _optimizer
from .stepper import NonFiniteGradientError, Stepper

Schedule = Callable[[jax.Array], jax.Array]


class LearnedOptimizerState(NamedTuple):
    """State of ``learned_optimizer``.

    ``state`` holds the optimizer state in the runtime stepper's own layout (per-coordinate
    fields flat and chunk-wise feature-major, e.g. HyperAdam's h, c, m, v, b, γ each
    ``[num_coords × J]`` float32; carried values such as ``m_col_sum_sq`` ``[J]``); it is
    portable between transforms made with the same source and ``chunk_size`` for the same
    parameter shapes.
    """

    # optax's name for the step count; it shadows tuple.count on purpose, as optax's does.
    count: jax.Array  # type: ignore[assignment]  # [] int32: steps applied
    num_skipped: jax.Array  # [] int32: steps skipped for non-finite gradients
    state: dict[str, jax.Array]


class GradientTransformation(NamedTuple):
    """optax's ``GradientTransformation`` contract, without needing optax."""

    init: Callable[[Any], LearnedOptimizerState]
    update: Callable[..., tuple[Any, LearnedOptimizerState]]


# noqa: C901 below: the branches are argument checks and the two closures optax asks for
# (init_fn, update_fn), which must close over the stepper; split apart they would pass it around.
def learned_optimizer(  # noqa: C901
    source: str | os.PathLike[str] | _optimizer.ExportedOptimizer = "hyperadam",
    lr: float | Schedule | None = None,
    *,
    chunk_size: int | None = None,
    on_nonfinite: str = "raise",
    threads: int | None = None,
) -> GradientTransformation:
    """A learned optimizer (HyperAdam by default) as ``(init, update)``.

    The updates it returns are the full steps (learning rate included), to be *added* to the
    parameters (``optax.apply_updates``); one update is one global step over every leaf.

    Args:
      source: an exported folder, a built-in name, an MLflow URI, or a loaded
        ``runtime.ExportedOptimizer`` (default ``"hyperadam"``).
      lr: step size α, or a schedule ``count -> α`` (default: the export's).
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
    schedule: Schedule | None = lr if callable(lr) else None
    fixed_lr = (
        validation.check_lr(runtime.default_lr if lr is None else lr) if not schedule else 0.0
    )
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
        state = {
            name: jnp.zeros(shape, jnp.float32)
            for name, shape in stepper.raw_state_shapes().items()
        }
        return LearnedOptimizerState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), state)

    def update_fn(
        updates: Any, state: LearnedOptimizerState, params: Any = None
    ) -> tuple[Any, LearnedOptimizerState]:
        del params  # the step does not read the parameters: it is computed from zeros
        leaves, treedef, shapes = leaves_of(updates, "updates")
        stepper, zeros = stepper_for(shapes)
        expected = stepper.raw_state_shapes()
        got = {name: tuple(np.shape(v)) for name, v in state.state.items()}
        if got != expected:
            raise ValueError(
                f"state does not match these updates (state {got}, updates need {expected}); "
                f"call init with parameters of the same shapes first"
            )
        concrete = not any(isinstance(leaf, jax.core.Tracer) for leaf in leaves)
        if on_nonfinite == "raise" and concrete:
            for i, leaf in enumerate(leaves):
                if not np.isfinite(np.asarray(leaf)).all():
                    raise NonFiniteGradientError(
                        f"gradient {i} contains NaN or inf (on_nonfinite='raise'); nothing "
                        f"was changed"
                    )
        names = sorted(expected)
        lr = schedule(state.count) if schedule is not None else fixed_lr

        def host_step(lr_value: Any, grads: list[Any], raw: list[Any]) -> tuple[Any, ...]:
            with lock:  # one stepper per shape set; calls may come from several threads
                stepper.load_raw_state(
                    {n: arrays.host_view(v) for n, v in zip(names, raw, strict=True)}
                )
                for z in zeros:
                    z[...] = 0.0
                stepper.lr = float(np.asarray(lr_value))
                applied = stepper.step([arrays.host_view(g) for g in grads])
                new = stepper.raw_state()
                return (
                    [z.copy() for z in zeros],
                    [new[n] for n in names],
                    np.asarray(applied, np.bool_),
                )

        out_shapes = (
            [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes],
            [jax.ShapeDtypeStruct(expected[n], jnp.float32) for n in names],
            jax.ShapeDtypeStruct((), jnp.bool_),
        )
        deltas, new_raw, applied = jax.pure_callback(
            host_step,
            out_shapes,
            jnp.asarray(lr, jnp.float32),
            list(leaves),
            [state.state[n] for n in names],
            vmap_method="sequential",
        )
        new_state = LearnedOptimizerState(
            state.count + applied.astype(jnp.int32),
            state.num_skipped + (~applied).astype(jnp.int32),
            dict(zip(names, new_raw, strict=True)),
        )
        return jax.tree_util.tree_unflatten(treedef, deltas), new_state

    return GradientTransformation(init_fn, update_fn)
