"""What a call costs its worker: CPU milliseconds per call-second, measured and smoothed.

The broker turns the workers' figures into the node's capacity (how many calls fit in
its CPUs), so the ingress can refuse the call that would put every call behind instead
of admitting it and falling behind for all of them (bench/RESULTS.md: a 2-core node
falls minutes behind in silence when calls keep coming past ~13). The figure is the
worker process's CPU time (every thread: decoding, VAD, the loop) over the calls it
served meanwhile; time with no call is not counted, so an idle worker keeps its last
figure instead of drifting to zero.
"""

from __future__ import annotations

import time
from collections.abc import Callable


__all__ = ["CallCost"]


class CallCost:
    """Exponentially smoothed CPU ms per call-second of one process.

    Args:
        tau_s: time constant of the smoothing (a burst of speech on every call moves the
            figure within about this long; a single Vosk stall hardly does).
        clock: (wall, cpu) seconds, for tests.
    """

    def __init__(
        self, tau_s: float = 20.0, clock: tuple[Callable[[], float], Callable[[], float]] | None = None
    ) -> None:
        self.tau_s = tau_s
        self._wall, self._cpu = clock or (time.monotonic, time.process_time)
        self._last = (self._wall(), self._cpu())
        self.ms = 0.0  # 0: nothing measured yet
        self.call_s = 0.0  # call-seconds measured so far

    def sample(self, calls: int) -> None:
        """Account the time since the last sample to ``calls`` calls."""
        wall, cpu = self._wall(), self._cpu()
        dt, used = wall - self._last[0], cpu - self._last[1]
        self._last = (wall, cpu)
        if calls <= 0 or dt <= 0:
            return
        now = used * 1000 / (calls * dt)
        self.call_s += calls * dt
        if not self.ms:
            self.ms = now
            return
        weight = min(1.0, dt / self.tau_s)
        self.ms += weight * (now - self.ms)

    @property
    def known(self) -> int:
        """The figure once a few call-seconds back it (a first window is mostly noise), else 0."""
        return round(self.ms) if self.call_s >= 5.0 else 0
