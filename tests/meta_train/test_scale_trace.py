"""The step-scale trace: it follows the benchmark's run, and it moves where the rule says."""

from __future__ import annotations

import pytest
import torch

from meta_train.optimizers.hyperadam_tensor import TensorwiseHyperAdam
from meta_train.scale_trace import main, trace_scale
from meta_train.tasks.quadratic import QuadraticTask


def _start(reference: str) -> tuple[TensorwiseHyperAdam, dict]:
    opt = TensorwiseHyperAdam(4, adaptive_scale=True, scale_reference=reference)
    theta = opt.adam_reduction(opt.init_theta(torch.Generator().manual_seed(0)), lr=0.003)
    return opt, theta


@pytest.mark.parametrize("reference", ["step", "trend"])
def test_the_scale_grows_on_a_quadratic_far_from_its_minimum(reference):
    # At α = 3e-3 a 10-d least-squares problem from a small init is a long, steady descent:
    # the gradient keeps agreeing with the run's direction, so the scale must grow.
    opt, theta = _start(reference)
    trace = trace_scale(opt, theta, QuadraticTask(), steps=200, points=4)
    assert [p.step for p in trace] == [50, 100, 150, 200]
    assert trace[-1].scale_median > trace[0].scale_median > 1.0
    assert trace[-1].loss < trace[0].loss


def test_the_trace_is_deterministic():
    opt, theta = _start("trend")
    first = trace_scale(opt, theta, QuadraticTask(), steps=60, points=3, run=1)
    assert first == trace_scale(opt, theta, QuadraticTask(), steps=60, points=3, run=1)
    assert first != trace_scale(opt, theta, QuadraticTask(), steps=60, points=3, run=2)


def test_bad_input_is_refused(tmp_path, capsys):
    plain = TensorwiseHyperAdam(4)
    theta = plain.init_theta(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="has no per-tensor step scale"):
        trace_scale(plain, theta, QuadraticTask(), steps=10)
    opt, theta = _start("trend")
    with pytest.raises(ValueError, match="points <= steps"):
        trace_scale(opt, theta, QuadraticTask(), steps=10, points=11)
    with pytest.raises(SystemExit):
        main(["--theta", "hyperadam", "--tasks", "logreg-cond1e5-10000"])
    assert "per-tensor step scale, not hyperadam" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--theta", str(tmp_path / "missing.npz"), "--tasks", "logreg-cond1e5-10000"])
