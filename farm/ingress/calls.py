"""The ingress's call table: rings, the broker link and the event relay to connections.

The ingress owns every ring: it creates one per call, writes it, marks it closed when
the connection ends, and unlinks it only when the broker relays ``I_DONE`` (the
worker finished the call) or, failing that, after a timeout — so a worker that
takes over a call after a crash still finds the ring.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio

from farm.broker import wire
from farm.config import Config
from farm.curve import client_socket, node_keys, start_async_authenticator
from farm.ingress.metrics import DROP_MALFORMED, Metrics
from farm.logs import quote
from farm.protocol.events import SUBSCRIBED, Event, EventError, end_reason_code
from farm.ring import Ring, segment_name


if TYPE_CHECKING:
    from farm.ingress.playback import Player


__all__ = ["Call", "CallRegistry"]

log = logging.getLogger("farm.ingress")

# A closed call whose worker never reports done (no worker alive) is unlinked after this.
DONE_TIMEOUT_S = 120.0
# How long a new connection for a call id waits for the previous leg to finish
# (IXWebSocket reconnects 100 ms after a close, §1.10).
RECONNECT_WAIT_S = 3.0
HEARTBEAT_S = 1.0  # ingress -> broker; the answer says how many workers are live
# Events and I_DONE take different broker paths (XPUB relay thread vs ROUTER), so a
# call's last final and call_end can arrive just after its done: still relay them.
LATE_EVENTS_S = 2.0


@dataclass
class Call:
    call_id: str
    ring: Ring
    protocol: str
    leg: int
    on_event: Callable[[Event], None] | None = None
    closed_at: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    player: Player | None = None  # set by sites that can play audio to the caller
    background: bool = False  # a recorded file (source: file): it holds no live call's capacity
    lost: str = ""  # the worker gave the call up while it streamed (it said why in an error event)
    info: str = "{}"  # what I_OPEN told the broker (told again to a restarted broker)

    def write(self, pcm: bytes, recv_ns: int) -> None:
        self.ring.write(pcm, recv_ns)


class CallRegistry:
    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.ctx = zmq.asyncio.Context()
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(config.endpoint("ingress"))
        # XPUB, not PUB: it hears the relay's subscription, so readiness can wait for it.
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 500)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)  # what it publishes while a broker restarts waits here
        self.pub.connect(config.endpoint("events_in"))
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 100_000)
        self.authenticator = None
        if config.curve_dir:  # the node's own subscriber holds the node's key (farm/curve.py)
            client_socket(self.sub, node_keys(config.curve_dir))
            self.authenticator = start_async_authenticator(self.ctx, config.curve_dir)
        self.sub.connect(config.events.replace("0.0.0.0", "127.0.0.1").replace("*", "127.0.0.1"))
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.calls: dict[str, Call] = {}
        self._seq = 0
        # call id -> next event seq, so a reconnected call continues its numbering.
        self._next_seq: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self.tasks: list[asyncio.Task[None]] = []
        self._late: dict[str, Call] = {}  # finished calls still relaying events (LATE_EVENTS_S)
        self.status = wire.Status()  # the broker's last I_STATUS
        self.broker_seen = 0.0  # when the broker last answered
        self.overloaded = False  # recognition too far behind: new calls are refused
        self.relay_subscribed = False  # the broker's relay takes our events
        self._lag_reports = 0  # I_STATUS in a row over the admission lag

    def start(self) -> None:
        self.tasks = [
            asyncio.create_task(self._broker_loop(), name="broker-link"),
            asyncio.create_task(self._event_loop(), name="event-relay"),
            asyncio.create_task(self._housekeeping(), name="housekeeping"),
            asyncio.create_task(self._relay_link(), name="relay-link"),
        ]

    # -- calls -------------------------------------------------------------------

    async def open(
        self,
        call_id: str,
        *,
        rate: int,
        channels: int,
        protocol: str,
        info: dict[str, Any],
        on_event: Callable[[Event], None] | None,
        background: bool = False,
    ) -> Call:
        """Create the call's ring, announce it (call_start) and ask for a worker."""
        old = self.calls.get(call_id)
        if old is not None and old.closed_at:
            # A reconnect of a call whose previous leg is still being finished.
            try:
                await asyncio.wait_for(old.done.wait(), RECONNECT_WAIT_S)
            except TimeoutError:
                pass
        if call_id in self.calls:
            n = 2
            while f"{call_id}-{n}" in self.calls:
                n += 1
            log.warning(
                "call id in use by a live connection: serving this one as %s",
                quote(f"{call_id}-{n}"),
                extra={"call_id": call_id},
            )
            # Say it on the original id too: its subscribers would miss the new one.
            self.error(call_id, f"a second live connection used this call id; it is served as {call_id}-{n}")
            call_id = f"{call_id}-{n}"
        next_seq, leg = self._next_seq.pop(call_id, (0, 0))
        self._seq += 1
        ring = Ring.create(
            segment_name(os.getpid(), self._seq),
            capacity=int(self.config.ring_seconds * rate) * 2 * channels,
            rate=rate,
            channels=channels,
            event_seq=next_seq + 1,
        )
        call = Call(call_id, ring, protocol, leg + 1, on_event, background=background, info=wire.encode_info(info))
        self.calls[call_id] = call
        self.metrics.calls_total += 1
        start = Event(
            "call_start",
            call_id,
            next_seq,
            0,
            {"protocol": protocol, "rate": rate, "channels": channels, "leg": call.leg, **info},
            {"recv": time.monotonic_ns()},
        )
        self.publish(start)
        await self.dealer.send_multipart(wire.message(wire.I_OPEN, call_id, ring.name, call.info))
        return call

    def close(self, call: Call, reason: str, detail: str = "") -> None:
        """The connection ended: no more audio. The worker finishes what it has, then
        publishes call_end with ``reason`` (one of END_REASONS) and ``detail``; the
        first close of a call says why."""
        if call.player is not None:
            call.player.close()
        if not call.closed_at:
            call.closed_at = time.monotonic()
            call.ring.mark_closed(end_reason_code(reason), detail)
            if call.lost:  # no worker has it: the call's end is ours to say
                data = {"reason": "error", "detail": call.lost, "duration_ms": 0, "overrun_bytes": 0, "frames": 0}
                self.publish(Event("call_end", call.call_id, 0, 0, data, {"recv": time.monotonic_ns()}))
                self._finish(call.call_id, "lost")

    def end_unopened(self, call_id: str, reason: str, detail: str = "") -> None:
        """A call that never began (refused, or failed before its audio came) ends too:
        its call_end, said by the ingress as no worker ever had it. Not while a call of
        that id is served: its subscribers would take it for the end of that call."""
        if call_id in self.calls or call_id in self._late:
            return
        data = {"reason": reason, "detail": detail, "duration_ms": 0, "overrun_bytes": 0, "frames": 0}
        self.publish(Event("call_end", call_id, 0, 0, data, {"recv": time.monotonic_ns()}))

    def _finish(self, call_id: str, why: str) -> None:
        call = self.calls.get(call_id)
        if call is None:
            return
        if why == "worker done" and not call.closed_at:
            # Done while its connection still streams: the worker could not serve it (it
            # published why). The ring stays until the connection ends (the site writes into
            # it meanwhile, unread and bounded); then close() says call_end and unlinks it.
            call.lost = "no worker could serve the call"
            log.warning("the worker gave the call up while it streams", extra={"call_id": call_id})
            return
        del self.calls[call_id]
        self.metrics.overrun_bytes += call.ring.overrun_bytes
        self.metrics.overruns += call.ring.overrun_count
        self._next_seq[call_id] = (call.ring.event_seq, call.leg)
        while len(self._next_seq) > 10_000:
            self._next_seq.popitem(last=False)
        call.ring.close()
        call.ring.unlink()
        if call.on_event is not None:
            self._late[call_id] = call
            asyncio.get_running_loop().call_later(LATE_EVENTS_S, self._forget_late, call)
        call.done.set()
        log.debug("ring %s unlinked (%s)", call.ring.name, why, extra={"call_id": call_id})

    def _forget_late(self, call: Call) -> None:
        call.on_event = None
        if self._late.get(call.call_id) is call:
            del self._late[call.call_id]

    def publish(self, event: Event) -> None:
        self.pub.send_multipart(event.stamped("publish", time.monotonic_ns()).to_frames())

    def error(self, call_id: str, reason: str) -> None:
        """Report bad input of one call on the event stream."""
        self.publish(Event("error", call_id, 0, 0, {"reason": reason}))

    # -- background loops ----------------------------------------------------------

    async def _broker_loop(self) -> None:
        while True:
            frames = await self.dealer.recv_multipart()
            try:
                command, body = wire.parse(frames)
            except wire.WireError as exc:
                log.warning("dropped a broker message: %s", exc)
                continue
            if command == wire.I_DONE:
                self._finish(body[0], "worker done")
            elif command == wire.I_STATUS:
                try:
                    status = wire.Status.decode(body[0])
                except wire.WireError as exc:
                    log.warning("dropped a broker status: %s", exc)
                    continue
                if self.status.broker_pid and status.broker_pid != self.status.broker_pid:
                    await self._announce_again(self.status.broker_pid, status.broker_pid)
                self.status = status
                self.broker_seen = time.monotonic()
                self._note_lag(self.status.lag_ms)
                self.metrics.note_status(self.status)

    async def _announce_again(self, old: int, new: int) -> None:
        """A new broker knows no call: tell it ours (their workers claim them too)."""
        live = [call for call in self.calls.values() if not call.lost]
        log.warning("the broker restarted (pid %d, was %d): announcing %d calls again", new, old, len(live))
        for call in live:
            await self.dealer.send_multipart(wire.message(wire.I_OPEN, call.call_id, call.ring.name, call.info))

    async def _relay_link(self) -> None:
        """The relay subscribes to our events when it (re)connects: from then on they reach it."""
        while True:
            if (await self.pub.recv())[:1] == b"\x01":
                self.relay_subscribed = True

    async def _event_loop(self) -> None:
        while True:
            _topic, raw = await self.sub.recv_multipart()
            received = time.monotonic_ns()
            if raw == SUBSCRIBED:
                continue  # the relay confirming some subscriber's subscription
            try:
                event = Event.from_json(raw)
            except EventError as exc:
                log.warning("dropped a malformed event: %s", exc)
                self.metrics.drop(DROP_MALFORMED)
                continue
            self.metrics.observe(event, received)
            call = self.calls.get(event.call_id) or self._late.get(event.call_id)
            if call is not None and event.type == "flush" and call.player is not None:
                self.metrics.barge_ins += call.player.barge_in(event)
            if call is not None and call.on_event is not None:
                self.metrics.events_relayed += 1
                call.on_event(event)

    async def _housekeeping(self) -> None:
        while True:
            await self.dealer.send_multipart(wire.message(wire.I_HEARTBEAT))
            await asyncio.sleep(HEARTBEAT_S)
            now = time.monotonic()
            for call in list(self.calls.values()):
                if call.closed_at and now - call.closed_at > DONE_TIMEOUT_S:
                    why = "no worker finished it in %.0f s; ring unlinked"
                    log.warning(why, DONE_TIMEOUT_S, extra={"call_id": call.call_id})
                    self._finish(call.call_id, "timeout")

    @property
    def broker_age(self) -> float:
        """Seconds since the broker last answered (infinite before it ever has)."""
        return time.monotonic() - self.broker_seen if self.broker_seen else float("inf")

    @property
    def workers_live(self) -> int:
        return self.status.workers

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

    def admission(self) -> str:
        """Why a new call is refused now, ``""`` when it is taken (counted as a refusal by reason).

        Refused: the broker does not answer (nobody would ever serve the call), or recognition
        is too far behind. Not refused for want of a live worker: the broker queues the call
        and a worker starting or restarting takes it within seconds (/readyz says not ready
        meanwhile, so balancers send new calls elsewhere).
        """
        why = ""
        if time.monotonic() - self.broker_seen > 3 * HEARTBEAT_S:
            why = "broker not answering"
        elif self.overloaded:
            why = f"at capacity (recognition {self.status.lag_ms} ms behind)"
        elif self.full:
            why = f"at capacity ({self.full})"
        if why:
            self.metrics.reject(why.split(" (")[0])
        return why

    @property
    def active(self) -> int:
        """Live calls still streaming (a call whose stream closed is finishing, not holding a
        slot; a recorded file waits behind live calls, it holds none either)."""
        return sum(not call.closed_at and not call.background for call in self.calls.values())

    @property
    def full(self) -> str:
        """Why the node's CPUs hold no more calls, ``""`` while they do (the broker's capacity)."""
        capacity, active = self.status.capacity, self.active
        if not capacity or active < capacity:
            return ""
        return f"{active} calls of {capacity}, {self.status.call_cpu_ms} ms CPU per call-second"

    @property
    def recognition_ready(self) -> str:
        """Why calls cannot be transcribed now, ``""`` when they can (for /readyz)."""
        if time.monotonic() - self.broker_seen > 3 * HEARTBEAT_S:
            return "broker not answering"
        if not self.relay_subscribed:
            return "event relay not connected"
        if not self.workers_live:
            return "no recognition worker"
        return ""

    async def wait_all_done(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.calls and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for call_id in list(self.calls):
            self._finish(call_id, "shutdown")

    def close_all(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.authenticator is not None:
            self.authenticator.stop()
        for call_id in list(self.calls):
            self._finish(call_id, "shutdown")
        self.ctx.destroy(linger=200)
