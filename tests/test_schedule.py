"""The budget logic: learning-rate schedule, validation cadence, stopping on time."""

import math

import pytest

from qpcell.errors import QpcellError
from qpcell.schedule import FINAL_FACTOR, Budget, final_validation_factor, lr_at, step_cap


def test_constant_schedule_is_the_papers():
    assert all(lr_at(p, 1e-3) == 1e-3 for p in (0.0, 0.3, 1.0))


def test_cosine_falls_from_lr_to_zero_monotonically():
    values = [lr_at(i / 100, 2e-3, "cosine") for i in range(101)]
    assert values[0] == pytest.approx(2e-3)
    assert values[50] == pytest.approx(1e-3)
    assert values[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_warmup_rises_linearly_then_cosine_starts_at_lr():
    lr = 1e-3
    assert lr_at(0.0, lr, "cosine", warmup=0.1) == pytest.approx(lr / 10)
    assert lr_at(0.05, lr, "cosine", warmup=0.1) == pytest.approx(lr * 0.55)
    assert lr_at(0.1, lr, "cosine", warmup=0.1) == pytest.approx(lr)
    assert lr_at(0.55, lr, "cosine", warmup=0.1) == pytest.approx(lr / 2)
    assert lr_at(1.0, lr, "cosine", warmup=0.1) == pytest.approx(0.0, abs=1e-12)


def test_progress_outside_the_run_is_clamped():
    assert lr_at(-1, 1e-3, "cosine") == pytest.approx(1e-3)
    assert lr_at(2, 1e-3, "cosine") == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kwargs", [{"schedule": "linear"}, {"warmup": 1.0}, {"warmup": -0.1}])
def test_bad_schedules_are_one_line_errors(kwargs):
    with pytest.raises(QpcellError):
        lr_at(0.5, 1e-3, **kwargs)


def simulate(budget: Budget, step_s: float, val_s: float) -> tuple[float, int, float, float]:
    """Drive a budget with a fake clock as train.train_rounds does: steps of ``step_s``,
    validations of ``val_s`` when asked, a final one ``final_factor`` times dearer and 1 s of
    writing. Returns the
    end time, the validations, the time spent validating and the last progress seen."""
    now = 0.0
    budget.start(now)
    validations, val_time, progress, steps = 0, 0.0, 0.0, 0
    while not budget.done(now, steps):
        progress = budget.progress(now, steps)
        now += step_s
        steps += 1
        if budget.should_validate(now, steps):
            now += val_s
            budget.validated(now, val_s, steps)
            validations, val_time = validations + 1, val_time + val_s
    final = budget.final_factor * val_s  # the kept model's full search
    now += final + 1.0  # and writing the model
    return now, validations + 1, val_time + final, progress


@pytest.mark.parametrize("seconds,step_s,val_s", [(600, 2.0, 20.0), (300, 1.0, 3.0),
                                                  (1800, 5.0, 60.0), (120, 0.5, 1.0)])
def test_a_budgeted_run_ends_on_time_and_validates_at_most_a_tenth(seconds, step_s, val_s):
    budget = Budget(seconds, val_share=0.1)
    end, validations, val_time, progress = simulate(budget, step_s, val_s)
    assert end <= seconds * 1.02 + step_s  # on time (one step may straddle the end)
    assert end >= seconds * 0.85  # and the time is used
    # validation within ~10% (the first round comes before its cost is known)
    assert val_time <= 0.1 * seconds + val_s
    assert validations >= 2
    assert validations <= budget.max_rounds + 1
    assert progress > 0.95  # the schedule ran to its end


def test_a_step_cap_ends_the_run_early_with_the_schedule_and_rounds_fitted_to_it():
    seconds, step_s, val_s = 600, 0.1, 1.0  # 6,000 steps of time, a cap of 1,500
    budget = Budget(seconds, val_share=0.1, max_steps=1500)
    end, validations, val_time, progress = simulate(budget, step_s, val_s)
    assert end < 0.4 * seconds  # stopped on the cap, not the clock
    assert progress > 0.95  # the learning-rate schedule still ran to its end
    assert budget.done(end, 1500) and not budget.done(0.5, 1499)
    assert 4 <= validations <= budget.max_rounds + 1  # rounds spread over the shorter run
    assert val_time <= 0.1 * end + val_s


def test_the_slower_of_time_and_steps_sets_progress():
    budget = Budget(100, max_steps=1000, final_factor=0.0)
    budget.start(0.0)
    assert budget.progress(49.0, 100) == pytest.approx(0.5)  # time leads
    assert budget.progress(10.0, 700) == pytest.approx(0.7)  # the steps lead
    assert budget.left(10.0, 700) == pytest.approx(300 * 10.0 / 700 + 2.0)  # at the rate so far
    assert budget.left(90.0, 100) == pytest.approx(10.0)  # the clock is the nearer end


def test_step_cap_follows_the_area_and_keeps_a_floor():
    one = step_cap(10 * 128 * 128, batch_size=8, window_px=128, passes=80)
    assert one == 100
    assert step_cap(40 * 128 * 128, batch_size=8, window_px=128, passes=80) == 4 * one
    assert step_cap(10 * 128 * 128, batch_size=8, window_px=128, passes=80,
                    min_steps=500) == 500
    assert step_cap(10 * 128 * 128, batch_size=8, window_px=128, passes=0) is None
    with pytest.raises(QpcellError):
        step_cap(100, batch_size=8, window_px=128, passes=-1)
    with pytest.raises(QpcellError):
        Budget(10, max_steps=0)


def test_cheap_validation_is_capped_by_max_rounds():
    budget = Budget(600, val_share=0.1, max_rounds=5)
    _, validations, _, _ = simulate(budget, 1.0, 0.1)
    assert validations <= 6


def test_interval_follows_the_measured_validation_cost():
    budget = Budget(1000, val_share=0.1)
    budget.start(0.0)
    budget.validated(100.0, 30.0)
    assert budget.cost_interval() == pytest.approx(570.0)  # 30 s of validation per 600 s
    assert budget.reserve > 30.0  # the final validation is kept back from training


def test_budget_must_be_positive():
    with pytest.raises(QpcellError):
        Budget(0)
    with pytest.raises(QpcellError):
        Budget(10, val_share=1.5)


def test_seconds_left_counts_down_to_zero():
    budget = Budget(60)
    budget.start(100.0)
    assert budget.left(100.0) == 60.0
    assert budget.left(130.0) == 30.0
    assert budget.left(500.0) == 0.0
    assert not math.isnan(budget.progress(130.0))


def test_a_final_validation_on_more_views_is_reserved_and_the_run_still_ends_on_time():
    assert final_validation_factor(1) == FINAL_FACTOR
    one, four = (Budget(300, final_factor=final_validation_factor(n)) for n in (1, 4))
    for budget in (one, four):
        budget.start(0.0)
        budget.validated(10.0, 5.0, 10)
    assert four.reserve - one.reserve == pytest.approx(3 * 5.0)  # three more views' maps
    assert four.train_seconds < one.train_seconds
    end, _, _, _ = simulate(Budget(300, final_factor=final_validation_factor(4)), 1.0, 3.0)
    assert 300 * 0.85 <= end <= 300 * 1.02 + 1.0
