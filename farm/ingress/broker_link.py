"""The ingress's link to the broker (FARMW03's ingress side, farm/broker/wire.py).

It announces calls (``I_OPEN``), beats (``I_HEARTBEAT``) and reads the answers:
``I_STATUS`` (live workers, recognition lag, capacity: what admission and readiness go
by), ``I_FLUSH`` (a worker heard the caller over a call's playback: barge-in) and
``I_GAVE_UP`` (no worker will end a call: the call table says its end). When the status
comes from a new broker pid, the live calls are announced again (the contract's Restarts).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import zmq
import zmq.asyncio

from farm.broker import wire
from farm.config import Config
from farm.ingress.metrics import Metrics


__all__ = ["BrokerLink", "HEARTBEAT_S"]

log = logging.getLogger("farm.ingress")

HEARTBEAT_S = 1.0  # ingress -> broker; the answer says how many workers are live

# A call as I_OPEN tells it: (call_id, ring name, info JSON).
Announced = tuple[str, str, str]


class BrokerLink:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        config: Config,
        metrics: Metrics,
        on_flush: Callable[[str, wire.FlushRequest], None],
        on_gave_up: Callable[[str, str], None],
        live_calls: Callable[[], list[Announced]],
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.on_flush = on_flush
        self.on_gave_up = on_gave_up
        self.live_calls = live_calls
        self.dealer = ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(config.endpoint("ingress"))
        self.status = wire.Status()  # the broker's last I_STATUS
        self.seen = 0.0  # when the broker last answered
        self.overloaded = False  # recognition too far behind: new calls are refused
        self._lag_reports = 0  # I_STATUS in a row over the admission lag

    async def announce(self, call_id: str, ring: str, info: str) -> None:
        await self.dealer.send_multipart(wire.message(wire.I_OPEN, call_id, ring, info))

    async def heartbeat(self) -> None:
        await self.dealer.send_multipart(wire.message(wire.I_HEARTBEAT))

    @property
    def answering(self) -> bool:
        return time.monotonic() - self.seen <= 3 * HEARTBEAT_S

    @property
    def age(self) -> float:
        """Seconds since the broker last answered (infinite before it ever has)."""
        return time.monotonic() - self.seen if self.seen else float("inf")

    async def run(self) -> None:
        while True:
            frames = await self.dealer.recv_multipart()
            try:
                command, body = wire.parse(frames)
                if command == wire.I_FLUSH:
                    self.on_flush(body[0], wire.FlushRequest.decode(body[1]))
                elif command == wire.I_GAVE_UP:
                    self.on_gave_up(body[0], body[1])
                elif command == wire.I_STATUS:
                    await self._on_status(wire.Status.decode(body[0]))
            except wire.WireError as exc:
                log.warning("dropped a broker message: %s", exc)

    async def _on_status(self, status: wire.Status) -> None:
        if self.status.broker_pid and status.broker_pid != self.status.broker_pid:
            await self._announce_again(self.status.broker_pid, status.broker_pid)
        self.status = status
        self.seen = time.monotonic()
        self._note_lag(status.lag_ms)
        self.metrics.note_status(status)

    async def _announce_again(self, old: int, new: int) -> None:
        """A new broker knows no call: tell it ours (their workers claim them too)."""
        live = self.live_calls()
        log.warning("the broker restarted (pid %d, was %d): announcing %d calls again", new, old, len(live))
        for call in live:
            await self.announce(*call)

    def _note_lag(self, lag_ms: int) -> None:
        """Overloaded after two reports in a row over the admission lag (a Vosk stall is one);
        back under half of it ends it. Said once in the log each way."""
        limit = self.config.admission_lag_ms
        if not limit:
            return
        self._lag_reports = self._lag_reports + 1 if lag_ms > limit else 0
        if not self.overloaded and self._lag_reports >= 2:
            self.overloaded = True
            log.warning(
                "at capacity: recognition is %d ms behind on the least loaded worker; refusing new calls", lag_ms
            )
        elif self.overloaded and lag_ms <= limit // 2:
            self.overloaded = False
            log.warning("below capacity again (recognition %d ms behind): taking new calls", lag_ms)
