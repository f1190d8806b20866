import pytest

from meta_train.adaptivity import main, trace_decisions
from meta_train.optimizers.hyperadam import DEFAULT_LR, HyperAdam
from meta_train.seeding import generator
from meta_train.tasks.quadratic import QuadraticTask


def _theta(pre_kernel_scale: float = 1.0):
    optimizer = HyperAdam(4)
    theta = optimizer.init_theta(generator(3))
    return {**theta, "pre_kernel": theta["pre_kernel"] * pre_kernel_scale}


def test_the_adam_reduction_decides_the_same_for_every_coordinate():
    optimizer = HyperAdam(4)
    theta = optimizer.adam_reduction(_theta(), lr=0.01, beta1=0.9, beta2=0.999)
    trace = trace_decisions(theta, QuadraticTask(dim=50), at=[5, 0, 3])
    assert [d.step for d in trace] == [0, 3, 5]
    for d in trace:
        assert d.rho_sum_mean == pytest.approx(0.01 / DEFAULT_LR, rel=1e-5)
        assert d.rho_sum_std == 0.0  # rounding in the means over candidates only:
        assert d.beta_std < 1e-6 and d.gamma_std < 1e-6
        assert d.beta_mean == pytest.approx(0.9, rel=1e-5)
        assert d.gamma_mean == pytest.approx(0.999, rel=1e-5)


def test_a_state_cell_that_sees_the_gradient_spreads_its_decisions():
    task = QuadraticTask(dim=50)
    blind = trace_decisions(_theta(1.0), task, at=[3])[0]
    seeing = trace_decisions(_theta(100.0), task, at=[3])[0]
    assert seeing.rho_sum_std > 10 * blind.rho_sum_std > 0
    # The trace follows the run that evaluate() makes: run 0 of the seed, loss for loss.
    from meta_train.evaluate import run_once, run_seed

    class _Rule:
        name = "hyperadam"

        def init(self, n):
            return HyperAdam(4).init_state(n)

        def update(self, grad, state):
            return HyperAdam(4).step(_theta(100.0), grad, state, lr=DEFAULT_LR)

    run = run_once(task, _Rule(), steps=4, seed=run_seed(1, 0))
    assert [d.loss for d in trace_decisions(_theta(100.0), task, at=[0, 3])] == pytest.approx(
        [run.curve[0], run.curve[3]], rel=1e-6
    )


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(ValueError, match=r"at must name steps >= 0"):
        trace_decisions(_theta(), QuadraticTask(), at=[])
    with pytest.raises(SystemExit):
        main(["--tasks", "mnist-nn-sigmoid-100", "--at", "x"])
    assert "--at must be comma-separated integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--theta", "rnnprop", "--tasks", "mnist-nn-sigmoid-100"])
    assert "must hold a HyperAdam θ, not rnnprop" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--tasks", "no-such-task"])
    assert "unknown test task 'no-such-task'" in capsys.readouterr().err


def test_the_command_prints_one_row_per_task_and_step(capsys):
    main(["--tasks", "sin-lstm", "--at", "0,1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sin-lstm |")]
    assert [row.split(" | ")[1] for row in rows] == ["0", "1"]
