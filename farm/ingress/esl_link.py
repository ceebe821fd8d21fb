"""One Event Socket connection on asyncio: commands out, replies matched in order, the rest out.

Used by both ends farm plays: the outbound server (FreeSWITCH connected to us,
:mod:`farm.ingress.socket_audio`) and the inbound client (:mod:`farm.ingress.esl_inbound`).
The bytes are understood by the sans-I/O codec :mod:`farm.protocol.esl`; this module
only moves them. FreeSWITCH answers commands in the order they were sent (§3.3), so a
FIFO of futures pairs every ``command/reply`` and ``api/response`` with its command;
everything else (events, notices) goes to ``on_message``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from farm.protocol import esl


__all__ = ["EslLink", "EslClosed"]

log = logging.getLogger("farm.ingress.esl")

READ_BYTES = 65536


class EslClosed(ConnectionError):
    """The Event Socket connection is gone; ``reason`` says why."""


class EslLink:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_message: Callable[[esl.Message], None],
        name: str,
        max_body: int = esl.MAX_BODY_BYTES,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.on_message = on_message
        self.name = name
        self.parser = esl.EventSocketParser(max_body)
        self.pending: deque[asyncio.Future[esl.Message]] = deque()
        self.closed = asyncio.Event()
        self.close_reason = ""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._read(), name=f"esl {self.name}")

    def send(self, data: bytes) -> tuple[asyncio.Future[esl.Message], int]:
        """Write one command; return the future of its reply and when it was written (ns).

        Never blocks: the transport buffers. Raises EslClosed once the link is down.
        """
        if self.closed.is_set():
            raise EslClosed(self.close_reason or "closed")
        future: asyncio.Future[esl.Message] = asyncio.get_running_loop().create_future()
        self.pending.append(future)
        # Stamped just before the write: taken after it, a preemption of this process
        # could date the command later than FreeSWITCH received it.
        written = time.monotonic_ns()
        self.writer.write(data)
        return future, written

    async def request(self, data: bytes, timeout: float) -> esl.Message:
        """Send a command and wait for its reply; TimeoutError or EslClosed otherwise."""
        future, _ = self.send(data)
        return await asyncio.wait_for(future, timeout)

    async def _read(self) -> None:
        reason = "connection closed"
        try:
            while True:
                data = await self.reader.read(READ_BYTES)
                if not data:
                    self.parser.receive_eof()
                    self._dispatch()
                    if self.parser.parser_exc is not None:
                        reason = f"connection closed inside a message: {self.parser.parser_exc}"
                    break
                self.parser.receive_data(data)
                self._dispatch()
                if self.parser.state is esl.FAILED:
                    reason = f"bad Event Socket input: {self.parser.parser_exc}"
                    break
        except (ConnectionError, OSError) as exc:
            reason = f"connection lost: {exc.__class__.__name__}"
        finally:
            self.close(reason)

    def _dispatch(self) -> None:
        for message in self.parser.events_received():
            if isinstance(message, (esl.Reply, esl.ApiResponse, esl.ChannelData)) and self.pending:
                future = self.pending.popleft()
                if not future.done():
                    future.set_result(message)
                continue
            try:
                self.on_message(message)
            except Exception:  # one bad handler must not stop the reading
                log.exception("%s: handling %s failed", self.name, type(message).__name__)

    def close(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(EslClosed(reason))
                future.exception()  # retrieved: nobody may be waiting on a fire-and-forget command
        self.writer.close()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
