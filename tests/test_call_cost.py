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


def cost_on(clock: Clock, tau_s: float = 20.0) -> CallCost:
    return CallCost(tau_s, clock=(lambda: clock.wall, lambda: clock.cpu))


def test_the_first_window_sets_the_figure_and_later_ones_move_it_by_their_share_of_tau() -> None:
    clock = Clock()
    cost = cost_on(clock)
    clock.advance(1.0, 0.4)  # 4 calls, 0.4 CPU s in 1 s: 100 ms per call-second
    cost.sample(4)
    assert cost.ms == pytest.approx(100.0)
    clock.advance(2.0, 1.6)  # 4 calls at 200 ms: moves 2/20 of the way
    cost.sample(4)
    assert cost.ms == pytest.approx(110.0)


def test_time_without_calls_is_not_counted_and_the_figure_is_known_after_5_call_seconds() -> None:
    clock = Clock()
    cost = cost_on(clock)
    clock.advance(1.0, 0.13)
    cost.sample(1)
    assert cost.ms == pytest.approx(130.0) and cost.known == 0  # 1 call-second: not yet
    clock.advance(30.0, 0.3)  # idle: the loop's own CPU is nobody's call
    cost.sample(0)
    assert cost.ms == pytest.approx(130.0)
    clock.advance(1.0, 0.52)
    cost.sample(4)
    assert cost.known == 130 and cost.call_s == pytest.approx(5.0)


def test_a_window_longer_than_tau_replaces_the_figure() -> None:
    clock = Clock()
    cost = cost_on(clock, tau_s=1.0)
    clock.advance(1.0, 0.1)
    cost.sample(1)
    clock.advance(5.0, 2.5)
    cost.sample(1)
    assert cost.ms == pytest.approx(500.0)


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
