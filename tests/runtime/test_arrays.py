"""runtime.arrays: zero-copy views of any framework's CPU arrays, and refusals before any change."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import runtime
from runtime import arrays


@pytest.fixture(scope="module")
def opt(hyperadam_folder):
    return runtime.load(hyperadam_folder, threads=1)


def test_kinds_devices_and_views_without_copies():
    t = torch.arange(6, dtype=torch.float32, requires_grad=True)
    view = arrays.host_view(t)
    assert view.ctypes.data == t.data_ptr() and view.flags.writeable
    assert (arrays.kind_of(t), arrays.device_of(t), arrays.dtype_name(t)) == (
        "torch",
        "cpu",
        "float32",
    )
    a = np.zeros(3, np.float32)
    assert arrays.host_view(a) is a and arrays.kind_of(a) == "numpy"


def test_cpu_torch_tensors_are_updated_in_place(opt):
    params = [torch.randn(4, 3), torch.nn.Parameter(torch.randn(7))]
    pointers = [p.data_ptr() for p in params]
    copies = [p.detach().numpy().copy() for p in params]
    stepper = opt.bind(params, chunk_size=8)
    assert (stepper.framework, stepper.device) == ("torch", "cpu")
    grads = [torch.full_like(p, 0.1) for p in params]
    stepper.step(grads)
    opt.bind(copies, chunk_size=8).step([g.numpy() for g in grads])
    assert [p.data_ptr() for p in params] == pointers
    assert all(np.array_equal(c, p.detach().numpy()) for c, p in zip(copies, params, strict=True))


def torch_params():
    return [torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), torch.randn(5)]


BAD_GRADS = [
    ("numpy-for-torch", lambda: [np.zeros((4, 3), np.float32), torch.zeros(5)], TypeError,
     r"^gradient 0 must be a torch\.Tensor, got numpy\.ndarray$"),
    ("count", lambda: [torch.zeros(4, 3)], ValueError,
     r"^expected 2 gradients \(one per parameter\), got 1$"),
    ("shape", lambda: [torch.zeros(3, 4), torch.zeros(5)], ValueError,
     r"^gradient 0 has shape \(3, 4\) but parameter 0 has \(4, 3\)$"),
    ("dtype", lambda: [torch.zeros(4, 3), torch.zeros(5, dtype=torch.float64)], ValueError,
     r"^gradient 1 has dtype float64 but parameter 1 has float32$"),
    ("non-contiguous", lambda: [torch.zeros(3, 4).T, torch.zeros(5)], ValueError,
     r"^gradient 0 is not C-contiguous"),
    ("not-a-sequence", lambda: torch.zeros(5), TypeError,
     r"^grads must be a list or tuple of torch\.Tensors, got Tensor$"),
]  # fmt: skip


@pytest.mark.parametrize(
    "make, error, message", [c[1:] for c in BAD_GRADS], ids=[c[0] for c in BAD_GRADS]
)
def test_bad_gradients_raise_before_any_change(opt, make, error, message):
    params = torch_params()
    stepper = opt.bind(params, chunk_size=8)
    stepper.step([torch.full_like(p, 0.1) for p in params])
    before, state = [p.clone() for p in params], stepper.state_dict()
    with pytest.raises(error, match=message):
        stepper.step(make())
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    after = stepper.state_dict()
    assert after["num_steps"] == 1
    assert all(np.array_equal(state["state"][k], after["state"][k]) for k in state["state"])


BAD_PARAMS = [
    ("mixed", lambda: [torch.zeros(3), np.zeros(3, np.float32)], TypeError,
     r"^parameter 1 must be a torch\.Tensor like parameter 0, got numpy\.ndarray$"),
    ("non-contiguous", lambda: [torch.zeros(4, 4)[:, 1]], ValueError,
     r"^parameter 0 is not C-contiguous: it is updated in place"),
    ("float16", lambda: [torch.zeros(3, dtype=torch.float16)], ValueError,
     r"^parameter 0 has dtype float16; the runtime steps float32 only$"),
    ("overlap", lambda: (lambda base: [base[:6], base[4:]])(torch.zeros(10)), ValueError,
     r"^parameter 1 overlaps parameter 0 in memory$"),
]  # fmt: skip


@pytest.mark.parametrize(
    "make, error, message", [c[1:] for c in BAD_PARAMS], ids=[c[0] for c in BAD_PARAMS]
)
def test_bad_parameters_are_refused(opt, make, error, message):
    with pytest.raises(error, match=message):
        opt.bind(make())
