"""The fused HyperAdam step against the reference: forward, θ- and state-gradients, edge cases."""

import pickle

import pytest
import torch

from meta_train.optimizers.hyperadam import HyperAdam, HyperAdamState, hyperadam_step
from meta_train.optimizers.hyperadam_fast import hyperadam_step_fast
from meta_train.seeding import generator
from meta_train.tasks.quadratic import QuadraticTask
from meta_train.unroll import UnrollConfig, start_trajectory, unroll_truncation


def perturbed_theta(opt: HyperAdam, dtype: torch.dtype, seed: int = 0) -> dict:
    """The spec's initialisation plus noise, so that no bias or gate sits at a special value."""
    theta = opt.init_theta(generator(seed))
    g = generator(seed, 1)
    return {k: (v + 0.2 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in theta.items()}


def gradients(p: int, steps: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """Heavy-tailed gradients with exactly-zero coordinates (as ReLU nets and biases produce)."""
    g = generator(seed, 2)
    grads = []
    for _ in range(steps):
        grad = torch.randn(p, generator=g) * torch.rand(p, generator=g).pow(4) * 3
        grad[torch.rand(p, generator=g) < 0.1] = 0.0
        grads.append(grad.to(dtype))
    return grads


def truncation(step, theta, grads, state, *, lr=0.005):
    """A truncation like ``unroll_truncation``: iterates, final state and the θ/state gradients.

    The meta-loss is the first-order surrogate mean_k ⟨g_k, w_k⟩ plus a term on the final state,
    so that the gradients of every state output are exercised too.
    """
    leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    start = HyperAdamState(*(x.clone().requires_grad_(True) for x in state))
    w = torch.zeros_like(grads[0])
    surrogate = torch.zeros((), dtype=w.dtype)
    deltas = []
    current = start
    for grad in grads:
        surrogate = surrogate + torch.dot(grad, w)
        delta, current = step(leaves, grad, current, lr=lr)
        deltas.append(delta)
        w = w + delta
    weights = torch.linspace(0.5, 1.5, 6, dtype=w.dtype)
    loss = surrogate / len(grads) + sum(
        c * x.square().mean() for c, x in zip(weights, current, strict=True)
    )
    inputs = [*leaves.values(), *start]
    grads_out = torch.autograd.grad(loss, inputs)
    names = [*leaves, *(f"state.{n}" for n in HyperAdamState._fields)]
    outputs = {"delta": torch.stack(deltas).detach()}
    outputs.update(
        {f"new.{n}": x.detach() for n, x in zip(HyperAdamState._fields, current, strict=True)}
    )
    outputs.update({f"d/d{n}": g for n, g in zip(names, grads_out, strict=True)})
    return outputs


def random_state(p: int, j: int, dtype: torch.dtype, seed: int = 0) -> HyperAdamState:
    """A mid-trajectory state (positive v, b, Γ), to test the state gradients from step one."""
    g = generator(seed, 3)
    h, c, m = (torch.randn(p, j, generator=g) * s for s in (0.3, 0.5, 0.01))
    v = torch.rand(p, j, generator=g) * 1e-4
    b, gam = torch.rand(p, j, generator=g), torch.rand(p, j, generator=g)
    return HyperAdamState(*(x.to(dtype) for x in (h, c, m, v, b, gam)))


def assert_all_close(fast: dict, ref: dict, *, rtol: float) -> None:
    """Max error of each output relative to that output's largest magnitude."""
    for name, expected in ref.items():
        scale = expected.abs().max().clamp_min(1e-30)
        err = float((fast[name] - expected).abs().max() / scale)
        assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:.0e}"


@pytest.fixture
def threads():
    """Restores torch's thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("start", ["zero-state", "mid-trajectory"])
def test_float32_truncation_matches_reference(start, threads):
    opt = HyperAdam(20)
    p = 3001  # not a multiple of the kernel's block
    theta = perturbed_theta(opt, torch.float32)
    grads = gradients(p, 20, torch.float32)
    state = opt.init_state(p) if start == "zero-state" else random_state(p, 20, torch.float32)
    threads(1)  # the reference's own result hardly depends on it, and 1 is fastest on a busy CI
    ref = truncation(hyperadam_step, theta, grads, state)
    for count in (1, 2):  # the fast step splits rows over threads: partial sums must add up
        threads(count)
        assert_all_close(truncation(hyperadam_step_fast, theta, grads, state), ref, rtol=2e-4)


@pytest.mark.parametrize("p,j", [(1, 1), (5, 3), (300, 7), (700, 20)], ids=lambda x: str(x))
def test_float64_matches_reference_to_round_off(p, j):
    """In float64 every function is exact to ~1e-16, so this checks the hand-derived backward."""
    opt = HyperAdam(j)
    theta = perturbed_theta(opt, torch.float64, seed=p)
    grads = gradients(p, 6, torch.float64, seed=p)
    state = random_state(p, j, torch.float64, seed=p)
    ref = truncation(hyperadam_step, theta, grads, state)
    fast = truncation(hyperadam_step_fast, theta, grads, state)
    assert_all_close(fast, ref, rtol=1e-10)


def test_gradcheck_float64():
    opt = HyperAdam(3)
    p = 4
    theta = perturbed_theta(opt, torch.float64)
    names = list(theta)
    grad = gradients(p, 1, torch.float64)[0]
    # Moderate second moments: with v ≈ 1e-4 the finite differences themselves are off by ~1%.
    state = random_state(p, 3, torch.float64)._replace(
        v=torch.rand(p, 3, dtype=torch.float64) + 0.1
    )

    def two_steps(*tensors):
        th = dict(zip(names, tensors[: len(names)], strict=True))
        s = HyperAdamState(*tensors[len(names) :])
        d1, s = hyperadam_step_fast(th, grad, s, lr=0.1)
        d2, s = hyperadam_step_fast(th, grad * 0.5, s, lr=0.1)
        return d1 + d2, *s

    inputs = [t.clone().requires_grad_(True) for t in (*theta.values(), *state)]
    assert torch.autograd.gradcheck(
        two_steps, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True
    )


@pytest.mark.parametrize("kind", ["all-zero", "one-nonzero"])
def test_zero_gradients(kind):
    opt = HyperAdam(20)
    p = 257
    theta = perturbed_theta(opt, torch.float32)
    grads = [torch.zeros(p) for _ in range(3)]
    if kind == "one-nonzero":
        grads[1][7] = 1e-3
    ref = truncation(hyperadam_step, theta, grads, opt.init_state(p))
    fast = truncation(hyperadam_step_fast, theta, grads, opt.init_state(p))
    for name, x in fast.items():
        assert torch.isfinite(x).all(), name
    assert_all_close(fast, ref, rtol=1e-4)


def test_subnormal_state_is_flushed_inside_the_kernel_only():
    # A candidate whose gradients stay zero decays into subnormals, which x86 computes with a
    # slow microcode assist; the kernel treats them as zero (FTZ/DAZ), and only inside itself.
    opt = HyperAdam(20)
    p = 1000
    theta = perturbed_theta(opt, torch.float32)
    grad = gradients(p, 1, torch.float32)[0]
    state = random_state(p, 20, torch.float32)
    tiny = torch.rand(p, 20, generator=generator(0, 9)) < 0.3
    subnormal = HyperAdamState(*(torch.where(tiny, torch.full_like(x, 1e-39), x) for x in state))
    zeroed = HyperAdamState(*(torch.where(tiny, torch.zeros_like(x), x) for x in state))
    assert float(subnormal.m[tiny][0]) != 0.0  # really subnormal, not already flushed
    with torch.no_grad():
        d_sub, s_sub = hyperadam_step_fast(theta, grad, subnormal)
        d_zero, s_zero = hyperadam_step_fast(theta, grad, zeroed)
    assert torch.equal(d_sub, d_zero)
    for a, b in zip(s_sub, s_zero, strict=True):
        assert torch.equal(a, b)
    # The caller's floating-point mode is restored: torch still produces subnormals.
    assert float(torch.tensor(1e-38) / 100) != 0.0


def test_no_grad_forward_and_state_interchange():
    """Under no_grad the step is the same, and either implementation continues the other."""
    opt = HyperAdam(20)
    p = 1000
    theta = perturbed_theta(opt, torch.float32)
    grads = gradients(p, 4, torch.float32)
    with torch.no_grad():
        _, ref_state = hyperadam_step(theta, grads[0], opt.init_state(p))
        _, fast_state = hyperadam_step_fast(theta, grads[0], opt.init_state(p))
        for a, b in zip(fast_state, ref_state, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            assert a.shape == (p, 20)
        d_ref, _ = hyperadam_step(theta, grads[1], fast_state)  # fast layout into the reference
        d_fast, _ = hyperadam_step_fast(theta, grads[1], ref_state)  # and row-major into fast
    torch.testing.assert_close(d_fast, d_ref, rtol=1e-4, atol=1e-8)
    assert fast_state.h.contiguous().is_contiguous()


class FastHyperAdam(HyperAdam):
    """HyperAdam stepping with the fused implementation (what ``implementation="fast"`` does)."""

    def step(self, theta, grad, state, *, lr):
        return hyperadam_step_fast(theta, grad, state, lr=lr)


def test_unroll_truncations_match_reference():
    """Two consecutive truncations of ``unroll_truncation``: meta-gradients, losses, trajectory."""
    task = QuadraticTask(dim=700, rows=256, batch_size=32, seed=3)
    config = UnrollConfig(horizon=40, truncation=20)
    results = {}
    for opt in (HyperAdam(20), FastHyperAdam(20)):
        theta = opt.flatten(perturbed_theta(opt, torch.float32))
        trajectory = start_trajectory(opt, task, seed=5)
        results[type(opt).__name__] = runs = []
        for _ in range(2):  # the second starts from the first's (fast-layout) state
            runs.append(unroll_truncation(opt, theta, task, trajectory, config))
            trajectory = runs[-1].trajectory
    for ref, fast in zip(results["HyperAdam"], results["FastHyperAdam"], strict=True):
        assert_all_close(
            {"meta_grad": fast.meta_grad, "params": fast.trajectory.params},
            {"meta_grad": ref.meta_grad, "params": ref.trajectory.params},
            rtol=2e-4,
        )
        assert fast.meta_loss == pytest.approx(ref.meta_loss, rel=1e-5)


def test_state_pickles_compactly_and_resumes():
    """Trajectories cross processes: the fast state pickles as about its own size and resumes."""
    opt = HyperAdam(20)
    p = 2000
    theta = perturbed_theta(opt, torch.float32)
    grads = gradients(p, 3, torch.float32)
    leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    state = opt.init_state(p)
    for grad in grads[:2]:  # with grad enabled, as in an unroll
        _, state = hyperadam_step_fast(leaves, grad, state)
    state = HyperAdamState(*(x.detach() for x in state))
    blob = pickle.dumps(state)  # what Ray does to a trajectory
    assert len(blob) < 1.25 * 6 * p * 20 * 4 + 100_000
    loaded = pickle.loads(blob)
    with torch.no_grad():
        expected, _ = hyperadam_step_fast(theta, grads[2], state)
        resumed, _ = hyperadam_step_fast(theta, grads[2], loaded)
    torch.testing.assert_close(resumed, expected, rtol=0, atol=0)


def bad_inputs():
    opt = HyperAdam(4)
    theta = perturbed_theta(opt, torch.float32)
    state = opt.init_state(10)
    grad = torch.ones(10)
    return [
        ("grad-2d", theta, grad.view(2, 5), state, ValueError, r"grad must be a flat \[p\] tensor"),
        ("grad-int", theta, grad.long(), state, ValueError, r"runs on CPU float32/float64"),
        (
            "grad-requires-grad",
            theta,
            grad.clone().requires_grad_(True),
            state,
            ValueError,
            r"does not differentiate through the gradient",
        ),
        (
            "state-shape",
            theta,
            grad,
            state._replace(v=torch.zeros(10, 5)),
            ValueError,
            r"state\.v must be a \[10, J\] torch\.float32 tensor like state\.h, "
            r"got shape \(10, 5\)",
        ),
        (
            "theta-shape",
            {**theta, "weight_kernel": torch.zeros(4, 5)},
            grad,
            state,
            ValueError,
            r"theta\['weight_kernel'\] must have shape \(4, 4\) and dtype torch\.float32 for J = 4",
        ),
        (
            "theta-dtype",
            {**theta, "pre_bias": theta["pre_bias"].double()},
            grad,
            state,
            ValueError,
            r"theta\['pre_bias'\] must have shape \(4,\) and dtype torch\.float32",
        ),
    ]


@pytest.mark.parametrize(
    "theta,grad,state,error,match",
    [case[1:] for case in bad_inputs()],
    ids=[c[0] for c in bad_inputs()],
)
def test_rejects_bad_inputs(theta, grad, state, error, match):
    with pytest.raises(error, match=match):
        hyperadam_step_fast(theta, grad, state)


# -- the kernel cache: only a library this user built, in a folder only this user writes -------

PLANTED_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("planted code ran", f); fclose(f); }
}
int hyperadam_block_rows(void) { return 7; }
"""
LOAD_KERNELS = (
    "from meta_train.optimizers import hyperadam_fast as f\n"
    "print('block rows', f.kernels().block_rows)\n"
)


def plant_library(folder, name, marker):
    """A shared library whose constructor writes ``marker``, at the kernels' expected name."""
    import shutil
    import subprocess

    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    source = folder.parent / "planted.c"
    source.write_text(PLANTED_C)
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(folder / name),
                    str(source)], check=True)
    return folder / name


@pytest.mark.parametrize("case", ["foreign-owned", "world-writable", "ours-without-digest"])
def test_a_planted_kernel_library_is_never_loaded(tmp_path, case):
    """Another local user plants a library at the computable name in the temp-folder fallback
    (or in a folder of ours, with no digest of ours beside it): its code must never run."""
    import os
    import subprocess
    import sys

    from meta_train.optimizers import hyperadam_fast

    if os.getuid() != 0 and case == "foreign-owned":
        pytest.skip("chown to another user needs root")
    name = hyperadam_fast.library_path().name  # the name depends on source, compiler and CPU
    marker = tmp_path / "planted-ran"
    tmp = tmp_path / "tmp"  # stands for /tmp: sticky and world-writable
    tmp.mkdir()
    os.chmod(tmp, 0o1777)
    env = {**os.environ, "TMPDIR": str(tmp), "XDG_CACHE_HOME": "/proc/no-cache-here"}
    env.pop(hyperadam_fast.CACHE_ENV, None)
    if case == "ours-without-digest":
        folder = tmp_path / "private"
        env[hyperadam_fast.CACHE_ENV] = str(folder)
        plant_library(folder, name, marker)
        os.chmod(folder, 0o700)
    else:
        folder = tmp / f"hyperadam-kernels-{os.getuid()}"
        plant_library(folder, name, marker)
        os.chmod(folder, 0o777)
        if case == "foreign-owned":
            os.chmod(folder, 0o755)
            for path in (folder, folder / name):
                os.chown(path, 65534, 65534)  # nobody
    proc = subprocess.run([sys.executable, "-c", LOAD_KERNELS], env=env, capture_output=True,
                          text=True, timeout=600)
    assert not marker.exists(), "the planted library was loaded"
    if case == "ours-without-digest":
        # Rebuilt over the planted file, then loaded: the real kernels (512-row blocks).
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == f"block rows {hyperadam_fast.block_rows()}\n"
        assert (folder / f"{name}.sha256").is_file()
    else:
        assert proc.returncode != 0
        refusal = (
            f"is owned by uid 65534, not {os.getuid()}" if case == "foreign-owned"
            else "is writable by its group or others (mode 777)"
        )
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("RuntimeError: no private folder to build the HyperAdam kernels")
        assert f"kernel folder {folder} {refusal}" in last
