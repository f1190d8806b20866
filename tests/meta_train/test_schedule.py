"""Trajectory schedules: the paper's fixed horizon, and log-uniform horizons with random offsets."""

import math
import statistics

import pytest

from meta_train.experimental import HorizonConfig
from meta_train.schedule import TrajectorySchedule
from meta_train.training import position
from meta_train.unroll import UnrollConfig

LOG_UNIFORM = HorizonConfig("log_uniform", min_steps=100, max_steps=2000, offsets=True)


def test_a_fixed_horizon_is_the_papers_schedule_for_every_slot():
    unroll = UnrollConfig(100, 20)
    schedule = TrajectorySchedule(unroll)
    for slot in (0, 3):
        for step in range(23):
            where = schedule.position(slot, step)
            assert (where.trajectory, where.truncation) == position(step, unroll)
            assert where.length == 5 and where.last == (step % 5 == 4)


def walk(schedule, slot, steps):
    """Every position of ``slot`` over ``steps`` meta-steps, checked to be a chain."""
    positions = [schedule.position(slot, step) for step in range(steps)]
    for before, after in zip(positions, positions[1:], strict=False):
        if before.last:
            assert (after.trajectory, after.truncation) == (before.trajectory + 1, 0)
        else:
            assert after == before._replace(truncation=before.truncation + 1)
    return positions


def test_log_uniform_horizons_are_drawn_per_slot_and_trajectory_from_the_run_seed():
    unroll = UnrollConfig(100, 20)
    schedule = TrajectorySchedule(unroll, LOG_UNIFORM, run_seed=4)
    lengths = [schedule.trajectory_length(0, j) for j in range(1, 400)]
    assert min(lengths) >= 5 and max(lengths) <= 100  # 100 … 2 000 steps of 20
    # Log-uniform: the median horizon is near √(100 · 2000) ≈ 447 steps, not the mean 1 050.
    assert 18 <= statistics.median(lengths) <= 27
    assert sum(x <= 10 for x in lengths) > 0.15 * len(lengths)  # ≤ 200 steps: log(2)/log(20)
    again = TrajectorySchedule(unroll, LOG_UNIFORM, run_seed=4)
    assert [again.trajectory_length(0, j) for j in range(1, 400)] == lengths
    other_slot = [schedule.trajectory_length(1, j) for j in range(1, 400)]
    other_seed = TrajectorySchedule(unroll, LOG_UNIFORM, run_seed=5)
    assert other_slot != lengths
    assert [other_seed.trajectory_length(0, j) for j in range(1, 400)] != lengths
    positions = walk(schedule, 0, 3000)
    starts = [step for step, where in enumerate(positions) if where.truncation == 0]
    assert [b - a for a, b in zip(starts, starts[1:], strict=False)] == [
        schedule.trajectory_length(0, j) for j in range(len(starts) - 1)
    ]
    # Asked in any order (as a resumed learner does), a position is the same.
    fresh = TrajectorySchedule(unroll, LOG_UNIFORM, run_seed=4)
    asked = (2999, 17, 1500)
    assert [fresh.position(0, s) for s in asked] == [positions[s] for s in asked]


def test_random_offsets_cut_each_slots_first_trajectory_so_the_slots_do_not_start_together():
    unroll = UnrollConfig(100, 20)
    with_offsets = TrajectorySchedule(unroll, LOG_UNIFORM, run_seed=0)
    without = TrajectorySchedule(
        unroll, HorizonConfig("log_uniform", min_steps=100, max_steps=2000), run_seed=0
    )
    first = [with_offsets.trajectory_length(slot, 0) for slot in range(32)]
    drawn = [without.trajectory_length(slot, 0) for slot in range(32)]
    assert all(1 <= a <= b for a, b in zip(first, drawn, strict=True))
    assert first != drawn and len(set(first)) > 10
    # Later trajectories keep their drawn lengths.
    assert all(
        with_offsets.trajectory_length(s, j) == without.trajectory_length(s, j)
        for s in range(4) for j in range(1, 6)
    )  # fmt: skip
    # The share of slots starting a new trajectory at a step is spread out, not all-or-none.
    new_at = [sum(with_offsets.position(s, step).truncation == 0 for s in range(32))
              for step in range(1, 40)]  # fmt: skip
    assert max(new_at) < 16


def test_horizons_round_to_whole_truncations_inside_the_range():
    schedule = TrajectorySchedule(
        UnrollConfig(90, 30), HorizonConfig("log_uniform", min_steps=50, max_steps=100)
    )
    lengths = {schedule.trajectory_length(0, j) for j in range(200)}
    assert lengths <= {2, 3} and lengths  # 60 or 90 steps: the multiples of 30 in [50, 100]
    assert schedule.max_truncations == 3
    with pytest.raises(ValueError, match=r"no multiple of unroll.truncation \(30\) lies between"):
        TrajectorySchedule(
            UnrollConfig(90, 30), HorizonConfig("log_uniform", min_steps=31, max_steps=59)
        )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "random"}, r"horizons.kind must be one of \('fixed', 'log_uniform'\)"),
        ({"min_steps": 10}, "apply to kind 'log_uniform' only"),
        ({"offsets": True}, "apply to kind 'log_uniform' only"),
        ({"kind": "log_uniform", "max_steps": 10}, r"horizons.min_steps must be an integer >= 1"),
        ({"kind": "log_uniform", "min_steps": 10, "max_steps": 5}, "max_steps .5. must be >="),
        ({"kind": "log_uniform", "min_steps": 1.5, "max_steps": 5}, "min_steps must be an integ"),
        ({"kind": "log_uniform", "min_steps": 1, "max_steps": 5, "offsets": 1}, "true or false"),
    ],
)
def test_bad_horizons_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        HorizonConfig(**fields)


def test_the_median_of_a_log_uniform_draw_is_the_geometric_mean():
    schedule = TrajectorySchedule(
        UnrollConfig(100, 1), HorizonConfig("log_uniform", min_steps=10, max_steps=10_000)
    )
    steps = [schedule.trajectory_length(7, j) for j in range(2000)]
    assert abs(math.log(statistics.median(steps)) - math.log(math.sqrt(10 * 10_000))) < 0.3
