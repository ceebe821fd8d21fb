"""Every event into a Redis stream too (``--redis-url``): events a dialer cannot miss.

ZeroMQ's PUB drops what a subscriber that is down or slow does not take. A Redis stream
keeps it: a dialer reads it with a consumer group (README, "Events a dialer cannot
miss") and, after a restart, resumes with what it had not acknowledged. The ingress
sees every call's events on the relay (:mod:`farm.ingress.event_relay`) and hands each
to :meth:`RedisSink.put`, which never waits: events queue here (at most
``--redis-buffer``) and one task writes them in pipelined batches of ``XADD key MAXLEN
~ N * call_id ... type ... event ...``. While Redis cannot be reached the queue holds
what comes, newer events past its bound are dropped and counted
(``farm_events_dropped_total{reason="redis unreachable"}``), and the task tries again
every second; either way is logged once, not per event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import redis.asyncio as redis
from redis.exceptions import RedisError

from farm.config import Config
from farm.ingress.metrics import DROP_REDIS, Metrics
from farm.protocol.events import Event


__all__ = ["RedisSink"]

log = logging.getLogger("farm.ingress")

BATCH = 500  # events per pipelined round trip
RETRY_S = 1.0


class RedisSink:
    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.key = config.redis_stream
        self.maxlen = config.redis_maxlen
        self.bound = config.redis_buffer
        self.metrics = metrics
        self.client = redis.Redis.from_url(config.redis_url, socket_timeout=5, socket_connect_timeout=2)
        self.queue: deque[tuple[Event, bytes]] = deque()
        self.ready = asyncio.Event()  # something is queued
        self.reachable = True  # as last seen: said once in the log each way
        self.where = config.redis_url.split("@")[-1]  # no password in the log

    def put(self, event: Event, raw: bytes) -> None:
        """Queue an event (and its JSON as it came) for the stream; never waits. Past the
        bound it is dropped and counted."""
        if len(self.queue) >= self.bound:
            self.metrics.drop(DROP_REDIS)
            return
        self.queue.append((event, raw))
        self.ready.set()

    async def run(self) -> None:
        while True:
            await self.ready.wait()
            batch = [self.queue[i] for i in range(min(BATCH, len(self.queue)))]
            try:
                await self._write(batch)
            except (RedisError, OSError) as exc:
                self._say(False, exc)
                await asyncio.sleep(RETRY_S)
                continue
            self._say(True)
            for _ in batch:
                self.queue.popleft()
            self.metrics.events_stored += len(batch)
            if not self.queue:
                self.ready.clear()

    async def _write(self, batch: list[tuple[Event, bytes]]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for event, raw in batch:
                fields = {"call_id": event.call_id, "type": event.type, "event": raw}
                pipe.xadd(self.key, fields, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
            await pipe.execute()

    def _say(self, reachable: bool, exc: BaseException | None = None) -> None:
        if reachable == self.reachable:
            return
        self.reachable = reachable
        if reachable:
            log.warning("redis at %s reachable again: writing the %d events kept", self.where, len(self.queue))
        else:
            log.warning(
                "redis at %s unreachable (%s): keeping up to %d events, then dropping and counting them",
                self.where,
                exc,
                self.bound,
            )

    async def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (briefly: a Redis that is gone does not hold farm's exit)."""
        deadline = time.monotonic() + timeout
        while self.queue and self.reachable and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.client.aclose()
