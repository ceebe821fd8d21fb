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
    """Exponentially smoothed CPU ms per call-second of one process, starting from a prior.

    It starts at ``prior_ms`` (what a call cost where farm was measured, or the operator's
    figure) and moves toward what this process measures with time constant ``tau_s``. A
    burst of calls from idle is admitted on the prior, not on the first seconds of calls,
    which are mostly ringing and prompts and would make every call look cheap (measured:
    40 calls in 10 s were admitted 22 deep on a 2-core node whose CPUs hold ~12).

    Args:
        prior_ms: the figure before anything is measured.
        tau_s: time constant of the smoothing.
        clock: (wall, cpu) seconds, for tests.
    """

    def __init__(
        self,
        prior_ms: float,
        tau_s: float = 60.0,
        clock: tuple[Callable[[], float], Callable[[], float]] | None = None,
    ) -> None:
        self.tau_s = tau_s
        self._wall, self._cpu = clock or (time.monotonic, time.process_time)
        self._last = (self._wall(), self._cpu())
        self.ms = float(prior_ms)

    def sample(self, calls: int) -> None:
        """Account the time since the last sample to ``calls`` calls."""
        wall, cpu = self._wall(), self._cpu()
        dt, used = wall - self._last[0], cpu - self._last[1]
        self._last = (wall, cpu)
        if calls <= 0 or dt <= 0:
            return
        now = used * 1000 / (calls * dt)
        self.ms += min(1.0, dt / self.tau_s) * (now - self.ms)

    @property
    def figure(self) -> int:
        return round(self.ms)
