"""farm's own inbound Event Socket connection to FreeSWITCH (``--esl host:port``).

mod_audio_stream calls hear their prompts through files FreeSWITCH plays
(PROTOCOLS.md §1.8); cutting one on barge-in needs ``uuid_break`` on an Event Socket.
This keeps one authenticated connection (§3.3, TV-ESL-1) and reconnects with backoff;
:meth:`InboundEsl.api` never waits for it.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from farm.ingress.esl_link import EslClosed, EslLink
from farm.protocol import esl


__all__ = ["InboundEsl"]

log = logging.getLogger("farm.ingress.esl")

TIMEOUT_S = 5.0
MAX_BACKOFF_S = 10.0


class InboundEsl:
    def __init__(self, address: str, password: str, max_body: int = esl.MAX_BODY_BYTES) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port = host or "127.0.0.1", int(port or 8021)
        self.password = password
        self.max_body = max_body
        self.link: EslLink | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._keep_connected(), name="inbound esl")

    def api(self, *args: str) -> int:
        """Send ``api <args>``; return when it was written (ns), 0 when not connected."""
        if self.link is None:
            return 0
        try:
            future, written = self.link.send(esl.command("api", *args))
        except EslClosed:
            return 0
        what = " ".join(args)
        future.add_done_callback(functools.partial(_report, what))
        return written

    async def _keep_connected(self) -> None:
        backoff = 0.1
        while True:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), TIMEOUT_S)
            except (OSError, TimeoutError) as exc:
                log.warning(
                    "Event Socket %s:%d unreachable (%s); retrying in %.1f s", self.host, self.port, exc, backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            greeted: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def on_message(message: esl.Message, greeted: asyncio.Future[None] = greeted) -> None:
                if isinstance(message, esl.AuthRequest) and not greeted.done():
                    greeted.set_result(None)

            link = EslLink(reader, writer, on_message, f"Event Socket {self.host}:{self.port}", self.max_body)
            link.start()
            try:
                await asyncio.wait_for(greeted, TIMEOUT_S)
                reply = await link.request(esl.command("auth", self.password), TIMEOUT_S)
                if not (isinstance(reply, esl.Reply) and reply.ok):
                    raise EslClosed(f"authentication refused ({getattr(reply, 'reply_text', '?')!r})")
            except (EslClosed, TimeoutError) as exc:
                log.warning(
                    "Event Socket %s:%d: %s; retrying in %.1f s", self.host, self.port, exc or "timeout", backoff
                )
                link.close("auth failed")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            log.info("Event Socket %s:%d connected: barge-in can stop FreeSWITCH playback", self.host, self.port)
            self.link, backoff = link, 0.1
            await link.closed.wait()
            self.link = None
            log.warning("Event Socket %s:%d lost (%s); reconnecting", self.host, self.port, link.close_reason)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.link is not None:
            self.link.close("shutdown")


def _report(what: str, future: asyncio.Future[esl.Message]) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    reply = future.result()
    if isinstance(reply, esl.ApiResponse) and not reply.ok:
        log.warning("api %r answered %r", what, reply.body.strip()[:200])
