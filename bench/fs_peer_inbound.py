"""FreeSWITCH's inbound Event Socket (port 8021 style), played by a peer in tests.

Not FreeSWITCH: a test double following PROTOCOLS.md §3.3 and TV-ESL-1 on an ephemeral
port. Each client gets an :class:`InboundConnection` (bench/fs_peer_esl.py's listener plus
``auth``); calls :meth:`InboundEslServer.attach`-ed to it can be reached by uuid, and their
events reach its subscribed connections. The calls themselves are bench/fs_peer.py's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from bench.fs_peer_esl import Controlled, EslListener
from bench.fs_peer_wire import Command, FiredEvent


__all__ = ["Attachable", "InboundConnection", "InboundEslServer"]


class Attachable(Controlled, Protocol):
    """A call the switch can know by uuid; ``switch`` lets its events reach our connections."""

    uuid: str
    switch: InboundEslServer | None


class InboundConnection(EslListener):
    """One client of :class:`InboundEslServer`: not FreeSWITCH, a peer per PROTOCOLS.md §3.3."""

    def __init__(self, server: InboundEslServer) -> None:
        super().__init__()
        self.server = server
        self.authed = False
        self.api_handlers = server.api_handlers
        self.commands = server.commands  # one shared, ordered record of all connections
        self.events = server.events

    def _locate(self, uuid: str) -> Controlled | None:
        call = self.server.calls.get(uuid)
        return None if call is None or call.hung_up else call

    def _lenient(self, uuid: str) -> bool:
        return not self.server.strict_uuids

    def listeners(self) -> list[EslListener]:
        return list(self.server.connections)

    def pre_auth(self, cmd: Command, low: str) -> str | None:
        if self.authed:
            return None
        if low.startswith("auth "):
            if cmd.line[5:].rstrip("\r") == self.server.password:
                self.authed = True
                return "+OK accepted"
            self._stop_after_reply = True
            return "-ERR invalid"
        return "-ERR command not found"


class InboundEslServer:
    """FreeSWITCH's inbound Event Socket (port 8021 style) as a peer; not FreeSWITCH.

    Follows PROTOCOLS.md §3.3 and TV-ESL-1: greets with ``auth/request``, checks
    ``auth <password>``, then answers ``api`` (``uuid_break``, ``uuid_audio_stream``,
    the socket_audio commands of :meth:`attach`-ed calls, ``api_handlers``), ``bgapi``
    (TV-ESL-4, BACKGROUND_JOB to subscribers), ``event``/``noevents``/``filter``/``exit``.
    ``commands`` records every command of every connection with its arrival time.
    With ``strict_uuids`` False (default) uuids of calls not attached are accepted.
    """

    def __init__(self, password: str = "ClueCon", *, strict_uuids: bool = False) -> None:
        self.password = password
        self.strict_uuids = strict_uuids
        self.commands: list[Command] = []
        self.events: list[FiredEvent] = []
        self.calls: dict[str, Attachable] = {}
        self.api_handlers: dict[str, Callable[[str | None], str]] = {}
        self.connections: list[InboundConnection] = []
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def attach(self, call: Attachable) -> None:
        """Make a call known here: ``api uuid_socket_audio_flush <uuid>`` reaches it and its
        events reach this server's subscribed connections (events are switch-wide)."""
        self.calls[call.uuid] = call
        call.switch = self

    async def start(self, host: str = "127.0.0.1") -> InboundEslServer:
        self.server = await asyncio.start_server(self._accept, host, 0, limit=1 << 20)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = InboundConnection(self)
        conn.reader, conn.writer = reader, writer
        self.connections.append(conn)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            conn.send(b"Content-Type: auth/request\n\n")
            await conn.serve()
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def close(self) -> None:
        for conn in self.connections:
            conn.close_esl(notice=False)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
