"""The ingress's call table: one ring per call, from its open to its worker's done.

The ingress owns every ring: it creates one per call, writes it, marks it closed when
the connection ends, and unlinks it only when the worker's ``call_end`` comes back
through the event relay (the call's last event, on the path of all the others: nothing
of the call comes after it), when the broker says the worker gave the call up
(``I_GAVE_UP``), or, failing both, after a timeout — so a worker that takes over a
call after a crash still finds the ring. The table also says whether a
new call is taken (admission) and whether calls can be transcribed (readiness), from
the broker's status (:mod:`farm.ingress.broker_link`); events travel through
:mod:`farm.ingress.event_relay`.
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
from farm.ingress.broker_link import HEARTBEAT_S, BrokerLink
from farm.ingress.event_relay import EventRelay
from farm.ingress.event_sink import RedisSink
from farm.ingress.llm_intents import LlmIntents
from farm.ingress.metrics import Metrics
from farm.logs import quote
from farm.protocol.call_stats import CallStats
from farm.protocol.events import CANARY_PREFIX, Event, end_reason_code, is_canary
from farm.ring import Ring, segment_name


if TYPE_CHECKING:
    from farm.ingress.playback import Player


__all__ = ["Call", "CallIdTaken", "CallRegistry"]

log = logging.getLogger("farm.ingress")

# A closed call whose worker never reports done (no worker alive) is unlinked after this.
DONE_TIMEOUT_S = 120.0
# How long a new connection for a call id waits for the previous leg to finish
# (IXWebSocket reconnects 100 ms after a close, §1.10).
RECONNECT_WAIT_S = 3.0
# How long a closing call's ring waits for the ingress's own last events to come back from
# the relay (see close()), and how many unechoed events a call keeps track of.
ECHO_WAIT_S = 2.0
MAX_UNECHOED = 1000


class CallIdTaken(Exception):
    """With tokens on, a call id belongs to the credential that opened it: another is refused.
    The canary's ids (CANARY_PREFIX) are the node's own: refused to every peer."""


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
    canary: bool = False  # the node's self-test (farm/ingress/canary.py): nobody's call, nowhere counted
    # Events of this leg have seq >= first_seq (a reconnect continues the numbering); the
    # ingress's own call_end (of a call no worker ended) has seq 0.
    first_seq: int = 0
    lost: str = ""  # no worker serves the call while it streams (it said why in an error event)
    said_end: bool = False  # a worker's call_end came while it streamed (farm stopping)
    credential: str = ""  # the fingerprint of the token that opened it ("" without tokens)
    stats: CallStats = field(default_factory=CallStats)  # from its events as relayed: the stats command
    info: str = "{}"  # what I_OPEN told the broker (told again to a restarted broker)
    # Publish stamps of what the ingress said of this call and has not seen come back from
    # the relay yet; and the end the ring is to be marked with once it has (see close()).
    unechoed: set[int] = field(default_factory=set)
    closing: tuple[str, str] | None = None

    def write(self, pcm: bytes, recv_ns: int) -> None:
        self.ring.write(pcm, recv_ns)

    def offset_ms(self, cursor: int) -> int:
        """Audio time (ms into the stream) of a ring cursor."""
        return cursor * 1000 // (self.ring.rate * 2 * self.ring.channels)


class CallRegistry:
    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.calls: dict[str, Call] = {}
        self.ctx = zmq.asyncio.Context()
        self.link = BrokerLink(self.ctx, config, metrics, self._flush, self._gave_up, self._live)
        self.sink = RedisSink(config, metrics) if config.redis_url else None
        self.relay = EventRelay(self.ctx, config, metrics, self.calls.get, self._seen, self.sink)
        # --llm-url: finals no intent rule matched, classified here (farm/ingress/llm_intents.py).
        self.llm = LlmIntents(config, metrics, self.calls.get, self.publish) if config.llm_url else None
        self._seq = 0
        # call id -> (next event seq, legs, credential) of a finished call, so a reconnected
        # call continues its numbering (and only its own credential continues it).
        self._finished: OrderedDict[str, tuple[int, int, str]] = OrderedDict()
        self.tasks: list[asyncio.Task[None]] = []
        # Why the canary's last probe failed ("" while it passes or is off): farm/ingress/canary.py.
        self.canary_failing = ""

    def start(self) -> None:
        self.tasks = [
            asyncio.create_task(self.link.run(), name="broker-link"),
            asyncio.create_task(self.relay.run(), name="event-relay"),
            asyncio.create_task(self._housekeeping(), name="housekeeping"),
            asyncio.create_task(self.relay.watch_relay(), name="relay-link"),
            asyncio.create_task(self.relay.run_canary(), name="canary-events"),
        ]
        if self.sink is not None:
            self.tasks.append(asyncio.create_task(self.sink.run(), name="redis-sink"))

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
        credential: str = "",
        canary: bool = False,
    ) -> Call:
        """Create the call's ring, announce it (call_start) and ask for a worker.

        With tokens on (``credential`` is the fingerprint of the one shown), a call id
        that another credential opened, live or ended, is refused: CallIdTaken."""
        if is_canary(call_id) and not canary:
            raise CallIdTaken(f"call ids beginning {CANARY_PREFIX!r} are the node's own canary's")
        self._check_owner(call_id, credential)
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
            peer = f" from {info['peer']}" if info.get("peer") else ""
            self.error(call_id, f"a second live connection{peer} used this call id; it is served as {call_id}-{n}")
            call_id = f"{call_id}-{n}"
        next_seq, leg, _ = self._finished.pop(call_id, (0, 0, ""))
        self._seq += 1
        ring = Ring.create(
            segment_name(os.getpid(), self._seq),
            capacity=int(self.config.ring_seconds * rate) * 2 * channels,
            rate=rate,
            channels=channels,
            event_seq=next_seq + 1,
        )
        call = Call(call_id, ring, protocol, leg + 1, on_event, background=background, canary=canary)
        call.info = wire.encode_info(info)
        call.first_seq = next_seq + 1
        call.credential = credential
        self.calls[call_id] = call
        self.metrics.calls_total += not canary
        start = Event(
            "call_start",
            call_id,
            next_seq,
            0,
            # node: where the call's commands go (farm.client.Commands with several nodes)
            {"protocol": protocol, "rate": rate, "channels": channels, "leg": call.leg, "node": self.config.node_id}
            | info
            | ({"credential": credential} if credential else {}),
            {"recv": time.monotonic_ns()},
        )
        self.publish(start)
        await self.link.announce(call_id, ring.name, call.info)
        return call

    def _check_owner(self, call_id: str, credential: str) -> None:
        if not self.config.auth_tokens:
            return  # no credentials: a second connection is served as <id>-2 (see open)
        live = self.calls.get(call_id)
        owner = live.credential if live is not None else self._finished.get(call_id, (0, 0, credential))[2]
        if owner != credential:
            raise CallIdTaken(f"call id taken by another token ({call_id!r}, {'live' if live else 'ended'})")

    def close(self, call: Call, reason: str, detail: str = "") -> None:
        """The connection ended: no more audio. The worker finishes what it has, then
        publishes call_end with ``reason`` (one of END_REASONS) and ``detail``; the
        first close of a call says why."""
        if call.player is not None:
            call.player.close()
        if not call.closed_at:
            call.closed_at = time.monotonic()
            call.closing = (reason, detail)
            if call.unechoed and not call.lost:
                # What the ingress just said of the call (a playback_stop) travels to the relay
                # on another pipe than the worker's call_end, which the closed ring lets the
                # worker publish: close it once the relay has sent ours on (they come back to
                # our own subscriber), so call_end stays the call's last event.
                asyncio.get_running_loop().call_later(ECHO_WAIT_S, self._close_ring, call)
            else:
                self._close_ring(call)
            if call.lost:  # no worker has it: the call's end is ours to say
                if not call.said_end:
                    self._say_end(call.call_id, call.lost)
                self._finish(call.call_id, "lost")

    def end_unopened(self, call_id: str, reason: str, detail: str = "") -> None:
        """A call that never began (refused, or failed before its audio came) ends too:
        its call_end, said by the ingress as no worker ever had it. Not while a call of
        that id is served: its subscribers would take it for the end of that call."""
        if call_id in self.calls:
            return
        self._say_end(call_id, detail, reason)

    def _say_end(self, call_id: str, detail: str, reason: str = "error") -> None:
        """The call_end of a call no worker ends (seq 0: see Call.first_seq)."""
        data = {"reason": reason, "detail": detail, "duration_ms": 0, "overrun_bytes": 0, "frames": 0}
        self.publish(Event("call_end", call_id, 0, 0, data, {"recv": time.monotonic_ns()}))

    def _gave_up(self, call_id: str, reason: str) -> None:
        """I_GAVE_UP: the worker serves the call no more and no call_end of its will end it."""
        call = self.calls.get(call_id)
        if call is None:
            return
        if not call.closed_at:
            # Its connection still streams: the ring stays until it ends (the site writes into
            # it meanwhile, unread and bounded); then close() says call_end and unlinks it.
            call.lost = reason
            log.warning("no worker serves the call while it streams: %s", reason, extra={"call_id": call_id})
            return
        self._say_end(call_id, reason)
        self._finish(call_id, "given up")

    def _ended(self, call: Call) -> None:
        """The call's worker published its call_end (delivered already): the call is over."""
        if call.closed_at:
            self._finish(call.call_id, "call_end")
            return
        # While its connection streams: the worker stopped (farm stopping) and said its end.
        call.said_end = True
        call.lost = "its worker ended the call"

    def _flush(self, call_id: str, request: wire.FlushRequest) -> None:
        """I_FLUSH: the caller speaks over the call's playback (barge-in)."""
        call = self.calls.get(call_id)
        if call is not None and call.player is not None:
            self.metrics.barge_ins += call.player.barge_in(request)

    def _finish(self, call_id: str, why: str) -> None:
        call = self.calls.get(call_id)
        if call is None:
            return
        del self.calls[call_id]
        if not call.canary:
            self.metrics.overrun_bytes += call.ring.overrun_bytes
            self.metrics.overruns += call.ring.overrun_count
        self._finished[call_id] = (call.ring.event_seq, call.leg, call.credential)
        while len(self._finished) > 10_000:
            self._finished.popitem(last=False)
        call.ring.close()
        call.ring.unlink()
        call.on_event = None
        call.done.set()
        log.debug("ring %s unlinked (%s)", call.ring.name, why, extra={"call_id": call_id})

    def publish(self, event: Event) -> None:
        event = event.stamped("publish", time.monotonic_ns())
        call = self.calls.get(event.call_id)
        if call is not None and (not call.closed_at or call.closing) and len(call.unechoed) < MAX_UNECHOED:
            call.unechoed.add(event.stamps["publish"])
        self.relay.publish(event)

    def _seen(self, event: Event) -> None:
        """An event came back from the relay (and was delivered): a worker's call_end ends the
        call; if it is one of ours, a closing call may close."""
        if self.llm is not None:
            self.llm.seen(event)
        call = self.calls.get(event.call_id)
        if call is None:
            return
        if event.type == "call_end" and event.seq >= call.first_seq:
            self._ended(call)
            return
        if not call.unechoed:
            return
        call.unechoed.discard(event.stamps.get("publish", -1))
        if not call.unechoed and call.closing:
            self._close_ring(call)

    def _close_ring(self, call: Call) -> None:
        """Mark the ring closed with the end close() was given (once; not after _finish)."""
        if call.closing is None or self.calls.get(call.call_id) is not call:
            return
        reason, detail = call.closing
        call.closing = None
        call.ring.mark_closed(end_reason_code(reason), detail)

    def error(self, call_id: str, reason: str) -> None:
        """Report bad input of one call on the event stream."""
        self.publish(Event("error", call_id, 0, 0, {"reason": reason}))

    def _live(self) -> list[tuple[str, str, str]]:
        """The calls a restarted broker must hear of again (not those no worker could serve)."""
        return [(c.call_id, c.ring.name, c.info) for c in self.calls.values() if not c.lost]

    async def _housekeeping(self) -> None:
        while True:
            await self.link.heartbeat()
            await asyncio.sleep(HEARTBEAT_S)
            now = time.monotonic()
            for call in list(self.calls.values()):
                if call.closed_at and now - call.closed_at > DONE_TIMEOUT_S:
                    why = "no worker finished it in %.0f s; ring unlinked"
                    log.warning(why, DONE_TIMEOUT_S, extra={"call_id": call.call_id})
                    self._finish(call.call_id, "timeout")

    def admission(self) -> str:
        """Why a new call is refused now, ``""`` when it is taken (counted as a refusal by reason).

        Refused: the broker does not answer (nobody would ever serve the call), or recognition
        is too far behind. Not refused for want of a live worker: the broker queues the call
        and a worker starting or restarting takes it within seconds (/readyz says not ready
        meanwhile, so balancers send new calls elsewhere).
        """
        why = ""
        if not self.link.answering:
            why = "broker not answering"
        elif self.link.overloaded:
            why = f"at capacity (recognition {self.link.status.lag_ms} ms behind)"
        elif self.full:
            why = f"at capacity ({self.full})"
        if why:
            self.metrics.reject(why.split(" (")[0])
        return why

    @property
    def active(self) -> int:
        """Live calls still streaming (a call whose stream closed is finishing, not holding a
        slot; a recorded file waits behind live calls, it holds none either)."""
        return sum(not call.closed_at and not call.background for call in self.served)

    @property
    def served(self) -> list[Call]:
        """The peers' calls: every call but the canary's (which metrics and admission never see)."""
        return [call for call in self.calls.values() if not call.canary]

    @property
    def full(self) -> str:
        """Why the node's CPUs hold no more calls, ``""`` while they do (the broker's capacity)."""
        capacity, active = self.link.status.capacity, self.active
        if not capacity or active < capacity:
            return ""
        return f"{active} calls of {capacity}, {self.link.status.call_cpu_ms} ms CPU per call-second"

    @property
    def recognition_ready(self) -> str:
        """Why calls cannot be transcribed now, ``""`` when they can (for /readyz)."""
        return self.pipeline_ready or self.canary_failing

    @property
    def pipeline_ready(self) -> str:
        """What recognition lacks before the canary can even try it, ``""`` when nothing."""
        if not self.link.answering:
            return "broker not answering"
        if not self.relay.subscribed:
            return "event relay not connected"
        if not self.link.status.workers:
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
        if self.llm is not None:
            self.llm.close()
        self.relay.close()
        for call_id in list(self.calls):
            self._finish(call_id, "shutdown")
        self.ctx.destroy(linger=200)
