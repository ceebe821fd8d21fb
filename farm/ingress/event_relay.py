"""The ingress's events, both ways, through the broker's relay.

Out: what the ingress itself says (``call_start``, its errors, the ``call_end`` of calls
no worker had), on an XPUB that hears the relay's subscription, so readiness can wait
for it. In: every call's events from the relay, handed to the connection that relays
them to FreeSWITCH (``on_event``) and to the metrics, then to the call table (``seen``),
which ends a call on its worker's ``call_end``: the call's last event, on the same path
as all the others, so none comes after it. The canary's events come on a socket of their
own (the relay keeps them off the public stream): to the canary and the call table only,
never to the metrics or the Redis stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq
import zmq.asyncio

from farm.config import Config
from farm.curve import client_socket, node_keys, start_async_authenticator
from farm.ingress.event_sink import RedisSink
from farm.ingress.metrics import DROP_MALFORMED, Metrics
from farm.protocol.events import SUBSCRIBED, Event, EventError


if TYPE_CHECKING:
    from farm.ingress.calls import Call


__all__ = ["EventRelay"]

log = logging.getLogger("farm.ingress")


class EventRelay:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        config: Config,
        metrics: Metrics,
        find: Callable[[str], Call | None],
        seen: Callable[[Event], None],
        sink: RedisSink | None = None,
    ) -> None:
        self.metrics = metrics
        self.sink = sink  # --redis-url: every event into a stream too, in the order they came
        self.find = find
        self.seen = seen  # every event from the relay once delivered, the ingress's own included (their echo)
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 500)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)  # what it publishes while a broker restarts waits here
        self.pub.connect(config.endpoint("events_in"))
        self.subscribed = False  # the broker's relay takes our events
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 100_000)
        self.authenticator = None
        if config.curve_dir:  # the node's own subscriber holds the node's key (farm/curve.py)
            client_socket(self.sub, node_keys(config.curve_dir))
            self.authenticator = start_async_authenticator(ctx, config.curve_dir)
        self.sub.connect(config.events.replace("0.0.0.0", "127.0.0.1").replace("*", "127.0.0.1"))
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.canary_sub = ctx.socket(zmq.SUB)
        self.canary_sub.setsockopt(zmq.LINGER, 0)
        self.canary_sub.connect(config.endpoint("canary_events"))
        self.canary_sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.canary_subscribed = False  # the relay answered: no canary event can miss us

    def publish(self, event: Event) -> None:
        """Send an event (stamped ``publish`` by the caller) to the relay."""
        self.pub.send_multipart(event.to_frames())

    async def watch_relay(self) -> None:
        """The relay subscribes to our events when it (re)connects: from then on they reach it."""
        while True:
            if (await self.pub.recv())[:1] == b"\x01":
                self.subscribed = True

    async def run(self) -> None:
        while True:
            _topic, raw = await self.sub.recv_multipart()
            received = time.monotonic_ns()
            if raw == SUBSCRIBED:
                continue  # the relay confirming some subscriber's subscription
            event = self._parse(raw)
            if event is None:
                self.metrics.drop(DROP_MALFORMED)
                continue
            self.metrics.observe(event, received)
            if self.sink is not None:
                self.sink.put(event, raw)
            call = self.find(event.call_id)
            if call is not None:
                call.stats.observe(event.type, event.channel, event.offset_ms, event.data)
            if call is not None and call.on_event is not None:
                self.metrics.events_relayed += 1
                call.on_event(event)
            self.seen(event)

    async def run_canary(self) -> None:
        while True:
            _topic, raw = await self.canary_sub.recv_multipart()
            if raw == SUBSCRIBED:
                self.canary_subscribed = True
                continue
            event = self._parse(raw)
            if event is None:
                continue
            call = self.find(event.call_id)
            if call is not None and call.on_event is not None:
                call.on_event(event)
            self.seen(event)

    @staticmethod
    def _parse(raw: bytes) -> Event | None:
        try:
            return Event.from_json(raw)
        except EventError as exc:
            log.warning("dropped a malformed event: %s", exc)
            return None

    def close(self) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()
