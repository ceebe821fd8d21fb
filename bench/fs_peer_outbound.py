"""The outbound Event Socket connection of one channel, played by the FreeSWITCH peer in tests.

Not FreeSWITCH: the connection ``socket <host>:<port> async full`` opens to farm's outbound
Event Socket server, following PROTOCOLS.md §3.6 and TV-ESL-7: FreeSWITCH connects and sends
nothing, waits up to 25 s for ``connect``, answers it with the serialized CHANNEL_DATA event,
then serves the session's commands (``getvar``, ``myevents``, ``linger``, ``resume`` …) on top
of bench/fs_peer_esl.py's listener. ``sendmsg`` goes to the channel's park loop and the
hang-up sequence is the call's (bench/fs_peer.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Mapping
from typing import Protocol

from bench.fs_peer_channel import Channel
from bench.fs_peer_esl import Controlled, EslListener
from bench.fs_peer_inbound import InboundEslServer
from bench.fs_peer_wire import Command, build_event, read_command, serialize_plain


__all__ = ["ControlledCall", "OutboundListener"]


class ControlledCall(Controlled, Protocol):
    """The call an outbound connection controls."""

    def client_gone(self) -> None:
        """The connection ended (the client closed or sent ``exit``, or sent garbage)."""
        ...


class OutboundListener(EslListener):
    """The Event Socket session of one channel under outbound control (``async full``).

    Args:
        call: the call it controls (``sendmsg`` without a uuid reaches it).
        channel: that call's channel (the ``connect`` reply, ``getvar``).
        peers: other calls that ``api`` commands on this connection can reach by uuid.
        first_command_timeout: how long to wait for ``connect`` (FreeSWITCH: 25 s).

    ``switch`` is the inbound server the call is attached to, if any: its calls can be
    reached by uuid and its connections hear this channel's events.
    """

    def __init__(
        self,
        call: ControlledCall,
        channel: Channel,
        *,
        peers: Mapping[str, Controlled],
        first_command_timeout: float,
    ) -> None:
        super().__init__()
        self.call = call
        self.channel = channel
        self.session_uuid = channel.uuid
        self.peers = peers
        self.first_command_timeout = first_command_timeout
        self.switch: InboundEslServer | None = None
        self.socket_arg = ""
        self.connected = False

    def connect_reply(self) -> bytes:
        """The outbound ``connect`` reply: a serialized CHANNEL_DATA event (§3.6, TV-ESL-7).

        caller profile with the ``Channel`` prefix, then the channel data, then the reply
        headers, URL-encoded, one empty line, no outer Content-Length.
        """
        data = self.channel.data()
        profile = [("Channel-" + n[len("Caller-") :], v) for n, v in data if n.startswith("Caller-")]
        reply = [
            ("Content-Type", "command/reply"),
            ("Reply-Text", "+OK\n"),
            ("Socket-Mode", "async"),
            ("Control", "full"),
        ]
        headers = build_event("CHANNEL_DATA", reply, channel=profile + data)
        return serialize_plain(headers)

    async def connect(self, host: str, port: int, timeout: float) -> None:
        """Connect as ``socket host:port async full`` does; send nothing; answer ``connect``.

        Returns once the first command was answered (or, if it was not ``connect``,
        swallowed without a reply as mes.c does); then :meth:`serve` the rest.
        """
        self.socket_arg = f"{host}:{port} async full"
        self.channel.set_variable("current_application_data", self.socket_arg)
        self.channel.set_variable("current_application", "socket")
        self.channel.set_variable("socket_host", host)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=1 << 20), timeout)
        self.reader, self.writer = reader, writer
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # FreeSWITCH gives the application 25 s for its first command (§3.6), then sends the
        # disconnect notice and closes (read_packet timeout -> listener_run end).
        try:
            first = await asyncio.wait_for(read_command(reader), self.first_command_timeout)
        except TimeoutError:
            self.close_esl()
            raise
        if first is None:
            self.close_esl()
            raise ConnectionError("the client closed before sending connect")
        self.commands.append(first)
        if first.name == "connect":
            self.connected = True
            self.send(self.connect_reply())
        else:
            await self.handle(first)  # processed, but its reply is never sent
        await writer.drain()

    def reset(self) -> None:
        """A crashed FreeSWITCH: the connection is reset (SO_LINGER 0 + abort)."""
        if self.writer is not None:
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.writer.transport.abort()

    def _locate(self, uuid: str) -> Controlled | None:
        call: Controlled | None = self.call if uuid == self.session_uuid else self.peers.get(uuid)
        if call is None and self.switch is not None:
            call = self.switch.calls.get(uuid)
        return None if call is None or call.hung_up else call

    def listeners(self) -> list[EslListener]:
        return [self, *(self.switch.connections if self.switch is not None else [])]

    def session_command(self, cmd: Command, low: str) -> str | None:
        if low.startswith("connect"):
            self.connected = True
            self.send(self.connect_reply())
            return ""  # reply already written
        if low.startswith("getvar"):
            name = cmd.line[7:].strip() if " " in cmd.line else ""
            return self.channel.variables.get(name, "") or "-ERR command not found"
        if low.startswith("myevents"):
            return self.subscription.enable_myevents(cmd.line)
        return None

    async def on_client_gone(self) -> None:
        self.close_esl()
        self.call.client_gone()
