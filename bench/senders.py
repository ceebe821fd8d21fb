"""Emulated FreeSWITCH senders: one class per wire protocol, all paced in real time.

A sender streams one :class:`~bench.audio.CallScript` the way its module would and
fills a :class:`CallRecord` with what it sent (the monotonic time of every message)
and what came back (events or replies, with the time they arrived). It does not
judge anything: :mod:`bench.measure` turns records into latencies.

=============  ============================================================  ==========
protocol       on the wire                                                   replies
=============  ============================================================  ==========
amigniter      mod_audio_stream: metadata text frame, then one binary frame  farm events
               of 20 ms (320 B at 8 kHz, 640 B at 16 kHz) per ptime          (ZeroMQ)
sptmru         the sptmru fork: rate in the URL, bursts of 40 ms (or 80 ms)  farm events
               at the codec rate (PROTOCOLS.md §1.6, §1.11)                  (ZeroMQ)
vosk           vosk-server's WebSocket protocol: ``{"config": …}``, binary   per message
               chunks, ``{"eof" : 1}``; a reply to every message             (client-side)
socket_audio   mod_socket_audio: an Event Socket peer (bench/fs_peer.py) the  farm events
               farm drives, 640 B of 16 kHz per 20 ms on its audio socket;   (ZeroMQ),
               prompts played through the farm's command socket              flushes
=============  ============================================================  ==========

Adding a protocol is one subclass of :class:`Sender` with ``run()`` and an entry in
:data:`SENDERS`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from bench.audio import PROMPT_RATE, CallScript, prompt_pcm, resample_script


__all__ = [
    "DIALER_EVENTS",
    "Observation",
    "CallRecord",
    "SenderOptions",
    "Sender",
    "EventRouter",
    "AmigniterSender",
    "SptmruSender",
    "VoskSender",
    "SocketAudioSender",
    "prompt_schedule",
    "SENDERS",
    "PROTOCOLS",
]

# vosk-server compares these two messages as exact strings (asr_server.py
# ``process_chunk``), spacing included; any other spelling is fed to Vosk as audio.
VOSK_EOF = '{"eof" : 1}'
VOSK_RESET = '{"reset" : 1}'
DIALER_EVENTS = frozenset(("amd", "beep", "tone", "intent"))  # kept in CallRecord.dialer


@dataclass
class Observation:
    """Something the bench received about a call, stamped when it arrived."""

    kind: str  # speech_start | speech_end | partial | final | final_empty | barge_in | overrun | error
    got_ns: int
    offset_ms: int | None = None  # farm events: the audio offset they refer to
    text: str = ""
    reason: str = ""
    stamps: dict[str, int] = field(default_factory=dict)  # farm events: stage -> monotonic ns
    data: dict[str, Any] = field(default_factory=dict)  # dialer events (CallRecord.dialer): their members


@dataclass
class CallRecord:
    """What one emulated call sent and received; filled by a :class:`Sender`."""

    script: CallScript
    protocol: str
    chunk_ms: int = 20
    send_ns: list[int] = field(default_factory=list)  # each audio message, when it left
    late_ms_max: float = 0.0  # worst pacing lateness of this bench (not the farm's)
    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int | None = None  # farm: frames the ring saw; vosk: replies
    bytes_received: int | None = None
    overrun_bytes: int = 0
    observations: list[Observation] = field(default_factory=list)
    reply_lag_ms: list[float] = field(default_factory=list)  # vosk: message sent -> its reply
    end_ns: int = 0  # last audio message sent
    done_ns: int = 0  # call_end (farm) or the reply to eof (vosk) received; 0: never
    errors: list[str] = field(default_factory=list)
    refused: str = ""  # the server refused the call (HTTP 503 before the upgrade): its reason
    # socket_audio: prompts played over the caller (barge-in), as the peer saw them
    prompted_ms: list[int] = field(default_factory=list)  # start_ms of the utterances a prompt was under
    flush_ns: list[int] = field(default_factory=list)  # each uuid_socket_audio_flush, when it fully arrived
    flush_idle: int = 0  # flushes that came with nothing playing (they would eat the next prompt's start)
    prompt_after_flush: int = 0  # non-silent prompt frames played > 25 ms after a flush was consumed
    playback_violations: list[str] = field(default_factory=list)
    # the farm's dialer events (workers/analysis.py: amd, beep, tone, intent) and call_end's
    # stats; apart from ``observations``, whose stamps are the speech pipeline's
    dialer: list[Observation] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def call_id(self) -> str:
        return self.script.call_id

    def sent_at(self, audio_ms: int) -> int:
        """Monotonic ns when the message carrying audio offset ``audio_ms`` left the bench."""
        i = max(0, min(len(self.send_ns) - 1, audio_ms // self.chunk_ms))
        return self.send_ns[i] if self.send_ns else 0


@dataclass(frozen=True)
class SenderOptions:
    target: str  # ws:// base URL of the farm's mod_audio_stream site, or a vosk-server URL
    events: str = "tcp://127.0.0.1:5556"  # the farm's event endpoint (farm protocols)
    jitter_ms: float = 0.0  # each message leaves up to this late (the schedule does not drift)
    burst_ms: int = 40  # sptmru message size
    vosk_chunk_ms: int = 20
    vosk_reset: bool = False  # send reset at each utterance end, as a client with a perfect VAD would
    tail_timeout_s: float = 30.0  # after the last audio: wait this long for call_end / the eof reply
    esl: str = ""  # socket_audio: host:port of the farm's outbound Event Socket server
    commands: str = ""  # socket_audio: the farm's command endpoint (prompts)
    prompt_ms: int = 3000  # socket_audio: length of each prompt played before a caller utterance
    prompt_lead_ms: int = 1000  # socket_audio: the prompt starts this long before the utterance


class Sender(ABC):
    """Streams calls of one protocol. Subclasses implement :meth:`run`."""

    protocol: ClassVar[str]
    needs_events: ClassVar[bool] = False  # True: the runner must give it an EventRouter

    def __init__(self, options: SenderOptions, router: EventRouter | None = None) -> None:
        self.options = options
        self.router = router

    @abstractmethod
    async def run(self, record: CallRecord) -> None:
        """Stream ``record.script`` in real time; fill ``record``. Never raises for a failed call."""

    async def pace(
        self,
        record: CallRecord,
        send: Callable[[bytes], Awaitable[None]],
        after: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        """Send the script in ``record.chunk_ms`` messages on a fixed schedule (plus jitter)."""
        pcm = record.script.pcm
        size = record.script.rate * record.chunk_ms // 1000 * 2
        jitter = random.Random(record.call_id)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i, start in enumerate(range(0, len(pcm), size)):
            due = t0 + i * record.chunk_ms / 1000
            if self.options.jitter_ms:
                due += jitter.uniform(0, self.options.jitter_ms) / 1000
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                record.late_ms_max = max(record.late_ms_max, -delay * 1000)
            chunk = pcm[start : start + size]
            record.send_ns.append(time.monotonic_ns())
            await send(chunk)
            record.messages_sent += 1
            record.bytes_sent += len(chunk)
            if after is not None:
                await after(i)
        record.end_ns = time.monotonic_ns()


async def _drain(ws: Any) -> None:
    # The farm also sends its events back on the call's WebSocket (as FreeSWITCH
    # would get them); the bench reads them from ZeroMQ, so it only drains these.
    with contextlib.suppress(ConnectionClosed):
        async for _ in ws:
            pass


class EventRouter:
    """One ZeroMQ subscription for every call of a run, routing events to their records.

    One socket instead of one per call: a few hundred calls would otherwise mean as
    many ZeroMQ contexts and I/O threads in the bench, on the machine being measured.
    """

    def __init__(self, endpoint: str) -> None:
        from farm.client import Subscription

        self.sub = Subscription(endpoint, None)
        self.records: dict[str, CallRecord] = {}
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EventRouter:
        await self.sub.__aenter__()
        self.task = asyncio.create_task(self._route())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task  # off the socket before it closes
        self.sub.close()

    async def _route(self) -> None:
        while True:
            event = await self.sub.next()
            got = time.monotonic_ns()
            record = self.records.get(event.call_id)
            if record is None:
                continue  # another client's call
            if event.type == "call_end":
                record.messages_received = int(event.get("frames", 0))
                record.bytes_received = int(event.get("duration_ms", 0)) * record.script.rate * 2 // 1000
                if record.protocol == "socket_audio":
                    # A TCP byte stream: the farm's reads need not match the peer's writes
                    # (under load they coalesce), so count what arrived in whole messages.
                    record.messages_received = record.bytes_received // (record.script.rate * record.chunk_ms // 500)
                record.overrun_bytes = max(record.overrun_bytes, int(event.get("overrun_bytes", 0)))
                record.stats = dict(event.get("stats") or {})
                record.done_ns = got
                record.done.set()
                continue
            if event.type in DIALER_EVENTS:
                obs = Observation(event.type, got, event.offset_ms, stamps=dict(event.stamps), data=dict(event.data))
                record.dialer.append(obs)
                continue
            if event.type == "call_start":
                continue
            obs = Observation(
                event.type, got, event.offset_ms, str(event.get("text", "")), str(event.get("reason", ""))
            )
            obs.stamps = dict(event.stamps)
            if event.type == "overrun":
                record.overrun_bytes = max(record.overrun_bytes, int(event.get("total_bytes", 0)))
            elif event.type == "error":
                record.errors.append(str(event.get("reason")))
            record.observations.append(obs)


class _AudioStreamSender(Sender):
    """mod_audio_stream over WebSocket; latencies from the farm's events (ZeroMQ)."""

    needs_events = True

    def url(self, script: CallScript) -> str:
        return f"{self.options.target.rstrip('/')}/{script.call_id}"

    def metadata(self, script: CallScript) -> str:
        return json.dumps({"call_id": script.call_id, "rate": script.rate, "channels": 1, "bench": True})

    async def run(self, record: CallRecord) -> None:
        assert self.router is not None, "farm protocols need an EventRouter"
        self.router.records[record.call_id] = record
        try:
            async with connect(
                self.url(record.script), max_size=None, open_timeout=10, ping_interval=None, compression=None
            ) as ws:
                reader = asyncio.create_task(_drain(ws))
                await ws.send(self.metadata(record.script))
                await self.pace(record, ws.send)
                await ws.close(1000, "Normal closure")
                reader.cancel()
        except InvalidStatus as exc:
            if exc.response.status_code != 503:
                record.errors.append(f"stream: {type(exc).__name__}: {exc}")
                return
            record.refused = exc.response.body.decode(errors="replace").strip() or "503"
            return
        except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError) as exc:
            record.errors.append(f"stream: {type(exc).__name__}: {exc}")
            return
        try:
            await asyncio.wait_for(record.done.wait(), self.options.tail_timeout_s)
        except TimeoutError:
            record.errors.append(f"no call_end {self.options.tail_timeout_s:.0f} s after the last frame")


class AmigniterSender(_AudioStreamSender):
    """amigniter/mod_audio_stream: metadata first, 20 ms frames, rate in the metadata."""

    protocol = "amigniter"


class SptmruSender(_AudioStreamSender):
    """sptmru fork: no resampling, rate in the URL, 40-80 ms bursts at the codec rate."""

    protocol = "sptmru"

    def url(self, script: CallScript) -> str:
        return f"{super().url(script)}?rate={script.rate}"


class VoskSender(Sender):
    """vosk-server's protocol (its websocket/asr_server.py and test.py), timed client-side.

    vosk-server answers every message in order (a ``partial``, or ``text`` + ``result``
    when Vosk's endpointer fires), so replies pair with messages one to one: that
    gives each message's reply lag, whether the server keeps real time.
    """

    protocol = "vosk"

    async def run(self, record: CallRecord) -> None:
        record.chunk_ms = self.options.vosk_chunk_ms
        # (send ns, is audio) of the messages not yet answered, in order
        pending: collections.deque[tuple[int, bool]] = collections.deque()
        eof_sent, eof_answered = asyncio.Event(), asyncio.Event()
        record.messages_received = 0
        resets = (
            {(u.end_ms - 1) // record.chunk_ms for u in record.script.utterances} if self.options.vosk_reset else set()
        )

        async def read(ws: Any) -> None:
            try:
                await _replies(ws)
            except ConnectionClosed as exc:
                if not eof_answered.is_set():
                    record.errors.append(f"vosk server closed the connection: {exc}")
            if eof_sent.is_set():
                eof_answered.set()  # vosk-server closes right after its reply to eof

        async def _replies(ws: Any) -> None:
            async for message in ws:
                got = time.monotonic_ns()
                if pending:
                    sent, audio = pending.popleft()
                    record.reply_lag_ms.append((got - sent) / 1e6)
                    record.messages_received = (record.messages_received or 0) + audio
                try:
                    reply = json.loads(message)
                except ValueError:
                    record.errors.append(f"reply is not JSON: {str(message)[:60]!r}")
                    continue
                if "partial" in reply:
                    if reply["partial"]:
                        record.observations.append(Observation("partial", got, text=reply["partial"]))
                elif "text" in reply:
                    kind = "final" if reply["text"] else "final_empty"
                    record.observations.append(Observation(kind, got, text=reply["text"]))
                if not pending and eof_sent.is_set():
                    eof_answered.set()

        try:
            async with connect(self.options.target, max_size=None, open_timeout=10, ping_interval=None) as ws:
                reader = asyncio.create_task(read(ws))
                await ws.send(json.dumps({"config": {"sample_rate": record.script.rate}}))

                async def send(chunk: bytes) -> None:
                    pending.append((time.monotonic_ns(), True))
                    await ws.send(chunk)

                async def after(i: int) -> None:
                    if i in resets:
                        pending.append((time.monotonic_ns(), False))
                        await ws.send(VOSK_RESET)

                await self.pace(record, send, after)
                pending.append((time.monotonic_ns(), False))
                eof_sent.set()
                await ws.send(VOSK_EOF)
                try:
                    await asyncio.wait_for(eof_answered.wait(), self.options.tail_timeout_s)
                    record.done_ns = time.monotonic_ns()
                except TimeoutError:
                    record.errors.append(f"no reply to eof {self.options.tail_timeout_s:.0f} s after the last chunk")
                await ws.close()
                reader.cancel()
        except InvalidStatus as exc:
            if exc.response.status_code == 503:
                record.refused = exc.response.body.decode(errors="replace").strip() or "503"
            else:
                record.errors.append(f"stream: {type(exc).__name__}: {exc}")
        except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError) as exc:
            record.errors.append(f"stream: {type(exc).__name__}: {exc}")


# socket_audio: a prompt starts this long after the previous utterance at the earliest, so
# the farm's VAD (300 ms hangover, ~100 ms of webrtcvad stretch) has ended that one first.
_PROMPT_AFTER_SPEECH_MS = 600
_PROMPT_MIN_LEAD_MS = 200  # less prompt than this before the caller speaks is not a barge-in to measure
_HANGUP_AFTER_S = 0.3  # the caller's line stays up (silence) this long after the script
_FLUSH_SETTLE_NS = 25_000_000  # after a flush is consumed, one frame may still be on its way out


def prompt_schedule(script: CallScript, prompt_ms: int, lead_ms: int) -> list[tuple[int, int]]:
    """``(at_ms, utterance start_ms)``: when to start a prompt so the utterance interrupts it.

    Like a dialer: the prompt plays in the pause, the caller speaks over its last part.
    Only measured utterances get one, and only when the pause leaves room for it.
    """
    out: list[tuple[int, int]] = []
    prev_end = -(10**9)
    for u in script.utterances:
        at = max(u.start_ms - lead_ms, prev_end + _PROMPT_AFTER_SPEECH_MS)
        lead = u.start_ms - at
        if u.complete and at >= 0 and _PROMPT_MIN_LEAD_MS <= lead <= prompt_ms - _PROMPT_MIN_LEAD_MS:
            out.append((at, u.start_ms))
        prev_end = u.end_ms
    return out


class SocketAudioSender(Sender):
    """mod_socket_audio, as FreeSWITCH runs it for a dialer's call (bench/fs_peer.py).

    The peer connects to the farm's outbound Event Socket server, lets the farm run
    ``socket_audio``, then streams the call (resampled to 16 kHz: the module's only mic
    rate) on its 20 ms grid. Before each measured utterance a prompt is played through
    the farm's command socket so the caller speaks over it: the farm must cut it with
    ``uuid_socket_audio_flush``. The peer stamps each command when it fully arrived,
    which gives the barge-in latency from outside the farm. Ends with a hang-up.
    """

    protocol = "socket_audio"
    needs_events = True

    async def run(self, record: CallRecord) -> None:
        from bench.fs_peer import SocketAudioCall
        from bench.fs_peer_socket_audio import INPUT_RATE
        from farm.client import CommandError, Commands

        assert self.router is not None, "farm protocols need an EventRouter"
        record.script = resample_script(record.script, INPUT_RATE)
        record.chunk_ms = 20
        host, _, port = self.options.esl.rpartition(":")
        peer = SocketAudioCall(record.call_id)
        self.router.records[record.call_id] = record
        plays: list[int] = []  # when each prompt was asked for
        try:
            await peer.connect(host or "127.0.0.1", int(port))
            await asyncio.wait_for(peer.audio_connected.wait(), 10)
            async with Commands(self.options.commands) as commands:
                streaming = asyncio.create_task(peer.stream(record.script.pcm))
                while not peer.speech_sent and not streaming.done():
                    await asyncio.sleep(0.002)
                # The mic loop keeps a fixed 20 ms grid: audio offset -> time is linear from here.
                t0 = peer.speech_sent[0][0] if peer.speech_sent else time.monotonic_ns()
                opts = self.options
                prompt = prompt_pcm(opts.prompt_ms)
                for at_ms, start_ms in prompt_schedule(record.script, opts.prompt_ms, opts.prompt_lead_ms):
                    delay = (t0 + at_ms * 1_000_000 - time.monotonic_ns()) / 1e9
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if streaming.done():
                        break
                    plays.append(time.monotonic_ns())
                    try:
                        await commands.play(record.call_id, prompt, PROMPT_RATE, play_id=f"prompt-{start_ms}")
                    except CommandError as exc:
                        record.errors.append(f"play: {exc}")
                        continue
                    record.prompted_ms.append(start_ms)
                writes = await streaming
            record.send_ns = [t for t, _ in writes]
            record.messages_sent = len(writes)
            record.bytes_sent = sum(n for _, n in writes)
            record.end_ns = record.send_ns[-1] if writes else time.monotonic_ns()
            record.late_ms_max = max(
                ((t - t0) / 1e6 - i * record.chunk_ms for i, t in enumerate(record.send_ns)), default=0.0
            )
            # Hang up once the farm has read the script: closing the audio socket with playback
            # unread resets it, and the farm would lose the frames still in its buffer.
            await asyncio.sleep(_HANGUP_AFTER_S)
            record.end_ns = time.monotonic_ns()  # the line's last (silent) audio: the backlog counts from here
            await asyncio.wait_for(peer.hangup(), self.options.tail_timeout_s)
        except (OSError, ConnectionError, TimeoutError, CommandError, ValueError) as exc:
            record.errors.append(f"call: {type(exc).__name__}: {exc}")
            return
        finally:
            _judge_playback(record, peer, plays)
            await peer.aclose()
        try:
            await asyncio.wait_for(record.done.wait(), self.options.tail_timeout_s)
        except TimeoutError:
            record.errors.append(f"no call_end {self.options.tail_timeout_s:.0f} s after the hang-up")


def _judge_playback(record: CallRecord, peer: Any, plays: list[int]) -> None:
    """What the peer saw of the farm's flushes and playback (bench/fs_peer.py's records)."""
    record.flush_ns = [
        c.t_ns for c in peer.commands if c.name == "api" and c.args.startswith("uuid_socket_audio_flush")
    ]
    # A flush consumed with nothing playing, or never consumed, sat pending: it eats the
    # start of the next prompt (PROTOCOLS.md §2.5).
    record.flush_idle = sum(1 for f in peer.flushes if not f[3]) + max(0, len(record.flush_ns) - len(peer.flushes))
    for consumed, *_ in peer.flushes:
        next_play = min((p for p in plays if p > consumed), default=1 << 62)
        record.prompt_after_flush += sum(
            1
            for t, frame in peer.played
            if consumed + _FLUSH_SETTLE_NS < t < next_play and frame.count(0) != len(frame)
        )
    record.playback_violations = list(peer.violations)


SENDERS: dict[str, type[Sender]] = {
    cls.protocol: cls for cls in (AmigniterSender, SptmruSender, VoskSender, SocketAudioSender)
}
PROTOCOLS = tuple(SENDERS)


def chunk_ms_for(protocol: str, options: SenderOptions) -> int:
    """The size of one audio message of ``protocol``, in ms."""
    return {"sptmru": options.burst_ms, "vosk": options.vosk_chunk_ms}.get(protocol, 20)
