"""What a call costs (workers/cost.py) and what the node holds (broker.node_capacity):
the arithmetic admission rests on, on a clock the test drives."""

from __future__ import annotations

import pytest

from farm.broker import wire
from farm.broker.broker import node_capacity
from workers.cost import CallCost


class Clock:
    def __init__(self) -> None:
        self.wall = 100.0
        self.cpu = 5.0

    def advance(self, wall_s: float, cpu_s: float) -> None:
        self.wall += wall_s
        self.cpu += cpu_s


def cost_on(clock: Clock, prior_ms: float = 130.0, tau_s: float = 20.0) -> CallCost:
    return CallCost(prior_ms, tau_s, clock=(lambda: clock.wall, lambda: clock.cpu))


def test_the_figure_starts_at_the_prior_and_each_window_moves_it_by_its_share_of_tau() -> None:
    clock = Clock()
    cost = cost_on(clock)
    assert cost.figure == 130  # a burst from idle is admitted on the prior
    clock.advance(2.0, 0.4)  # 4 calls, 0.4 CPU s in 2 s: 50 ms per call-second (ringing, prompts)
    cost.sample(4)
    assert cost.ms == pytest.approx(130 - 0.1 * 80)
    clock.advance(2.0, 1.6)  # 4 calls at 200 ms: 2/20 of the way again
    cost.sample(4)
    assert cost.ms == pytest.approx(122 + 0.1 * (200 - 122))


def test_time_without_calls_is_not_counted() -> None:
    clock = Clock()
    cost = cost_on(clock)
    clock.advance(30.0, 0.3)  # idle: the loop's own CPU is nobody's call
    cost.sample(0)
    assert cost.ms == 130.0


def test_a_window_longer_than_tau_replaces_the_figure() -> None:
    clock = Clock()
    cost = cost_on(clock, prior_ms=50, tau_s=1.0)
    clock.advance(5.0, 2.5)
    cost.sample(1)
    assert cost.figure == 500


@pytest.mark.parametrize(
    ("cpus", "share", "ms", "calls"),
    [(2, 0.85, 130, 13), (2, 0.85, 100, 17), (2, 0.5, 500, 2), (1, 0.85, 5000, 1), (8, 0, 130, 0), (2, 0.85, 0, 0)],
)
def test_node_capacity_is_the_cpus_calls_may_use_over_what_a_call_costs(
    cpus: int, share: float, ms: int, calls: int
) -> None:
    assert node_capacity(cpus, share, ms) == calls


def test_load_and_status_carry_the_cost_and_older_bodies_read_as_zero() -> None:
    load = wire.Load(calls=3, lag_ms=40, utterances=1, call_cpu_ms=128)
    assert wire.Load.decode(load.encode()) == load
    status = wire.Status(workers=2, lag_ms=0, calls=5, capacity=13, call_cpu_ms=128)
    assert wire.Status.decode(status.encode()) == status
    assert wire.Status.decode('{"workers":2,"lag_ms":0,"calls":5}') == wire.Status(2, 0, 5, 0, 0)
    with pytest.raises(wire.WireError, match="capacity"):
        wire.Status.decode('{"workers":2,"capacity":-1}')
