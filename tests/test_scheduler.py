"""The recognition threads' order (workers/scheduler.py): finals awaited first, then the rest
first come first served, one slice per turn. Real threads; the "work" is recorded, not Vosk."""

from __future__ import annotations

import threading
import time

from workers.scheduler import AsrScheduler

from .conftest import MS


class Stream:
    """A stand-in for an AsrStream (the scheduler's only contract is run_slice)."""

    def __init__(self, name: str, log: list[str], slices: int = 1, gate: threading.Event | None = None) -> None:
        self.name = name
        self.log = log
        self.left = slices
        self.gate = gate
        self.scheduler: AsrScheduler | None = None
        self.urgent = False

    def run_slice(self) -> None:
        if self.gate is not None:
            self.gate.wait()
        self.log.append(self.name)
        self.left -= 1
        if self.left and self.scheduler is not None:
            self.scheduler.submit(self, self.urgent)


def wait_for(condition: object, timeout: float = 10_000 * MS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.001)


def test_an_awaited_final_goes_before_audio_queued_earlier() -> None:
    log: list[str] = []
    gate = threading.Event()
    scheduler = AsrScheduler(1)
    try:
        blocker = Stream("blocker", log, gate=gate)
        scheduler.submit(blocker, urgent=False)
        wait_for(lambda: scheduler.waiting == 0)  # the one thread is inside blocker
        for name in ("a", "b", "c"):
            scheduler.submit(Stream(name, log), urgent=False)
        scheduler.submit(Stream("final", log), urgent=True)
        gate.set()
        wait_for(lambda: len(log) == 5)
    finally:
        scheduler.shutdown()
    assert log == ["blocker", "final", "a", "b", "c"]
    assert scheduler.turns == [1, 4, 0, 0]


def test_a_queued_stream_promoted_when_its_utterance_ends_jumps_the_queue_once() -> None:
    log: list[str] = []
    gate = threading.Event()
    scheduler = AsrScheduler(1)
    try:
        scheduler.submit(Stream("blocker", log, gate=gate), urgent=False)
        wait_for(lambda: scheduler.waiting == 0)
        a, b, c = (Stream(n, log) for n in "abc")
        for s in (a, b, c):
            scheduler.submit(s, urgent=False)
        scheduler.promote(c)
        scheduler.promote(c)  # already urgent: nothing more
        assert scheduler.waiting == 3
        gate.set()
        wait_for(lambda: len(log) == 4)
        time.sleep(0.05)
    finally:
        scheduler.shutdown()
    assert log == ["blocker", "c", "a", "b"]  # c once: its stale place in the queue is skipped


def test_a_stream_with_a_backlog_takes_turns_with_the_others() -> None:
    log: list[str] = []
    gate = threading.Event()
    scheduler = AsrScheduler(1)
    try:
        scheduler.submit(Stream("blocker", log, gate=gate), urgent=False)
        wait_for(lambda: scheduler.waiting == 0)
        big = Stream("big", log, slices=3)
        big.scheduler = scheduler
        small = Stream("small", log)
        scheduler.submit(big, urgent=False)
        scheduler.submit(small, urgent=False)
        gate.set()
        wait_for(lambda: len(log) == 5)
    finally:
        scheduler.shutdown()
    assert log == ["blocker", "big", "small", "big", "big"]


def test_several_threads_serve_in_parallel_and_shutdown_drops_the_queue() -> None:
    log: list[str] = []
    gate = threading.Event()
    scheduler = AsrScheduler(3)
    for name in ("x", "y", "z"):
        scheduler.submit(Stream(name, log, gate=gate), urgent=False)
    wait_for(lambda: scheduler.waiting == 0)  # all three running at once
    scheduler.submit(Stream("never", log), urgent=False)
    assert scheduler.waiting == 1
    gate.set()
    scheduler.shutdown()
    assert sorted(log[:3]) == ["x", "y", "z"]
    assert scheduler.waiting == 0
