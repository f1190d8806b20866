"""The stateful edge of the runtime: a ``Stepper`` owns the optimizer state of a list of arrays.

One ``step(grads)`` is ONE optimizer step over all arrays together: HyperAdam's global
normalisations (Σg², per-column Σh'² and ΣM²) run over every coordinate of every array. The
step runs the manifest's phases over the chunks of ``runtime.plan`` (the fused graph when the
model is one chunk), adds the chunks' partial sums between phases, and, when sharded, hands each
partial sum to the caller's ``all_reduce`` first.

A method with per-array statistics (the tensor-wise HyperAdam's rms_T(g); ``runtime.manifest``'s
``ARRAY_MEANS``) first runs its terms graph over every chunk, sums each term per bound array
(float64, chunk by chunk in a fixed order), all-reduces the sums and the arrays' sizes when
sharded (arrays on several shards share an ``array_ids`` entry), and feeds every coordinate the
means of its array to the step graphs (the sums, for the statistics the method names summed).

The arrays may be numpy, torch, CuPy (anything with DLPack) on the CPU, or torch/CuPy on a CUDA
device; ``runtime.arrays`` adopts them without copies and ``runtime.backends`` says where the
state lives. Inputs are validated before any buffer changes; a failure after validation (an
onnxruntime error, a failing ``all_reduce``) marks the stepper unusable until
``load_state_dict`` restores it.

A step whose result is not finite changes nothing. Non-finite gradients and parameters are
refused before the step. With finite inputs only the parameters can overflow, through ``lr``:
the state does not depend on it, and each method's update d is bounded (HyperAdam's
|d| <= 1e12: |M~| <= 1 and ε = 1e-24 under the root; DM's and RNNprop's are 0.1 times an
output layer of bounded LSTM outputs). So for lr <= ``SNAPSHOT_ABOVE_LR`` the step runs as it
is (a parameter within 1e12 of float32's largest value could still overflow: the stepper is then
marked unusable, as after any failure midway). Above it the step first snapshots the parameters
and the state (a copy of both, about a third of a step's time) and restores them when the new
parameters are not finite. The new parameters are checked after every step.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, wait
from typing import Any

import numpy as np
import onnxruntime as ort

from . import arrays, per_array, validation
from . import manifest as mf
from .backends import Backend, backend_for, sum_of_squares
from .plan import Chunk, plan_chunks
from .subnormals import flush_subnormals

AllReduce = Callable[[np.ndarray], np.ndarray]
NONFINITE_POLICIES = ("raise", "skip")
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Above this step size a step is a transaction (see the module docstring): 200× HyperAdam's
# α = 0.005 and 10× DM's and RNNprop's 0.1, so ordinary use never pays for the snapshot.
SNAPSHOT_ABOVE_LR = 1.0
__all__ = [
    "AllReduce",
    "NonFiniteGradientError",
    "NonFiniteStepError",
    "Stepper",
    "sum_of_squares",
]


class NonFiniteGradientError(ValueError):
    """A gradient with NaN/inf (or whose Σg² overflows fp32) under ``on_nonfinite="raise"``."""


class NonFiniteStepError(NonFiniteGradientError):
    """A step that would leave non-finite parameters (e.g. an overflowing ``lr``), or parameters
    that are not finite before it, under ``on_nonfinite="raise"``; nothing was changed."""


class Stepper:
    """Applies a learned optimizer, in place, to the float32 arrays it was bound to.

    Made by ``ExportedOptimizer.bind``; see there for the arguments. Not thread-safe: one
    ``step`` at a time (it parallelises over chunks itself).
    """

    def __init__(
        self,
        manifest: mf.Manifest,
        sessions: Mapping[str, ort.InferenceSession],
        params: Sequence[Any],
        *,
        adopted: arrays.Adopted | None = None,
        lr: float,
        chunk_size: int,
        on_nonfinite: str,
        all_reduce: AllReduce | None,
        executor: Callable[[], Executor | None],
        threads: int,
        weight_decay: float | Sequence[float] = 0.0,
        array_ids: Sequence[int] | None = None,
        num_arrays: int | None = None,
    ) -> None:
        self._sources = list(params) if isinstance(params, (list, tuple)) else params
        self._adopted = arrays.adopt_params(params) if adopted is None else adopted
        self._params = self._adopted.arrays  # numpy views (host) or CUDA arrays
        self._backend: Backend = backend_for(self._adopted.kind, self._adopted.device)
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}"
            )
        if all_reduce is not None and not callable(all_reduce):
            raise TypeError(f"all_reduce must be callable, got {type(all_reduce).__name__}")
        self.manifest = manifest
        self._sessions = sessions
        self._on_nonfinite = on_nonfinite
        self._all_reduce = all_reduce
        self._executor = executor
        self._threads = threads
        self._shapes = [tuple(p.shape) for p in self._params]
        self._flat = [p.reshape(-1) for p in self._params]  # views: the arrays are C-contiguous
        sizes = [math.prod(s) for s in self._shapes]
        self.num_coords = sum(sizes)
        self._chunks: list[Chunk] = plan_chunks(sizes, chunk_size)
        info = manifest.info
        single = len(self._chunks) == 1 and all_reduce is None
        self._phases = (mf.Phase(mf.FUSED),) if single else info.phases
        self._statistics = info.array_statistics
        self._summed = np.array([name in info.summed_statistics for name in self._statistics], bool)
        self._array_ids, self._num_arrays = per_array.check_array_ids(
            array_ids, num_arrays, len(self._params), sharded=all_reduce is not None
        )
        if self._statistics and all_reduce is not None and array_ids is None:
            raise ValueError(
                f"a sharded {manifest.method} step needs array_ids and num_arrays (each bound "
                "array's index in the whole model): its per-array statistics add up across shards"
            )
        # Per coordinate, the terms of the statistics, then (same memory) their per-array means.
        self._means = self._backend.zeros(self.num_coords * len(self._statistics))
        if self._statistics:
            self._phases = (mf.Phase(mf.ARRAY_TERMS), *self._phases)
        self._lr = np.zeros((), np.float32)
        self.lr = lr
        self._weight_decay: list[float] = []
        self.weight_decay = weight_decay
        self._lr_scales = [1.0] * len(self._params)
        self._grad_sum_sq = np.zeros((), np.float32)
        layout = manifest.state
        self._fields = {
            f.name: self._backend.zeros(self.num_coords * f.size) for f in layout.fields
        }
        self._field_specs = {f.name: f for f in layout.fields}
        self._carried = {c.name: np.zeros(c.shape, np.float32) for c in layout.carried}
        self._carried_parts = {
            c.name: np.zeros((len(self._chunks), *c.shape), np.float32) for c in layout.carried
        }
        reductions = {name for phase in self._phases for name in phase.reductions}
        shapes = {t.name: t.shape for g in manifest.graphs.values() for t in g.outputs}
        fixed = {name: _fixed_shape(name, shapes[name]) for name in reductions}
        self._reduced = {name: np.zeros(fixed[name], np.float32) for name in reductions}
        self._reduction_parts = {
            name: np.zeros((len(self._chunks), *fixed[name]), np.float32) for name in reductions
        }
        self._gather_size = max((c.size for c in self._chunks if not c.zero_copy), default=0)
        self._local = threading.local()
        # onnxruntime copies a host input bound to a CUDA session when it is bound, not when it
        # runs: on CUDA the small host inputs (lr, Σg², column sums) are bound again each run.
        self._rebound: dict[tuple[int, int], list[tuple[str, np.ndarray]]] = {}
        self._bindings = [
            [self._bind_static(phase.role, k) for k in range(len(self._chunks))]
            for phase in self._phases
        ]
        self.num_steps = 0
        self.num_skipped = 0
        self._broken: str | None = None

    # -- public surface ----------------------------------------------------------------------

    @property
    def lr(self) -> float:
        return float(self._lr)

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr_exact = validation.check_lr(value)  # the decay factor uses it unrounded
        self._lr[...] = self._lr_exact

    @property
    def weight_decay(self) -> float | list[float]:
        """Decoupled weight decay λ: each step first scales each array by ``1 − lr·λ``
        (AdamW's ``w ← w − lr·λ·w``), then applies the learned update. One float for every
        array, or a list with one per array (``runtime.torch`` sets it per param group)."""
        rates = self._weight_decay
        return rates[0] if len(set(rates)) == 1 else list(rates)

    @weight_decay.setter
    def weight_decay(self, value: float | Sequence[float]) -> None:
        self._weight_decay = per_array.check_weight_decay(value, len(self._params))

    @property
    def lr_scales(self) -> list[float]:
        """Per-array lr multipliers: array i moves by ``lr_scales[i]`` times its learned update
        and decays by ``1 − lr·lr_scales[i]·λ_i`` (``runtime.torch`` sets them from per-group
        lrs; default all 1). One global step still covers every array."""
        return list(self._lr_scales)

    @lr_scales.setter
    def lr_scales(self, value: float | Sequence[float]) -> None:
        self._lr_scales = per_array.check_lr_scales(value, len(self._params))

    @property
    def num_chunks(self) -> int:
        return len(self._chunks)

    @property
    def uses_fused_graph(self) -> bool:
        """True when the step runs only the fused graph (the model is one chunk, or the method is
        coordinate-wise), after the per-array terms graph for a method with per-array
        statistics."""
        roles = [phase.role for phase in self._phases if phase.role != mf.ARRAY_TERMS]
        return roles == [mf.FUSED]

    @property
    def state_nbytes(self) -> int:
        return sum(a.nbytes for a in self._fields.values())

    @property
    def device(self) -> str:
        """Where the parameters and the state live: ``"cpu"`` or ``"cuda:N"``."""
        return self._adopted.device

    @property
    def framework(self) -> str:
        """The framework of the bound arrays (``"numpy"``, ``"torch"``, ``"cupy"``, …)."""
        return self._adopted.kind

    def step(self, grads: Sequence[Any]) -> bool:
        """One optimizer step over all bound arrays, in place.

        Args:
          grads: one float32, C-contiguous gradient per parameter, same shapes, of the
            parameters' framework and device.

        Returns:
          True if the step was applied; False if it was skipped under ``on_nonfinite="skip"``.

        Raises:
          ValueError / TypeError: on a count, framework, device, dtype, shape or layout mismatch
            (nothing changes).
          NonFiniteGradientError: NaN/inf gradients under ``on_nonfinite="raise"`` (nothing
            changes).
          NonFiniteStepError: NaN/inf parameters, or a result that would be, under
            ``on_nonfinite="raise"`` (nothing changes).
          RuntimeError: if an earlier step failed midway and the state was not restored.
        """
        self._check_usable()
        arrays.check_unchanged(self._sources, self._adopted)
        flat_grads = arrays.adopt_grads(grads, self._adopted)
        self._backend.synchronize()  # the producer's kernels that wrote the arrays are done
        sum_sq = self._backend.sum_of_squares(flat_grads)
        params_finite = self._backend.all_finite(self._flat)
        if self._all_reduce is not None:
            # Every shard learns the global values, so every shard skips (or raises) alike.
            total = self._reduce(np.array([sum_sq, 0.0 if params_finite else 1.0]))
            sum_sq, params_finite = float(total[0]), float(total[1]) == 0.0
        if not (math.isfinite(sum_sq) and sum_sq <= _FLOAT32_MAX):
            if self._on_nonfinite == "skip":
                self.num_skipped += 1
                return False
            raise NonFiniteGradientError(
                validation.nonfinite_message(
                    [self._backend.to_host(g) for g in flat_grads],
                    sum_sq,
                    sharded=self._all_reduce is not None,
                )
            )
        if not params_finite:
            return self._refuse_nonfinite("the parameters hold NaN or inf before the step")
        snapshot = self._step_snapshot() if self.lr > SNAPSHOT_ABOVE_LR else None
        self._grad_sum_sq[...] = sum_sq
        lrs = per_array.array_lrs(self._lr_exact, self._lr_scales)
        per_array.decay_in_place(self._params, self._weight_decay, lrs)
        rescaled = per_array.copies_to_rescale(self._params, self._lr_scales)
        if rescaled or any(self._weight_decay):
            self._backend.synchronize()  # onnxruntime's stream does not wait for those kernels
        try:
            self._run_phases(flat_grads)
        except BaseException as err:
            self._broken = f"{type(err).__name__}: {err}"
            raise
        per_array.rescale_updates(self._params, rescaled, self._lr_scales)
        if not self._params_finite():
            if snapshot is None:  # parameters at the edge of float32's range (module docstring)
                self._broken = f"the step with lr {self.lr:g} made the parameters non-finite"
                raise NonFiniteStepError(self._broken + "; restore with load_state_dict()")
            self._step_restore(snapshot)
            return self._refuse_nonfinite(
                f"the step with lr {self.lr:g} would make the parameters non-finite (overflow); "
                "parameters and state are unchanged"
            )
        self.num_steps += 1
        return True

    def _run_phases(self, flat_grads: list[Any]) -> None:
        """Every phase over every chunk, with the per-array means and the partial sums combined
        between phases, then the carried values combined."""
        for index, phase in enumerate(self._phases):
            self._run_phase(index, flat_grads)
            if phase.role == mf.ARRAY_TERMS:
                self._array_means()
            for name in phase.reductions:
                self._reduced[name][...] = self._combine(self._reduction_parts[name], "sum")
        for carried in self.manifest.state.carried:
            parts = self._carried_parts[carried.name]
            self._carried[carried.name][...] = self._combine(parts, carried.combine)

    def _params_finite(self) -> bool:
        """Whether every parameter is finite, on every shard (so that all shards agree)."""
        finite = self._backend.all_finite(self._flat)
        if self._all_reduce is None:
            return finite
        return float(self._reduce(np.array([0.0 if finite else 1.0]))[0]) == 0.0

    def _refuse_nonfinite(self, message: str) -> bool:
        if self._on_nonfinite == "skip":
            self.num_skipped += 1
            return False
        raise NonFiniteStepError(message)

    # Named apart from GuardedStepper's own snapshot and restore, which keep the last good
    # state across steps; these two undo one step that overflowed.
    def _step_snapshot(self) -> dict[str, Any]:
        """Copies of everything a step writes: the parameters and the state."""
        copy = self._backend.copy
        return {
            "params": [copy(p) for p in self._flat],
            "fields": {name: copy(value) for name, value in self._fields.items()},
            "carried": {name: value.copy() for name, value in self._carried.items()},
        }

    def _step_restore(self, snapshot: Mapping[str, Any]) -> None:
        assign = self._backend.assign
        for flat, saved in zip(self._flat, snapshot["params"], strict=True):
            assign(flat, saved)
        for name, saved in snapshot["fields"].items():
            assign(self._fields[name], saved)
        for name, saved in snapshot["carried"].items():
            self._carried[name][...] = saved

    def state_dict(self) -> dict[str, Any]:
        """A copy of the state as plain data (numpy arrays, ints, floats, strings).

        Per-coordinate fields are coordinate-major, as the reference's state NamedTuple:
        ``[num_coords, k]`` for a field of k features, ``[num_coords]`` for one feature.
        """
        self._check_usable()
        state = {name: self._canonical(name) for name in self._fields}
        state.update({name: value.copy() for name, value in self._carried.items()})
        return {
            "format": validation.STATE_FORMAT,
            "format_version": validation.STATE_FORMAT_VERSION,
            "method": self.manifest.method,
            "config": dict(self.manifest.config),
            "param_shapes": [list(s) for s in self._shapes],
            "num_steps": self.num_steps,
            "num_skipped": self.num_skipped,
            "lr": self._lr_exact,
            "state": state,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replaces the state with ``state_dict`` after checking all of it (format version,
        method, config, parameter shapes, every array's name, shape, dtype and finiteness)."""
        checked = validation.check_state_dict(state_dict, self.manifest, self._shapes)
        for name, value in checked["state"].items():
            if name in self._fields:
                self._set_canonical(name, value)
            else:
                self._carried[name][...] = value
        self.num_steps = checked["num_steps"]
        self.num_skipped = checked["num_skipped"]
        self.lr = checked["lr"]
        self._broken = None

    # -- raw state, for functional adapters (runtime.jax) ---------------------------------------

    def raw_state(self) -> dict[str, np.ndarray]:
        """Copies of the live buffers in the stepper's own layout: per-coordinate fields flat,
        chunk by chunk feature-major (see ``_block``), and the carried values. Only meaningful
        to ``load_raw_state`` of a stepper bound to the same shapes and chunk size."""
        raw = {name: self._backend.to_host(value).copy() for name, value in self._fields.items()}
        raw.update({name: value.copy() for name, value in self._carried.items()})
        return raw

    def raw_state_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {name: tuple(value.shape) for name, value in self._fields.items()}
        shapes.update({name: tuple(value.shape) for name, value in self._carried.items()})
        return shapes

    def load_raw_state(self, raw: Mapping[str, Any]) -> None:
        """Replaces the state with ``raw_state()``-layout arrays (checked: names and shapes).

        This makes the stepper a pure function of (state, gradients) for functional callers,
        so a step that failed midway is forgotten (the next load replaces all of it).
        """
        shapes = self.raw_state_shapes()
        if set(raw) != set(shapes):
            raise ValueError(f"raw state must have entries {sorted(shapes)}, got {sorted(raw)}")
        for name, shape in shapes.items():
            if tuple(np.shape(raw[name])) != shape:
                raise ValueError(
                    f"raw state entry {name!r} must have shape {shape}, got {np.shape(raw[name])}"
                )
        for name, value in raw.items():
            target = self._fields.get(name)
            if target is None:
                self._carried[name][...] = value
            else:
                self._backend.from_host(target, np.asarray(value, np.float32))
        self._broken = None

    # -- execution -------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise RuntimeError(
                f"a previous step failed midway ({self._broken}); the optimizer state is "
                f"inconsistent: restore it with load_state_dict() before stepping again"
            )

    def _reduce(self, partial: np.ndarray) -> np.ndarray:
        assert self._all_reduce is not None  # only sharded steps reduce across processes
        total = np.asarray(self._all_reduce(partial.copy()))
        if total.shape != partial.shape:
            raise ValueError(
                f"all_reduce must return an array of shape {partial.shape}, got {total.shape}"
            )
        return total

    def _combine(self, parts: np.ndarray, how: str) -> np.ndarray:
        if how == "same":
            return parts[0]
        total = parts.sum(axis=0, dtype=np.float64)  # fixed order: independent of threads
        return total if self._all_reduce is None else self._reduce(total)

    def _means_block(self, chunk: Chunk, flat: Any = None) -> Any:
        """The chunk's ``[S, n]`` block of the per-array terms / means buffer."""
        count = len(self._statistics)
        flat = self._means if flat is None else flat
        return flat[chunk.start * count : chunk.stop * count].reshape(count, chunk.size)

    def _array_means(self) -> None:
        """Turns the terms the ``ARRAY_TERMS`` pass wrote into each coordinate's per-array
        means: sums per array (float64, chunks in order, so independent of threads), one
        all-reduce of the sums and the arrays' sizes when sharded, then the means (the sums,
        for ``summed_statistics``) written back. An array with no coordinates on any shard keeps
        a mean of 0 (nothing reads it)."""
        count = len(self._statistics)
        host = self._backend.to_host(self._means)
        sums = np.zeros((count, self._num_arrays), np.float64)
        sizes = np.zeros(self._num_arrays, np.float64)
        for chunk in self._chunks:
            block = self._means_block(chunk, host)
            for p in chunk.pieces:
                index, width = self._array_ids[p.array], p.stop - p.start
                sums[:, index] += block[:, p.offset : p.offset + width].sum(1, dtype=np.float64)
                sizes[index] += width
        if self._all_reduce is not None:
            total = self._reduce(np.concatenate([sums.ravel(), sizes]))
            sums, sizes = total[: sums.size].reshape(sums.shape), total[sums.size :]
        means = np.divide(sums, sizes, out=np.zeros_like(sums), where=sizes > 0)
        means[self._summed] = sums[self._summed]  # these rows are sums (MethodInfo)
        means = means.astype(np.float32)
        for chunk in self._chunks:
            block = self._means_block(chunk, host)
            for p in chunk.pieces:
                width = p.stop - p.start
                block[:, p.offset : p.offset + width] = means[:, self._array_ids[p.array], None]
        self._backend.from_host(self._means, host)

    def _block(self, name: str, chunk: Chunk, flat: Any = None) -> Any:
        """The field's contiguous ``[k, n]`` (or ``[n]``) block of one chunk (of ``flat``, a
        host copy of the field, if given)."""
        field = self._field_specs[name]
        flat = self._fields[name] if flat is None else flat
        return flat[chunk.start * field.size : chunk.stop * field.size].reshape(
            *field.shape, chunk.size
        )

    def _canonical(self, name: str) -> np.ndarray:
        field, host = self._field_specs[name], self._backend.to_host(self._fields[name])
        out = np.empty((self.num_coords, *field.shape), np.float32)
        for chunk in self._chunks:
            out[chunk.start : chunk.stop] = self._block(name, chunk, host).T
        return out

    def _set_canonical(self, name: str, value: np.ndarray) -> None:
        host = self._backend.to_host(self._fields[name])
        for chunk in self._chunks:
            self._block(name, chunk, host)[...] = value[chunk.start : chunk.stop].T
        self._backend.from_host(self._fields[name], host)

    def _buffer(self, name: str, chunk: Chunk, k: int, output: bool) -> Any:
        """The memory bound to graph tensor ``name`` for chunk ``k``; None if bound per run."""
        if name == mf.GRAD or (name in (mf.PARAM, mf.updated(mf.PARAM)) and not chunk.zero_copy):
            return None
        if name in (mf.PARAM, mf.updated(mf.PARAM)):
            piece = chunk.pieces[0]
            return self._flat[piece.array][piece.start : piece.stop]
        base = name[: -len(mf.updated(""))] if name.endswith(mf.updated("")) else name
        if base in self._fields:  # h and h_new are the same memory: updated in place
            return self._block(base, chunk)
        if name in (mf.ARRAY_TERMS_OUT, mf.ARRAY_MEANS):  # one buffer: terms, then means
            return self._means_block(chunk)
        if name == mf.LR:
            return self._lr
        if name == mf.GRAD_SUM_SQ:
            return self._grad_sum_sq
        if name in self._reduced:
            return self._reduction_parts[name][k] if output else self._reduced[name]
        if base in self._carried:
            return self._carried_parts[base][k] if output else self._carried[base]
        raise mf.ManifestError(
            f"graph tensor {name!r} has no buffer in the {self.manifest.method} layout"
        )

    def _bind_static(self, role: str, k: int) -> ort.IOBinding:
        """An IOBinding with every buffer that stays put across steps already bound.

        Inputs and outputs that name the same state field share memory: each output is
        produced by a node downstream of every reader of that input, so the step is in place.
        """
        session, spec, chunk = self._sessions[role], self.manifest.graphs[role], self._chunks[k]
        binding, bind = session.io_binding(), self._backend.bind
        index = next(i for i, phase in enumerate(self._phases) if phase.role == role)
        for tensor in spec.inputs:
            buffer = self._buffer(tensor.name, chunk, k, output=False)
            if buffer is not None:
                bind(binding, tensor.name, buffer, output=False)
                if not self._backend.is_host and isinstance(buffer, np.ndarray):
                    self._rebound.setdefault((index, k), []).append((tensor.name, buffer))
        for tensor in spec.outputs:
            buffer = self._buffer(tensor.name, chunk, k, output=True)
            if buffer is not None:
                bind(binding, tensor.name, buffer, output=True)
        return binding

    def _scratch(self) -> tuple[Any, Any]:
        """Per-thread gather buffers (w, g), each as large as the largest packed chunk."""
        scratch = getattr(self._local, "scratch", None)
        if scratch is None or scratch[0].shape[0] < self._gather_size:
            scratch = (
                self._backend.zeros(self._gather_size),
                self._backend.zeros(self._gather_size),
            )
            self._local.scratch = scratch
        return scratch

    def _run(self, index: int, k: int, binding: ort.IOBinding) -> None:
        for name, buffer in self._rebound.get((index, k), ()):
            self._backend.bind(binding, name, buffer, output=False)
        self._sessions[self._phases[index].role].run_with_iobinding(binding)
        if not self._backend.is_host:
            binding.synchronize_outputs()

    def _run_chunk(self, index: int, k: int, flat_grads: list[np.ndarray]) -> None:
        role = self._phases[index].role
        spec, chunk, binding = self.manifest.graphs[role], self._chunks[k], self._bindings[index][k]
        inputs = {t.name for t in spec.inputs}
        bind = self._backend.bind
        if chunk.zero_copy:
            piece = chunk.pieces[0]
            grad = flat_grads[piece.array][piece.start : piece.stop]
            bind(binding, mf.GRAD, grad, output=False)
            self._run(index, k, binding)
            return
        w_buf, g_buf = (b[: chunk.size] for b in self._scratch())
        for p in chunk.pieces:
            g_buf[p.offset : p.offset + p.stop - p.start] = flat_grads[p.array][p.start : p.stop]
        bind(binding, mf.GRAD, g_buf, output=False)
        if mf.PARAM in inputs:
            for p in chunk.pieces:
                w_buf[p.offset : p.offset + p.stop - p.start] = self._flat[p.array][
                    p.start : p.stop
                ]
            bind(binding, mf.PARAM, w_buf, output=False)
            bind(binding, mf.updated(mf.PARAM), w_buf, output=True)
        self._run(index, k, binding)
        if mf.PARAM in inputs:
            for p in chunk.pieces:
                self._flat[p.array][p.start : p.stop] = w_buf[
                    p.offset : p.offset + p.stop - p.start
                ]

    def _run_phase(self, index: int, flat_grads: list[np.ndarray]) -> None:
        count = len(self._chunks)
        executor = self._executor()  # None once the optimizer is closed
        # CUDA work is already parallel on the device; chunks there run one after another.
        if executor is None or self._threads == 1 or count == 1 or not self._backend.is_host:
            with flush_subnormals() if self._backend.is_host else contextlib.nullcontext():
                for k in range(count):
                    self._run_chunk(index, k, flat_grads)
            return

        def run_share(first: int) -> None:
            with flush_subnormals():  # per thread; see runtime/subnormals.py
                for k in range(first, count, self._threads):
                    self._run_chunk(index, k, flat_grads)

        futures = [executor.submit(run_share, t) for t in range(min(self._threads, count))]
        wait(futures)  # all shares finish before an error propagates
        for future in futures:
            future.result()


def _fixed_shape(name: str, shape: tuple[int | str, ...]) -> tuple[int, ...]:
    """A reduction's shape, which the manifest gives without the symbolic coordinate axis."""
    if not all(isinstance(d, int) for d in shape):
        raise ValueError(f"reduction {name!r} has a symbolic shape {shape}")
    return tuple(int(d) for d in shape)
