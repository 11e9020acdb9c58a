"""The scheduler's step time: its work from a forward's result to the next forward, never its waits."""

from __future__ import annotations

import pytest

from scheduler.metrics import StepTimer


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_counts_from_the_first_result_until_closed_and_nothing_while_closed():
    clock = FakeClock()
    timer = StepTimer(clock)
    clock.now += 20.0  # idle: no result came
    assert timer.close() == 0.0
    timer.result_arrived()
    clock.now += 0.002
    timer.result_arrived()  # a second result before the next forward: still timed from the first
    clock.now += 0.001
    assert timer.close() == pytest.approx(0.003)
    clock.now += 20.0  # waiting for the next request once the step was closed
    assert timer.close() == 0.0
