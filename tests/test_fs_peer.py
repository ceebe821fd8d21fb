"""The FreeSWITCH peer of bench/fs_peer.py checked against PROTOCOLS.md, without farm.

The peer stands in for FreeSWITCH (it is not FreeSWITCH); these tests play farm's side
with raw asyncio sockets — the controller on the Event Socket and the sidecar on the
mod_socket_audio TCP socket — and parse everything the peer writes with farm's own
EventSocketParser, so the bytes are known to be what farm will have to read.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.fs_peer import SocketAudioCall
from bench.fs_peer_inbound import InboundEslServer
from bench.fs_peer_playback import DISCARD_NS, PLAY_FRAME
from bench.fs_peer_wire import GOODBYE, event_message, serialize_plain
from farm.protocol.esl import ApiResponse, ChannelData, DisconnectNotice, EslEvent, EventSocketParser, Reply
from tests.conftest import MS


UUID = "6f2d1c1e-2b7a-4b8e-9a57-0c1f8f9a2d11"
JOB = "11111111-2222-4333-8444-555555555555"
TIMEOUT = 30_000 * MS  # a deadline for a state to come, not a speed: a busy machine is slow, not wrong
PTIME_NS = 20_000_000
# asyncio may run a timer up to its clock's resolution (1 ns) early, and the loop's float
# seconds round: a paced write can look that much early against a deadline in integer ns.
CLOCK_SLACK_NS = 1_000


_SERVERS: list[asyncio.base_events.Server] = []  # listeners a test opened, closed even if it fails


def run(coro: Callable[[], Awaitable[Any]]) -> Any:
    async def guarded() -> Any:
        try:
            return await asyncio.wait_for(coro(), 120_000 * MS)
        finally:
            while _SERVERS:
                _SERVERS.pop().close()
            await asyncio.sleep(0.02)  # let closed transports finish closing before the loop goes

    return asyncio.run(guarded())


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Wait for a state with a generous deadline (a busy machine is slow, not wrong)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.005)


def queued_at_each_module_recv(call: SocketAudioCall) -> list[int]:
    """Bytes in the module's queue just before each of its recvs, from the peer's records:
    what it took before, less the frames it had played (one playback turn, no flush)."""
    out = []
    for k, (t, _) in enumerate(call.module_recv):
        taken = sum(n for _, n in call.module_recv[:k])
        played = sum(1 for tp, _ in call.played if tp <= t)
        out.append(taken - PLAY_FRAME * played)
    return out


def taken_before_it_arrived(call: SocketAudioCall) -> list[int]:
    """Module recvs that took bytes the peer had not yet read off the socket (must be none)."""
    late = []
    taken = 0
    for t, n in call.module_recv:
        taken += n
        if taken > sum(m for tw, m in call.playback_recv if tw <= t):
            late.append(t)
    return late


async def read_message(reader: asyncio.StreamReader) -> bytes:
    """One FreeSWITCH->client message, raw: header block, then the outer Content-Length body."""
    head = await asyncio.wait_for(reader.readuntil(b"\n\n"), TIMEOUT)
    length = re.match(rb"(?:.*\n)*?Content-Length: (\d+)\n", head)
    body = await asyncio.wait_for(reader.readexactly(int(length.group(1))), TIMEOUT) if length else b""
    return head + body


def parse(raw: bytes) -> Any:
    parser = EventSocketParser()
    parser.receive_data(raw)
    [message] = parser.events_received()
    assert parser.parser_exc is None
    return message


class Controller:
    """farm's side of the outbound Event Socket, reduced to raw bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> bytes:
        return await read_message(self.reader)

    async def ask(self, data: bytes) -> bytes:
        await self.send(data)
        return await self.recv()


async def outbound(call: SocketAudioCall) -> tuple[Controller, asyncio.base_events.Server]:
    """Start a one-shot outbound server (farm's role) on an ephemeral port and connect the call."""
    accepted: asyncio.Queue[Controller] = asyncio.Queue()

    async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await accepted.put(Controller(r, w))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0, limit=1 << 20)
    _SERVERS.append(server)
    port = server.sockets[0].getsockname()[1]
    connecting = asyncio.create_task(call.connect("127.0.0.1", port))
    ctl = await asyncio.wait_for(accepted.get(), TIMEOUT)
    # FreeSWITCH sends nothing first (TV-ESL-7).
    try:
        early = await asyncio.wait_for(ctl.reader.read(1), 50 * MS)
    except TimeoutError:
        early = b""
    assert early == b""
    await ctl.send(b"connect\n\n")
    await connecting
    return ctl, server


class Sidecar:
    """farm's mod_socket_audio listener: accepts the module's TCP connection."""

    async def start(self) -> Sidecar:
        self.conn: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.get_running_loop().create_future()
        )
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        _SERVERS.append(self.server)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.conn.set_result((r, w))

    async def accepted(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(self.conn, TIMEOUT)


def sendmsg_socket_audio(port: int, event_uuid: str = "0b7e9a52-0001-4000-8000-000000000001") -> bytes:
    return (
        "sendmsg\ncall-command: execute\nexecute-app-name: socket_audio\n"
        f"execute-app-arg: 127.0.0.1 {port}\nEvent-UUID: {event_uuid}\n\n"
    ).encode()


async def started_call(**kw: Any) -> tuple[SocketAudioCall, Controller, Sidecar, asyncio.StreamReader, Any]:
    """A call under control with json events subscribed and socket_audio running."""
    call = SocketAudioCall(UUID, linger_scale=0.01, **kw)
    ctl, server = await outbound(call)
    assert isinstance(parse(await ctl.recv()), ChannelData)
    assert parse(await ctl.ask(b"myevents json\n\n")).reply_text == "+OK Events Enabled"
    subscribe = b"event json CUSTOM socket_audio::playback_start socket_audio::playback_stop\n\n"
    assert parse(await ctl.ask(subscribe)).reply_text == "+OK event listener enabled json"
    side = await Sidecar().start()
    assert parse(await ctl.ask(sendmsg_socket_audio(side.port))).reply_text == "+OK"
    reader, writer = await side.accepted()
    names = [parse(await ctl.recv()).name for _ in range(2)]
    assert names == ["CHANNEL_EXECUTE", "CHANNEL_EXECUTE_COMPLETE"]
    return call, ctl, side, reader, (writer, server)


async def next_event(ctl: Controller) -> EslEvent:
    message = parse(await ctl.recv())
    assert isinstance(message, EslEvent), message
    return message


async def drain_mic(reader: asyncio.StreamReader, sink: bytearray) -> None:
    while chunk := await reader.read(65536):
        sink += chunk


# -- serialization vectors -------------------------------------------------------

TV_MSA_4_HEADERS = [
    ("Event-Subclass", "socket_audio::playback_stop"),
    ("Event-Name", "CUSTOM"),
    ("Core-UUID", "3c9d5a0e-1111-4222-8333-944455556666"),
    ("FreeSWITCH-Hostname", "fs1"),
    ("FreeSWITCH-Switchname", "fs1"),
    ("FreeSWITCH-IPv4", "10.0.0.5"),
    ("FreeSWITCH-IPv6", "::1"),
    ("Event-Date-Local", "2025-01-02 03:04:05"),
    ("Event-Date-GMT", "Thu, 02 Jan 2025 03:04:05 GMT"),
    ("Event-Date-Timestamp", "1735787045123456"),
    ("Event-Calling-File", "mod_socket_audio.c"),
    ("Event-Calling-Function", "socket_audio_thread"),
    ("Event-Calling-Line-Number", "310"),
    ("Event-Sequence", "4711"),
    ("Channel-State", "CS_EXECUTE"),
    ("Channel-Call-State", "ACTIVE"),
    ("Channel-Name", "sofia/internal/1000@10.0.0.5"),
    ("Unique-ID", UUID),
    ("Answer-State", "answered"),
    ("Channel-Read-Codec-Name", "PCMU"),
    ("Channel-Read-Codec-Rate", "8000"),
    ("variable_uuid", UUID),
    ("Playback-Stop-Reason", "flush"),
]


class TestSerialization:
    def test_tv_msa_4_abridged_plain_event_is_806_bytes(self) -> None:
        inner = serialize_plain(TV_MSA_4_HEADERS)
        assert len(inner) == 806
        assert b"Event-Subclass: socket_audio%3A%3Aplayback_stop\n" in inner
        assert b"Channel-Name: sofia/internal/1000%4010.0.0.5\n" in inner
        assert inner.endswith(b"Playback-Stop-Reason: flush\n\n")
        raw = event_message(TV_MSA_4_HEADERS)
        assert raw.startswith(b"Content-Length: 806\nContent-Type: text/event-plain\n\n")
        event = parse(raw)
        assert event.subclass == "socket_audio::playback_stop"
        assert event.headers["Playback-Stop-Reason"] == "flush"

    def test_json_event_parses_to_the_same_headers(self) -> None:
        event = parse(event_message(TV_MSA_4_HEADERS, fmt="json"))
        assert dict(event.headers) == dict(TV_MSA_4_HEADERS)

    def test_plain_event_with_body_and_empty_value(self) -> None:
        inner = serialize_plain([("Event-Name", "BACKGROUND_JOB"), ("Job-Owner-UUID", "")], "+OK Success\n")
        assert inner == b"Event-Name: BACKGROUND_JOB\nJob-Owner-UUID: _undef_\nContent-Length: 12\n\n+OK Success\n"


# -- the outbound session (§3.6, TV-ESL-7) ------------------------------------------


class TestOutboundSession:
    def test_tv_esl_7_connect_commands_and_linger_hangup(self) -> None:
        async def main() -> None:
            call = SocketAudioCall(UUID, linger_scale=0.01)
            ctl, server = await outbound(call)
            raw = await ctl.recv()
            assert raw.startswith(b"Event-Name: CHANNEL_DATA\n")
            assert raw.endswith(
                b"variable_socket_host: 127.0.0.1\nContent-Type: command/reply\nReply-Text: %2BOK%0A\n"
                b"Socket-Mode: async\nControl: full\n\n"
            )
            data = parse(raw)
            assert isinstance(data, ChannelData) and data.ok and data.unique_id == UUID
            assert data.headers["Channel-Read-Codec-Rate"] == "8000"
            assert data.headers["Channel-Channel-Name"] == data.headers["Channel-Name"]
            assert data.headers["variable_current_application"] == "socket"

            assert (
                await ctl.ask(b"myevents json\n\n")
                == b"Content-Type: command/reply\nReply-Text: +OK Events Enabled\n\n"
            )
            assert parse(await ctl.ask(b"linger 5\n\n")).reply_text == "+OK will linger 5 seconds"
            subscribe = b"event json CUSTOM socket_audio::playback_start socket_audio::playback_stop\n\n"
            assert parse(await ctl.ask(subscribe)).reply_text == "+OK event listener enabled json"
            answer = b"sendmsg\ncall-command: execute\nexecute-app-name: answer\nEvent-UUID: app-1\n\n"
            assert parse(await ctl.ask(answer)).reply_text == "+OK"
            events = [await next_event(ctl) for _ in range(3)]
            assert [e.name for e in events] == ["CHANNEL_EXECUTE", "CHANNEL_ANSWER", "CHANNEL_EXECUTE_COMPLETE"]
            assert events[2].headers["Application"] == "answer"
            assert events[2].headers["Application-UUID"] == "app-1"
            assert events[2].headers["Answer-State"] == "answered"
            assert all(e.content_type == "text/event-json" for e in events)
            assert parse(await ctl.ask(b"bogus\n\n")).reply_text == "-ERR command not found"
            assert parse(await ctl.ask(b"api nosuch a b\n\n")).body == "-ERR nosuch Command not found!\n"

            hanging = asyncio.create_task(call.hangup("NORMAL_CLEARING"))
            hangup = await next_event(ctl)
            assert hangup.name == "CHANNEL_HANGUP" and hangup.headers["Hangup-Cause"] == "NORMAL_CLEARING"
            socket_done = await next_event(ctl)
            assert socket_done.headers["Application"] == "socket"
            notice = await ctl.recv()
            assert (
                notice
                == (
                    f"Content-Type: text/disconnect-notice\nControlled-Session-UUID: {UUID}\n"
                    "Content-Disposition: linger\nChannel-Name: sofia/internal/sipp@127.0.0.1:5070\n"
                    "Linger-Time: 5\nContent-Length: 0\n\n"
                ).encode()
            )
            assert (await next_event(ctl)).name == "CHANNEL_HANGUP_COMPLETE"
            final = await ctl.recv()
            assert (
                final
                == (
                    f"Content-Type: text/disconnect-notice\nControlled-Session-UUID: {UUID}\n"
                    f"Content-Disposition: disconnect\nContent-Length: 67\n\n{GOODBYE}"
                ).encode()
            )
            assert isinstance(parse(final), DisconnectNotice)
            assert await ctl.reader.read() == b""
            await hanging
            assert [c.name for c in call.commands] == [
                "connect", "myevents", "linger", "event", "sendmsg", "bogus", "api"
            ]  # fmt: skip
            assert call.commands[4].header("Event-UUID") == "app-1"
            ctl.writer.close()
            server.close()

        run(main)

    def test_without_linger_the_socket_closes_at_hangup(self) -> None:
        async def main() -> None:
            call = SocketAudioCall(UUID)
            ctl, server = await outbound(call)
            await ctl.recv()
            await call.hangup("USER_BUSY")
            rest = await ctl.reader.read()
            assert rest == disconnect(UUID)
            assert [e.name for e in call.events][-1] == "CHANNEL_HANGUP_COMPLETE"
            assert not call.events[-1].delivered
            ctl.writer.close()
            server.close()

        run(main)


def disconnect(uuid: str) -> bytes:
    return (
        f"Content-Type: text/disconnect-notice\nControlled-Session-UUID: {uuid}\n"
        f"Content-Disposition: disconnect\nContent-Length: 67\n\n{GOODBYE}"
    ).encode()


# -- mod_socket_audio (§2) ------------------------------------------------------------


class TestSocketAudio:
    def test_tv_msa_3_flush_replies(self) -> None:
        async def main() -> None:
            call = SocketAudioCall(UUID)
            ctl, server = await outbound(call)
            await ctl.recv()
            flush = f"api uuid_socket_audio_flush {UUID}\n\n".encode()
            inactive = f"-ERR Socket audio not active on session: {UUID}\n"
            assert parse(await ctl.ask(flush)).body == inactive
            side = await Sidecar().start()
            assert parse(await ctl.ask(sendmsg_socket_audio(side.port))).reply_text == "+OK"
            reader, writer = await side.accepted()
            assert await ctl.ask(flush) == b"Content-Type: api/response\nContent-Length: 4\n\n+OK\n"
            other = "00000000-0000-4000-8000-000000000000"
            assert parse(await ctl.ask(f"api uuid_socket_audio_flush {other}\n\n".encode())).body == (
                f"-ERR Session not found: {other}\n"
            )
            assert parse(await ctl.ask(f"api uuid_break {UUID} all\n\n".encode())).body == "+OK\n"
            assert parse(await ctl.ask(f"api uuid_socket_audio_stop {UUID}\n\n".encode())).body == "+OK\n"
            assert await asyncio.wait_for(drain_mic_to_eof(reader), TIMEOUT)
            assert parse(await ctl.ask(flush)).body == inactive
            flushes = [c for c in call.commands if c.line.startswith("api uuid_socket_audio_flush")]
            assert len(flushes) == 4 and all(c.t_ns > 0 for c in flushes)
            writer.close()
            ctl.writer.close()
            await call.aclose()
            side.server.close()
            server.close()

        run(main)

    def test_mic_stream_is_640_bytes_every_20_ms(self) -> None:
        async def main() -> None:
            call, ctl, side, reader, closers = await started_call(idle_silence=False)
            got = bytearray()
            draining = asyncio.create_task(drain_mic(reader, got))
            pcm = bytes(range(256)) * 125  # 32000 B = 1 s at 16 kHz
            sent = await call.stream(pcm)
            assert [n for _, n in sent] == [640] * 50
            # Paced against the clock: write k is due at start + k * 20 ms, a fixed grid (a late
            # wake-up does not push the ones after it: no drift), and none goes out before it
            # is due. A busy machine sends later, never earlier.
            assert len(call.mic_due) == len(call.mic_sent)
            speech = [(t, due) for (t, _, is_speech), due in zip(call.mic_sent, call.mic_due) if is_speech]
            assert [t for t, _ in speech] == [t for t, _ in sent]
            first_due = speech[0][1]
            assert [due - first_due for _, due in speech] == [PTIME_NS * i for i in range(50)]
            assert all(t >= due - CLOCK_SLACK_NS for t, due in speech), speech
            await wait_until(lambda: len(got) >= len(pcm), "the sidecar read the whole second")
            assert bytes(got) == pcm
            assert call.first_speech_ns == sent[0][0]
            odd = await call.stream(pcm[:6400], odd_splits=True)
            assert sorted({n for _, n in odd}) == [639, 640, 641] and sum(n for _, n in odd) == 6400
            draining.cancel()
            await finish(call, closers, side, ctl)

        run(main)

    def test_burst_reply_plays_at_real_time_with_one_start_stop(self) -> None:
        async def main() -> None:
            call, ctl, side, reader, closers = await started_call()
            writer = closers[0]
            asyncio.create_task(drain_mic(reader, bytearray()))
            reply = bytes(range(240)) * 4 * 25  # 24000 B = 0.5 s at 24 kHz, in 960 B writes
            for i in range(0, len(reply), 960):
                writer.write(reply[i : i + 960])
            await writer.drain()
            start = await next_event(ctl)
            assert start.subclass == "socket_audio::playback_start" and start.unique_id == UUID
            stop = await next_event(ctl)
            assert stop.subclass == "socket_audio::playback_stop"
            assert stop.headers["Playback-Stop-Reason"] == "complete"
            frames = [f for _, f in call.played]
            assert len(frames) == 25 and b"".join(frames) == reply
            # Real time, never faster: frame i is not played before i ptimes after the module
            # took the burst's first bytes (its clock starts there; a late frame does not
            # let the next ones catch up by more than one ptime, and never gets ahead).
            first_take = call.module_recv[0][0]
            times = [t for t, _ in call.played]
            assert all(t >= first_take + i * PTIME_NS - CLOCK_SLACK_NS for i, t in enumerate(times)), times
            assert times == sorted(times)
            assert call.violations == []
            assert sum(n for _, n in call.playback_recv) == len(reply)
            # Two records: when the bytes got off the wire (playback_recv, read eagerly) and when
            # the module took them (module_recv): never before they arrived, in recvs of at
            # most 8192 bytes, and only while less than a frame was queued (§2.4).
            assert taken_before_it_arrived(call) == []
            assert max(n for _, n in call.module_recv) <= 8192
            assert sum(n for _, n in call.module_recv) == len(reply)
            queued = queued_at_each_module_recv(call)
            assert queued[0] == 0 and all(0 <= q < PLAY_FRAME for q in queued), queued
            # A partial last frame is padded with zeros, one more turn.
            writer.write(reply[:1000])
            await writer.drain()
            assert (await next_event(ctl)).subclass == "socket_audio::playback_start"
            assert (await next_event(ctl)).headers["Playback-Stop-Reason"] == "complete"
            assert call.played[-1][1] == reply[960:1000] + bytes(920)
            await finish(call, closers, side, ctl)

        run(main)

    def test_flush_stops_playback_discards_50_ms_then_plays_again(self) -> None:
        async def main() -> None:
            call, ctl, side, reader, closers = await started_call()
            writer = closers[0]
            asyncio.create_task(drain_mic(reader, bytearray()))
            reply = bytes(48000 * 3)  # 3 s (less than the peer's read-ahead: all of it gets off the wire)
            writer.write(reply)
            await writer.drain()
            assert (await next_event(ctl)).subclass == "socket_audio::playback_start"
            # Mid-reply, with the rest of it already read off the socket and waiting for the module.
            await wait_until(lambda: sum(n for _, n in call.playback_recv) == len(reply), "the reply on the wire")
            await wait_until(lambda: len(call.played) >= 3, "a few frames played")
            flushed_at = time.monotonic_ns()
            assert parse(await ctl.ask(f"api uuid_socket_audio_flush {UUID}\n\n".encode())).body == "+OK\n"
            stop = await next_event(ctl)
            assert stop.headers["Playback-Stop-Reason"] == "flush"
            [(consumed_at, consumer, cleared, was_playing)] = call.flushes
            assert was_playing and consumer == "playback_loop"
            # In order: sent, arrived (the flag is set as it arrives), consumed by the playback
            # loop, which fired playback_stop.
            [command] = [c for c in call.commands if c.line.startswith("api uuid_socket_audio_flush")]
            [stop_fired] = [e for e in call.events if e.subclass == "socket_audio::playback_stop"]
            assert flushed_at <= command.t_ns <= consumed_at <= stop_fired.t_ns
            # The loop looks at the flag before every frame: none was played once the flush was in.
            played_before = [t for t, _ in call.played if t < consumed_at]
            assert len(played_before) == len(call.played) >= 3
            assert all(t < command.t_ns for t in played_before)
            # What was still buffered is taken at once and dropped inside the 50 ms window:
            # every byte of the reply was played, cleared from the queue, or discarded.
            await wait_until(lambda: sum(n for _, n in call.module_recv) == len(reply), "the module took it all")
            discarded = sum(n for _, n in call.discarded)
            assert discarded > 0 and cleared < PLAY_FRAME + 8192
            assert all(command.t_ns <= t < consumed_at + DISCARD_NS for t, _ in call.discarded), call.discarded
            assert PLAY_FRAME * len(played_before) + cleared + discarded == len(reply)
            assert len(call.played) == len(played_before)  # nothing of the reply after the flush
            # The next utterance, sent once the window is over, plays whole.
            await wait_until(lambda: time.monotonic_ns() >= consumed_at + DISCARD_NS, "the window over")
            utterance = bytes(range(1, 241)) * 4 * 5
            writer.write(utterance)
            await writer.drain()
            assert (await next_event(ctl)).subclass == "socket_audio::playback_start"
            assert (await next_event(ctl)).headers["Playback-Stop-Reason"] == "complete"
            assert b"".join(f for _, f in call.played[len(played_before) :]) == utterance
            assert sum(n for _, n in call.discarded) == discarded
            await finish(call, closers, side, ctl)

        run(main)

    def test_odd_chunks_are_violations(self) -> None:
        async def main() -> None:
            call, ctl, side, reader, closers = await started_call()
            writer = closers[0]
            asyncio.create_task(drain_mic(reader, bytearray()))
            writer.write(bytes(961))
            await writer.drain()
            # The module takes the 961 bytes on their own before the next write is made.
            await wait_until(lambda: sum(n for _, n in call.module_recv) == 961, "the module took 961 bytes")
            writer.write(bytes(958))
            await writer.drain()
            await wait_until(lambda: sum(n for _, n in call.module_recv) == 961 + 958, "the module took 958 more")
            assert [n for _, n in call.module_recv] == [961, 958]
            assert len(call.violations) == 1 and "recv 1 of 961 bytes is odd (total 961)" in call.violations[0]
            writer.close()  # the sidecar hangs up: the module's thread ends, no event (§2.6)
            await wait_until(lambda: len(call.violations) == 2, "the module's thread ended")
            assert call.audio_eof_ns is not None
            assert call.violations[1] == "farm sent 1919 bytes in all: not whole 16-bit samples"
            await finish(call, closers, side, ctl)

        run(main)

    def test_failed_connect_only_logs(self) -> None:
        async def main() -> None:
            call = SocketAudioCall(UUID)
            ctl, server = await outbound(call)
            await ctl.recv()
            await ctl.ask(b"myevents plain\n\n")
            side = await Sidecar().start()
            port = side.port
            side.server.close()
            await side.server.wait_closed()
            assert parse(await ctl.ask(sendmsg_socket_audio(port))).reply_text == "+OK"
            names = [(await next_event(ctl)).name for _ in range(2)]
            assert names == ["CHANNEL_EXECUTE", "CHANNEL_EXECUTE_COMPLETE"]
            assert not call.socket_audio_active and call.errors
            ctl.writer.close()
            await call.aclose()
            server.close()

        run(main)


class TestMisbehaviour:
    def test_flush_while_idle_eats_the_next_chunk(self) -> None:
        async def main() -> None:
            call, ctl, side, reader, closers = await started_call()
            writer = closers[0]
            asyncio.create_task(drain_mic(reader, bytearray()))
            assert parse(await ctl.ask(f"api uuid_socket_audio_flush {UUID}\n\n".encode())).body == "+OK\n"
            assert call.flush_flag and call.flushes == []  # pending: nothing plays to consume it
            first = bytes(range(1, 241)) * 4
            writer.write(first)
            await writer.drain()
            await wait_until(lambda: call.flushes != [], "the next chunk consumed the flush")
            [(consumed_at, *rest)] = call.flushes
            assert rest == ["socket_thread", 0, False]
            # §2.5: the pending flush eats the next chunk whole, whatever its size: a clipped start.
            assert call.discarded == [(call.discarded[0][0], 960)] and call.discarded[0][0] <= consumed_at
            assert [n for _, n in call.module_recv] == [960] and call.played == []
            assert not call.flush_flag and [e.subclass for e in call.events if e.subclass] == []
            # After its 50 ms window the module plays again.
            await wait_until(lambda: time.monotonic_ns() >= consumed_at + DISCARD_NS, "the window over")
            second = bytes(range(2, 242)) * 4 * 3
            writer.write(second)
            await writer.drain()
            assert (await next_event(ctl)).subclass == "socket_audio::playback_start"
            assert (await next_event(ctl)).headers["Playback-Stop-Reason"] == "complete"
            assert b"".join(f for _, f in call.played) == second and len(call.discarded) == 1
            await finish(call, closers, side, ctl)

        run(main)

    def test_exit_says_bye_and_the_channel_hangs_up(self) -> None:
        async def main() -> None:
            call, ctl, side, reader, closers = await started_call()
            assert parse(await ctl.ask(b"exit\n\n")).reply_text == "+OK bye"
            assert await ctl.recv() == disconnect(UUID)
            assert await ctl.reader.read() == b""
            assert await asyncio.wait_for(drain_mic_to_eof(reader), TIMEOUT)
            assert "CHANNEL_HANGUP" in [e.name for e in call.events]
            await finish(call, closers, side, ctl)

        run(main)

    def test_abort_resets_both_sockets_and_send_raw_writes_verbatim(self) -> None:
        async def main() -> None:
            call, ctl, side, reader, closers = await started_call()
            garbage = b"Content-Type: text/event-plain\nContent-Length: 999999999\n\n\x00\xff"
            await call.send_raw(garbage)
            assert await asyncio.wait_for(ctl.reader.readexactly(len(garbage)), TIMEOUT) == garbage
            closers[0].write(bytes(48000))
            await closers[0].drain()
            assert (await next_event(ctl)).subclass == "socket_audio::playback_start"
            call.abort()
            for stream in (ctl.reader, reader):
                try:
                    while await asyncio.wait_for(stream.read(65536), TIMEOUT):
                        pass
                    reset = False
                except ConnectionResetError:
                    reset = True
                assert reset
            await finish(call, closers, side, ctl)

        run(main)

    def test_client_body_over_16_mib_makes_freeswitch_hang_up_the_socket(self) -> None:
        async def main() -> None:
            call = SocketAudioCall(UUID)
            ctl, server = await outbound(call)
            await ctl.recv()
            await ctl.send(b"sendevent CUSTOM\nContent-Length: 999999999\n\n")
            assert await ctl.recv() == disconnect(UUID)  # read_packet refuses it: no reply
            assert await ctl.reader.read() == b""
            assert call.errors and call.commands[-1].name == "connect"
            ctl.writer.close()
            await call.aclose()
            server.close()

        run(main)

    def test_never_connect_audio_answers_ok_and_emits_the_events(self) -> None:
        async def main() -> None:
            call = SocketAudioCall(UUID, never_connect_audio=True)
            ctl, server = await outbound(call)
            await ctl.recv()
            await ctl.ask(b"myevents\n\n")
            side = await Sidecar().start()
            assert parse(await ctl.ask(sendmsg_socket_audio(side.port))).reply_text == "+OK"
            assert [(await next_event(ctl)).name for _ in range(2)] == ["CHANNEL_EXECUTE", "CHANNEL_EXECUTE_COMPLETE"]
            # The application ran to its end (a connect would have been made before it returned)
            # without connecting: only logged.
            assert call.audio_connected_ns is None and call.audio_sock is None
            assert not call.socket_audio_active and call.errors == [
                "socket_audio: never_connect_audio set, not connecting"
            ]
            assert not side.conn.done()
            ctl.writer.close()
            side.server.close()
            await call.aclose()
            server.close()

        run(main)


async def drain_mic_to_eof(reader: asyncio.StreamReader) -> bool:
    while await reader.read(65536):
        pass
    return True


async def finish(call: SocketAudioCall, closers: Any, side: Sidecar, ctl: Controller) -> None:
    writer, server = closers
    await call.hangup()
    for w in (writer, ctl.writer):
        w.close()
    for srv in (server, side.server):
        srv.close()
        await srv.wait_closed()
    await call.aclose()


# -- inbound Event Socket (§3.3, TV-ESL-1, TV-ESL-4) ------------------------------------


class TestInbound:
    def test_tv_esl_1_auth_api_and_bgapi(self) -> None:
        async def main() -> None:
            srv = await InboundEslServer().start()
            _SERVERS.append(srv.server)
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            ctl = Controller(reader, writer)
            assert await ctl.recv() == b"Content-Type: auth/request\n\n"
            assert await ctl.ask(b"auth ClueCon\n\n") == b"Content-Type: command/reply\nReply-Text: +OK accepted\n\n"
            answer = await ctl.ask(f"api uuid_break {UUID} all\n\n".encode())
            assert answer == b"Content-Type: api/response\nContent-Length: 4\n\n+OK\n"
            stream = parse(await ctl.ask(f"api uuid_audio_stream {UUID} stop\n\n".encode()))
            assert isinstance(stream, ApiResponse) and stream.body == "+OK Success\n"
            assert parse(await ctl.ask(b"api foo\n\n")).body == "-ERR foo Command not found!\n"
            assert parse(await ctl.ask(b"event plain BACKGROUND_JOB\n\n")).reply_text == (
                "+OK event listener enabled plain"
            )
            bg = await ctl.ask(f"bgapi uuid_audio_stream {UUID} stop\nJob-UUID: {JOB}\n\n".encode())
            assert bg == (f"Content-Type: command/reply\nReply-Text: +OK Job-UUID: {JOB}\nJob-UUID: {JOB}\n\n").encode()
            job = await next_event(ctl)
            assert job.name == "BACKGROUND_JOB" and job.body == "+OK Success\n"
            assert job.headers["Job-UUID"] == JOB and job.headers["Job-Command-Arg"] == f"{UUID} stop"
            assert [c.name for c in srv.commands] == ["auth", "api", "api", "api", "event", "bgapi"]

            bad_reader, bad_writer = await asyncio.open_connection("127.0.0.1", srv.port)
            bad = Controller(bad_reader, bad_writer)
            await bad.recv()
            assert isinstance(parse(await bad.ask(b"auth nope\n\n")), Reply)
            assert (
                await bad.recv() == b"Content-Type: text/disconnect-notice\nContent-Length: 67\n\n" + GOODBYE.encode()
            )
            assert await bad_reader.read() == b""
            writer.close()
            bad_writer.close()
            await srv.close()

        run(main)

    def test_attached_call_is_flushed_and_heard_on_an_inbound_connection(self) -> None:
        async def main() -> None:
            srv = await InboundEslServer().start()
            _SERVERS.append(srv.server)
            call, ctl, side, reader, closers = await started_call()
            srv.attach(call)
            asyncio.create_task(drain_mic(reader, bytearray()))
            r, w = await asyncio.open_connection("127.0.0.1", srv.port)
            inbound = Controller(r, w)
            await inbound.recv()
            await inbound.ask(b"auth ClueCon\n\n")
            assert parse(await inbound.ask(f"filter Unique-ID {UUID}\n\n".encode())).reply_text == (
                f"+OK filter added. [Unique-ID]=[{UUID}]"
            )
            await inbound.ask(b"event json CUSTOM socket_audio::playback_start socket_audio::playback_stop\n\n")
            # 5 s: still playing when the flush comes, however slowly this test gets there.
            closers[0].write(bytes(960 * 250))
            await closers[0].drain()
            assert (await next_event(inbound)).subclass == "socket_audio::playback_start"
            assert (await next_event(ctl)).subclass == "socket_audio::playback_start"
            flush = f"api uuid_socket_audio_flush {UUID}\n\n".encode()
            assert await inbound.ask(flush) == b"Content-Type: api/response\nContent-Length: 4\n\n+OK\n"
            stop = await next_event(inbound)
            assert stop.headers["Playback-Stop-Reason"] == "flush" and stop.unique_id == UUID
            [(_, consumer, _, was_playing)] = call.flushes
            assert consumer == "playback_loop" and was_playing
            w.close()
            await finish(call, closers, side, ctl)
            await srv.close()

        run(main)
