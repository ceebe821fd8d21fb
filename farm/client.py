"""What dialer apps import: the farm's events as an async iterator.

    async for event in farm.client.events("tcp://farm-host:5556", call_id=uuid):
        if event.type == "final":
            print(event["text"])

Events are published on ZeroMQ (XPUB) with the call id as topic; see
:mod:`farm.protocol.events` for the schema.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import zmq
import zmq.asyncio

from farm.protocol.events import Event, EventError, topic_for


__all__ = ["events", "Subscription", "DEFAULT_EVENTS"]

DEFAULT_EVENTS = "tcp://127.0.0.1:5556"


class Subscription:
    """A live subscription to the events of one call (or all calls).

    Open it *before* the call starts (ZeroMQ drops what a subscriber was not yet
    subscribed to), e.g. ``async with Subscription(url, call_id) as sub:``.
    """

    def __init__(
        self, endpoint: str = DEFAULT_EVENTS, call_id: str | None = None, *, ctx: zmq.asyncio.Context | None = None
    ) -> None:
        self.endpoint = endpoint
        self.call_id = call_id
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.connect(endpoint)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic_for(call_id) if call_id else b"")

    async def __aenter__(self) -> Subscription:
        # Let the subscription reach the publisher before the caller starts the call.
        await asyncio.sleep(0.2)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def next(self, timeout: float | None = None) -> Event:
        """The next event; raises TimeoutError after ``timeout`` seconds."""
        while True:
            _topic, raw = await asyncio.wait_for(self.sock.recv_multipart(), timeout)
            try:
                return Event.from_json(raw)
            except EventError:
                continue  # a producer of another schema version: skip it

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            yield await self.next()

    def close(self) -> None:
        self.sock.close(0)
        if self._own_ctx:
            self.ctx.term()


async def events(endpoint: str = DEFAULT_EVENTS, call_id: str | None = None) -> AsyncIterator[Event]:
    """Iterate over the events of one call (``call_id``) or of every call."""
    sub = Subscription(endpoint, call_id)
    try:
        async for event in sub:
            yield event
    finally:
        sub.close()
