"""One Event Socket connection of the FreeSWITCH peer in tests: mes.c's listener.

Not FreeSWITCH: a test double that answers commands in the order and with the texts of
FreeSWITCH 1.10.12's mes.c ``parse_command``, following PROTOCOLS.md §3 (and §7).

* :class:`EslListener` is one connection, whatever its mode: it reads commands, answers
  them, runs ``api``/``bgapi``, passes ``sendmsg`` to the channel and delivers events.
  bench/fs_peer_outbound.py (the connection a channel's ``socket`` application opens,
  §3.6) and bench/fs_peer_inbound.py (port 8021 style, §3.3) add what their mode changes.
* :class:`Controlled` is what a connection needs of a channel it reaches by uuid.

The bytes are bench/fs_peer_wire.py's; which events a connection hears is
bench/fs_peer_subscription.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from bench.fs_peer_audio_stream import USAGE as AUDIO_STREAM_USAGE
from bench.fs_peer_subscription import Subscription
from bench.fs_peer_wire import (
    BadCommand,
    Command,
    FiredEvent,
    api_response,
    build_event,
    command_reply,
    disconnect_notice,
    event_message,
    read_command,
)


__all__ = ["Controlled", "EslListener"]


class Controlled(Protocol):
    """A channel as an Event Socket connection reaches it: ``sendmsg`` and the socket_audio APIs."""

    @property
    def hung_up(self) -> bool: ...

    @property
    def socket_audio_active(self) -> bool:
        """Whether mod_socket_audio's private exists on the channel (flush/stop answer +OK)."""
        ...

    def queue_message(self, cmd: Command) -> None: ...

    def request_flush(self) -> None: ...

    def stop_audio_now(self) -> None: ...

    def kill(self, cause: str) -> None: ...

    def transfer(self, extension: str, dialplan: str, context: str) -> None: ...

    def break_media(self) -> None: ...

    def audio_stream_api(self, arg: str) -> str: ...


class EslListener:
    """One Event Socket connection as mes.c serves it: parse_command's order and reply texts.

    Not FreeSWITCH: a peer following PROTOCOLS.md §3. Subclasses add the session (outbound)
    or authentication (inbound).
    """

    def __init__(self) -> None:
        self.commands: list[Command] = []
        self.events: list[FiredEvent] = []
        self.errors: list[str] = []
        self.subscription = Subscription()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.closed = asyncio.Event()
        self.api_handlers: dict[str, Callable[[str | None], str]] = {}

    # what each subclass supplies
    session_uuid: str | None = None
    full = True
    resume = False
    linger: int | None = None
    _stop_after_reply = False

    def _locate(self, uuid: str) -> Controlled | None:
        return None

    def _lenient(self, uuid: str) -> bool:
        return False

    def pre_auth(self, cmd: Command, low: str) -> str | None:
        return None

    def session_command(self, cmd: Command, low: str) -> str | None:
        return None

    async def on_client_gone(self) -> None:
        self.close_esl()

    def listeners(self) -> list[EslListener]:
        """The connections an event fired here can reach (events are switch-wide)."""
        return [self]

    # -- writing --------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(data)

    async def send_raw(self, data: bytes) -> None:
        """Write arbitrary bytes on the Event Socket (misbehaviour for bad-input tests)."""
        self.send(data)
        if self.writer is not None and not self.writer.is_closing():
            await self.writer.drain()

    def close_esl(self, notice: bool = True) -> None:
        """send_disconnect + close_socket (mes.c listener_run end)."""
        if self.writer is not None and not self.writer.is_closing():
            if notice:
                self.writer.write(disconnect_notice(self.session_uuid))
            with contextlib.suppress(OSError):
                if self.writer.can_write_eof():
                    self.writer.write_eof()
            self.writer.close()
        self.closed.set()

    # -- events ---------------------------------------------------------------------

    def wants(self, name: str, subclass: str | None, headers: Mapping[str, str]) -> bool:
        """mes.c event_handler, on an open connection."""
        return not self.closed.is_set() and self.subscription.wants(name, subclass, headers, self.session_uuid)

    def deliver(self, name: str, subclass: str | None, headers: list[tuple[str, str]], body: str | None) -> bool:
        """Write one event on this connection if it is subscribed (in its format)."""
        if not self.wants(name, subclass, dict(headers)):
            return False
        if self.subscription.format not in ("plain", "json"):
            self.errors.append(f"event {name} not delivered: format {self.subscription.format} is not modelled")
            return False
        self.send(event_message(headers, body, self.subscription.format))
        return True

    def fire(
        self,
        name: str,
        extra: Iterable[tuple[str, str]] = (),
        *,
        subclass: str | None = None,
        calling: str | None = None,
        body: str | None = None,
        pre: Iterable[tuple[str, str]] = (),
        channel: list[tuple[str, str]] | None = None,
    ) -> FiredEvent:
        """Build an event as switch_event_create + set_data do, deliver it where subscribed, record it."""
        headers = build_event(name, extra, subclass=subclass, calling=calling, pre=pre, channel=channel)
        delivered = False
        for listener in self.listeners():
            delivered = listener.deliver(name, subclass, headers, body) or delivered
        fired = FiredEvent(time.monotonic_ns(), name, subclass, tuple(headers), body, delivered)
        self.events.append(fired)
        return fired

    # -- commands (mes.c parse_command, in its order) ------------------------------

    async def serve(self) -> None:
        """Read and answer commands until the client closes or the peer ends the connection."""
        assert self.reader is not None
        try:
            while not self.closed.is_set():
                try:
                    cmd = await read_command(self.reader)
                except BadCommand as exc:
                    self.errors.append(str(exc))
                    break
                except (ConnectionError, OSError, ValueError, asyncio.LimitOverrunError) as exc:
                    self.errors.append(f"read failed: {exc!r}")
                    break
                if cmd is None:
                    break
                self.commands.append(cmd)
                reply = await self.handle(cmd)
                if reply is not None:
                    self.send(command_reply(reply) if isinstance(reply, str) else reply)
                if self.writer is not None and not self.writer.is_closing():
                    with contextlib.suppress(ConnectionError):
                        await self.writer.drain()
                if cmd.name in ("exit", "...") or self._stop_after_reply:
                    break
        finally:
            await self.on_client_gone()

    async def handle(self, cmd: Command) -> str | bytes | None:
        """Return the Reply-Text (or whole bytes, or None for no reply) for one command."""
        low = cmd.line.lower()
        if low.startswith(("exit", "...")):
            return "+OK bye"
        pre = self.pre_auth(cmd, low)
        if pre is not None:
            return pre
        if low.startswith("filter "):
            return self.subscription.filter(cmd.line[7:].lstrip(" "))
        session = self.session_uuid is not None
        if session and low.startswith("resume"):
            self.resume = True
            return "+OK"
        if session or low.startswith("myevents "):
            special = self.session_command(cmd, low)
            if special is not None:
                return special or None
        if low.startswith("divert_events"):
            if not session:
                return "-ERR not controlling a session."
            onoff = cmd.line[13:].strip(" ")
            if not onoff:
                return "-ERR missing value."
            return "+OK events diverted" if onoff.lower() == "on" else "+OK events not diverted"
        if low.startswith("sendmsg"):
            return self.sendmsg(cmd)
        if not self.full:
            return "-ERR command not found"
        if low.startswith("api "):
            cmd_name, _, arg = cmd.line[4:].partition(" ")
            return api_response(self.api(cmd_name, arg if _ else None))
        if low.startswith("bgapi "):
            return self._bgapi(cmd)
        if low.startswith("linger"):
            if not session:
                return "-ERR not controlling a session"
            arg = cmd.line[7:] if cmd.line[6:7] == " " else ""
            self.linger = int(re.match(r"\s*(-?\d*)", arg).group(1) or 0) if arg else -1  # type: ignore[union-attr]
            return f"+OK will linger {self.linger} seconds" if self.linger != -1 else "+OK will linger"
        if low.startswith("nolinger"):
            if not session:
                return "-ERR not controlling a session"
            self.linger = None
            return "+OK will not linger"
        if low.startswith("event"):
            return self.subscription.event(cmd.line)
        if low.startswith("nixevent"):
            return self.subscription.nixevent(cmd.line)
        if low.startswith("noevents"):
            return self.subscription.noevents()
        return "-ERR command not found"

    def sendmsg(self, cmd: Command) -> str:
        target = cmd.line[7:].strip() or (cmd.header("session-id") or "")
        if target == self.session_uuid:
            target = ""
        if not target and self.session_uuid is not None:
            target = self.session_uuid  # outbound: the controlled channel
        call = self._locate(target) if target else None
        if call is not None:
            call.queue_message(cmd)
            return "+OK"
        if target and self._lenient(target):
            return "+OK"
        return f"-ERR invalid session id [{target}]"

    def _bgapi(self, cmd: Command) -> bytes:
        api_cmd, _, arg = cmd.line[6:].partition(" ")
        job = cmd.header("Job-UUID") or str(uuidlib.uuid4())
        output = self.api(api_cmd, arg if _ else None) or "Command returned no output!"
        extra = [("Job-UUID", job), ("Job-Owner-UUID", self.session_uuid or ""), ("Job-Command", api_cmd)]
        if _:
            extra.append(("Job-Command-Arg", arg))
        # The job thread answers after the reply is on the wire.
        asyncio.get_running_loop().call_soon(lambda: self.fire("BACKGROUND_JOB", extra, body=output))
        return command_reply(f"+OK Job-UUID: {job}", ("Job-UUID", job))

    def api(self, cmd: str, arg: str | None) -> str:
        """Run one API command as mod_commands / mod_socket_audio / mod_audio_stream answer it."""
        if cmd in self.api_handlers:
            return self.api_handlers[cmd](arg)
        if cmd in ("uuid_socket_audio_flush", "uuid_socket_audio_stop"):
            uuid = (arg or "").strip(" \t\r\n")
            if not uuid:
                return f"-ERR Usage: {cmd} <uuid>\n"
            call = self._locate(uuid)
            if call is None:
                return f"-ERR Session not found: {uuid}\n"
            if not call.socket_audio_active:
                return f"-ERR Socket audio not active on session: {uuid}\n"
            if cmd.endswith("flush"):
                call.request_flush()
            else:
                call.stop_audio_now()
            return "+OK\n"
        if cmd == "uuid_break":
            if not arg:
                return "-USAGE: <uuid> [all]\n"
            uuid = arg.split(" ", 1)[0]
            call = self._locate(uuid)
            if call is None and not self._lenient(uuid):
                return "-ERR No such channel!\n"
            if call is not None:
                call.break_media()
            return "+OK\n"
        if cmd == "uuid_audio_stream":
            call = self._locate((arg or "").split(" ", 1)[0])
            if call is not None:
                return call.audio_stream_api(arg or "")
            return "+OK Success\n" if arg else f"-USAGE: {AUDIO_STREAM_USAGE}\n"
        if cmd in ("uuid_kill", "uuid_transfer", "uuid_broadcast"):
            return self._channel_api(cmd, arg or "")
        return f"-ERR {cmd} Command not found!\n"

    def _channel_api(self, cmd: str, arg: str) -> str:
        """mod_commands' uuid_kill, uuid_transfer and uuid_broadcast, with their reply texts."""
        argv = [a for a in arg.split(" ") if a]  # switch_separate_string drops empty tokens
        if cmd == "uuid_kill":
            if not argv:
                return "-USAGE: <uuid> [cause]\n"
            call = self._locate(argv[0])
            if call is None:
                return "-ERR No such channel!\n"
            call.kill(argv[1] if len(argv) > 1 else "NORMAL_CLEARING")
            return "+OK\n"
        if cmd == "uuid_transfer":
            if not 2 <= len(argv) <= 5:
                return "-USAGE: <uuid> [-bleg|-both] <dest-exten> [<dialplan>] [<context>]\n"
            call = self._locate(argv[0])
            if call is None:
                return "-ERR No such channel!\n"
            rest = argv[2:] if argv[1].startswith("-") else argv[1:]  # -bleg/-both: no bridge here
            if not rest:
                return "-ERR\n"
            call.transfer(rest[0], *(rest[1:3] + ["", ""])[:2])
            return "+OK\n"
        # uuid_broadcast <uuid> <path> [aleg|bleg|holdb|both]: switch_ivr_broadcast queues
        # "execute playback" with event-lock and 5 lead frames to the channel.
        if len(argv) < 2:
            return "-USAGE: <uuid> <path> [aleg|bleg|holdb|both]\n"
        call = self._locate(argv[0])
        if call is None:
            return "-ERR invalid uuid\n"
        headers = (
            ("call-command", "execute"),
            ("execute-app-name", "playback"),
            ("execute-app-arg", argv[1]),
            ("event-lock", "true"),
            ("lead-frames", "5"),
        )
        call.queue_message(Command(f"sendmsg {argv[0]}", headers, None, time.monotonic_ns()))
        return "+OK Message sent\n"
