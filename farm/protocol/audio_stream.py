"""mod_audio_stream conventions on top of WebSocket (PROTOCOLS.md §1): sans-I/O.

The WebSocket itself is the ``websockets`` library's job. This module decides what a
connection *means*: which call it is, at which rate and channel count its PCM comes,
what its metadata says, and how arbitrary binary chunks become whole samples. It
serves the three generations on the wire (§1.11): amigniter libwsc (metadata may come
after the first audio), amigniter IXWebSocket and sptmru (reconnects re-send the
metadata; sptmru may send garbage metadata and never resamples, so the rate must be
told by the URL or metadata, else the configured default applies).

:class:`AudioStreamSession` is one connection: the I/O layer feeds it what the
WebSocket received and when its deadline passed, and performs the actions it
returns. The functions below it are its parsing steps, usable on their own.
"""

from __future__ import annotations

import enum
import json
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from farm.protocol.exceptions import (
    CLOSE_POLICY,
    CLOSE_UNSUPPORTED,
    AudioStreamError,
    LocalProtocolError,
)
from farm.protocol.pcm import SUPPORTED_RATES, SampleCarry


__all__ = [
    "AudioStreamSession",
    "State",
    "CONNECTING",
    "WAITING",
    "HOLDING",
    "STREAMING",
    "CLOSED",
    "Action",
    "OpenCall",
    "WriteAudio",
    "PublishError",
    "Note",
    "Close",
    "StreamParams",
    "AudioStreamError",
    "MAX_HELD_BYTES",
    "is_background",
    "call_id_from_path",
    "params_from_path",
    "parse_metadata",
    "resolve",
    "CLOSE_UNSUPPORTED",
    "CLOSE_POLICY",
]

_RATE_KEYS = ("rate", "sample_rate", "sampleRate", "samplerate")
_CHANNEL_KEYS = ("channels", "nchannels")
_ID_KEYS = ("call_id", "callId", "uuid", "call_uuid")
# What a call may ask for in the URL query as in its metadata (workers/analysis.py).
_OPTION_KEYS = ("amd", "tones", "intents", "source")
_K_RATES = {"8k": 8000, "16k": 16000}
# Audio held for late metadata, at most. libwsc sends what it queued while connecting
# (2 s at most, §1.6: 384 KB at 48 kHz stereo) before the metadata; more than that is
# no real stream, and the call opens on the URL alone instead of buffering it.
MAX_HELD_BYTES = 1 << 20


@dataclass(frozen=True)
class StreamParams:
    """What is known about a stream: from the URL first, then the metadata."""

    call_id: str | None = None
    rate: int | None = None
    channels: int | None = None
    transcribe: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _first(values: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        if k in values and values[k] not in (None, ""):
            return values[k]
    return None


def _rate(raw: Any) -> int:
    text = str(raw).strip().lower()
    try:
        # "16k" and "8k" as uuid_audio_stream spells them (§1.2); it reads any other
        # "<n>k" as the integer n, so "24k" is 24 there and is refused here too.
        rate = _K_RATES[text] if text in _K_RATES else int(text[:-1]) if text.endswith("k") else int(float(text))
    except (ValueError, OverflowError):  # OverflowError: "inf", 1e400
        raise AudioStreamError(f"sample rate {str(raw)[:32]!r} is not a number") from None
    if rate not in SUPPORTED_RATES:
        allowed = ", ".join(str(r) for r in SUPPORTED_RATES)
        raise AudioStreamError(f"unsupported sample rate {rate} (supported: {allowed})")
    return rate


def _channels(raw: Any) -> int:
    text = str(raw).strip().lower()
    named = {"mono": 1, "mixed": 1, "stereo": 2}
    if text in named:
        return named[text]
    try:
        channels = int(text)
    except ValueError:
        raise AudioStreamError(f"channel count {str(raw)[:32]!r} is not a number") from None
    if channels not in (1, 2):
        raise AudioStreamError(f"unsupported channel count {channels} (1 or 2)")
    return channels


def _transcribe(raw: Any) -> str:
    text = str(raw).strip().lower()
    if text not in ("caller", "both"):
        raise AudioStreamError(f"transcribe must be 'caller' or 'both', not {text[:32]!r}")
    return text


def _params(values: dict[str, Any], call_id: str | None, metadata: dict[str, Any]) -> StreamParams:
    rate = _first(values, _RATE_KEYS)
    channels = _first(values, _CHANNEL_KEYS)
    if channels is None and "mix" in values:
        channels = values["mix"]
    transcribe = values.get("transcribe")
    return StreamParams(
        call_id=call_id,
        rate=_rate(rate) if rate is not None else None,
        channels=_channels(channels) if channels is not None else None,
        transcribe=_transcribe(transcribe) if transcribe is not None else None,
        metadata=metadata,
    )


def is_background(metadata: object) -> bool:
    """A recorded file (``"source": "file"`` in the metadata or URL query, or the channel
    variable ``farm_source=file``), not a live caller: served after every live call
    (workers/scheduler.py) and written into its ring no faster than the worker reads it."""
    if not isinstance(metadata, dict):
        return False
    source = metadata.get("source", metadata.get("farm_source"))
    return isinstance(source, str) and source.strip().lower() == "file"


def params_from_path(path: str) -> StreamParams:
    """Read the request target: the call id is the last path segment or ``call_id``.

    Raises :class:`AudioStreamError` for a rate or channel count farm cannot serve.
    """
    query = _query(path)
    return _params(query, call_id_from_path(path), {k: query[k] for k in _OPTION_KEYS if k in query})


def call_id_from_path(path: str) -> str | None:
    """The call id the request target names, if any, even where its parameters are bad."""
    segments = [unquote(s) for s in urlsplit(path).path.split("/") if s]
    return _first(_query(path), _ID_KEYS) or (segments[-1] if segments else None)


def _query(path: str) -> dict[str, Any]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(path).query).items()}


def parse_metadata(text: str) -> tuple[StreamParams, str | None]:
    """Parse a text frame as metadata: ``(params, error)``; garbage is not fatal.

    sptmru builds may send freed memory as metadata (§1.7, amigniter#53): the call
    goes on with what the URL said and the error is reported, not the stream closed.
    """
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        # Some messages end in "at" already ("Invalid control character at").
        return StreamParams(), f"metadata is not JSON ({exc.msg.removesuffix(' at')} at char {exc.pos}), ignored"
    except (ValueError, RecursionError) as exc:  # a 5000-digit number, "[[[[…" nested too deep
        return StreamParams(), f"metadata is not usable JSON ({str(exc)[:80]}), ignored"
    if not isinstance(obj, dict):
        return StreamParams(metadata={"value": obj}), None
    call_id = _first(obj, _ID_KEYS)
    return _params(obj, str(call_id) if call_id is not None else None, obj), None


def resolve(url: StreamParams, meta: StreamParams, *, default_rate: int, default_channels: int) -> StreamParams:
    """The stream's final parameters: URL first, then metadata, then defaults.

    The URL wins because it is what the dialer put in ``uuid_audio_stream start``;
    metadata is optional, late or corrupted in some generations.
    """
    return StreamParams(
        call_id=url.call_id or meta.call_id or str(uuid.uuid4()),
        rate=url.rate or meta.rate or default_rate,
        channels=url.channels or meta.channels or default_channels,
        transcribe=url.transcribe or meta.transcribe,
        metadata={**meta.metadata, **url.metadata},  # the URL's options win, as its rate does
    )


# -- one connection --------------------------------------------------------------------


class State(enum.IntEnum):
    """Where a connection is; transitions in :class:`AudioStreamSession`'s header."""

    CONNECTING = 0  # the handshake is not done yet
    WAITING = 1  # upgraded, nothing received yet
    HOLDING = 2  # audio came before any metadata (libwsc, §1.7): held a moment
    STREAMING = 3  # the call is open: audio goes into it
    CLOSED = 4  # a Close was asked for: nothing more to do


CONNECTING = State.CONNECTING
WAITING = State.WAITING
HOLDING = State.HOLDING
STREAMING = State.STREAMING
CLOSED = State.CLOSED


@dataclass(frozen=True, slots=True)
class OpenCall:
    """Open the call with these parameters, before performing the next action."""

    call_id: str
    rate: int
    channels: int
    transcribe: str | None
    metadata: dict[str, Any]
    metadata_seen: bool  # False: opened on the URL alone when the metadata wait ran out


# Not frozen, unlike the other actions: one is made per audio message, and a frozen
# dataclass is three times slower to build.
@dataclass(slots=True)
class WriteAudio:
    """Write ``pcm`` (whole sample frames, maybe none) into the call."""

    pcm: bytes
    received: int  # when the message that completed these samples arrived
    size: int  # bytes in that message, carried ones not counted


@dataclass(frozen=True, slots=True)
class PublishError:
    """Tell the call's subscribers what went wrong; the call goes on."""

    reason: str


@dataclass(frozen=True, slots=True)
class Note:
    """Nothing to do but say so in the log."""

    message: str


@dataclass(frozen=True, slots=True)
class Close:
    """Close the WebSocket with ``code`` and stop reading; ``reason`` is for logs and events.

    ``end`` is why the call ends, ``call_end``'s reason (``farm.protocol.events.END_REASONS``):
    ``idle`` (nothing came in time), ``refused`` (the call was never opened: a URL or
    metadata farm cannot serve), ``error`` (the open call's metadata broke it).
    """

    code: int
    reason: str
    end: str

    @property
    def wire_reason(self) -> str:
        """``reason`` cut to fit the Close frame: 123 bytes of UTF-8 (RFC 6455 §5.5)."""
        # The client's own text in a reason may be multi-byte (a Hangul rate).
        return self.reason[:120].encode()[:123].decode(errors="ignore")


Action = OpenCall | WriteAudio | PublishError | Note | Close


class AudioStreamSession:
    """One mod_audio_stream connection, from the upgrade to the Close (PROTOCOLS.md §1.7, §1.10).

    Call :meth:`receive_open` once the WebSocket handshake is done, then
    :meth:`receive_text` or :meth:`receive_binary` for each message, and
    :meth:`timeout` once :meth:`next_deadline` has passed. Each returns the actions
    to perform, in order; after a :class:`Close` the session is done and the I/O
    layer stops reading. Times are ``time.monotonic_ns()`` values.

    Everything that changes a connection's state lives in this class::

        CONNECTING --upgrade--> WAITING  (a URL farm cannot serve: CLOSED)
        WAITING    --text--> STREAMING   metadata, even garbage, opens the call
        WAITING    --audio-> HOLDING     libwsc may send audio before the metadata
        HOLDING    --text--> STREAMING   the held audio is written after the open
        HOLDING    --metadata_wait_ms after the upgrade--> STREAMING, on the URL alone
        HOLDING    --MAX_HELD_BYTES of audio--> STREAMING, on the URL alone
        WAITING    --first_message_timeout--> CLOSED (1008, the call ends idle)
        STREAMING  --idle_timeout since the open or the last audio--> CLOSED (1008, idle)
        any        --a rate or channel count farm cannot serve--> CLOSED (1003, refused
                     before the call opened, an error after)

    Metadata that comes once the call is open (IXWebSocket re-sends it on every
    reconnect, dialers send text with ``send_text``) changes nothing: the rate is fixed.
    Nor does it keep the call alive: a call that stalls holds a slot of
    ``--max-connections``, so only audio moves the idle deadline.
    """

    def __init__(
        self,
        *,
        default_rate: int,
        default_channels: int,
        metadata_wait_ms: int,
        first_message_timeout: float,
        idle_timeout: float,
    ) -> None:
        self.default_rate = default_rate
        self.default_channels = default_channels
        self.first_message_timeout = first_message_timeout
        self.idle_timeout = idle_timeout
        self._metadata_wait_ns = metadata_wait_ms * 1_000_000
        self._first_message_ns = int(first_message_timeout * 1e9)
        self._idle_ns = int(idle_timeout * 1e9)
        self.state = CONNECTING
        self.url = StreamParams()
        self._meta_call_id: str | None = None
        self._upgraded_at = 0
        self._deadline: int | None = None
        self._held: list[tuple[bytes, int]] = []  # audio that came before the metadata
        self._held_bytes = 0
        self._carry: SampleCarry | None = None

    @property
    def call_id(self) -> str | None:
        """The call id the peer named, in the URL (even one farm refused) or else in the
        metadata; None while it named none (the opened call's id is then farm's own)."""
        return self.url.call_id or self._meta_call_id

    def next_deadline(self) -> int | None:
        """When :meth:`timeout` is due (``time.monotonic_ns()``), or None: never."""
        return self._deadline

    def receive_open(self, path: str, now: int) -> list[Action]:
        """The WebSocket upgrade of request target ``path`` is done: call once, first."""
        if self.state is not CONNECTING:
            raise LocalProtocolError(f"receive_open in state {self.state.name}")
        try:
            self.url = params_from_path(path)
        except AudioStreamError as exc:
            self.url = StreamParams(call_id=call_id_from_path(path))  # its call ends, refused
            return self._fail(exc)
        self.state = WAITING
        self._upgraded_at = now
        self._deadline = now + self._first_message_ns
        return []

    def receive_text(self, text: str, now: int) -> list[Action]:
        """A text message arrived: metadata (§1.7) until the call is open, noted after."""
        self._check_open("receive_text")
        if self.state is CLOSED:
            return []
        try:
            meta, error = parse_metadata(text)
        except AudioStreamError as exc:
            return self._fail(exc)
        if self.state is STREAMING:
            if error:
                return [PublishError(error)]
            return [Note(f"metadata again, {len(text)} bytes; kept the stream's parameters")]
        return self._open(meta, True, error, now)

    def receive_binary(self, data: bytes, now: int) -> list[Action]:
        """A binary message arrived: a chunk of PCM of any length (§1.7)."""
        if self.state is STREAMING:  # first: this is every audio message
            self._deadline = now + self._idle_ns
            return [self._write(data, now)]
        self._check_open("receive_binary")
        if self.state is CLOSED:
            return []
        self._held.append((data, now))
        self._held_bytes += len(data)
        self.state = HOLDING
        self._deadline = self._upgraded_at + self._metadata_wait_ns
        # The wait is over (its timer may not have run yet), or the peer sends far more
        # than a real stream could in the wait: stop holding it in memory.
        if now >= self._deadline or self._held_bytes > MAX_HELD_BYTES:
            return self._open(StreamParams(), False, None, now)
        return []

    def timeout(self, now: int) -> list[Action]:
        """The deadline may have passed: open on the URL alone, or close an idle connection.

        Early calls (a timer that fired a little before the deadline) do nothing.
        """
        if self._deadline is None or now < self._deadline:
            return []
        if self.state is HOLDING:
            return self._open(StreamParams(), False, None, now)
        if self.state is WAITING:
            reason = f"no message in {self.first_message_timeout:g} s"
        else:
            reason = f"no audio in {self.idle_timeout:g} s"
        return self._fail(AudioStreamError(reason, CLOSE_POLICY), "idle")

    # -- transitions ---------------------------------------------------------------------

    def _check_open(self, method: str) -> None:
        if self.state is CONNECTING:
            raise LocalProtocolError(f"{method} before receive_open")

    def _open(self, meta: StreamParams, metadata_seen: bool, error: str | None, now: int) -> list[Action]:
        p = resolve(self.url, meta, default_rate=self.default_rate, default_channels=self.default_channels)
        self._meta_call_id = meta.call_id
        assert p.call_id is not None and p.rate is not None and p.channels is not None
        self.state = STREAMING
        self._deadline = now + self._idle_ns
        self._carry = SampleCarry(2 * p.channels)
        actions: list[Action] = [OpenCall(p.call_id, p.rate, p.channels, p.transcribe, p.metadata, metadata_seen)]
        if error:
            actions.append(PublishError(error))
        held, self._held, self._held_bytes = self._held, [], 0
        actions += [self._write(data, received) for data, received in held]
        return actions

    def _write(self, data: bytes, received: int) -> WriteAudio:
        assert self._carry is not None
        return WriteAudio(self._carry.feed(data), received, len(data))

    def _fail(self, exc: AudioStreamError, end: str | None = None) -> list[Action]:
        """Close; the call ends ``end``, else refused (never opened) or an error (open)."""
        end = end or ("error" if self.state is STREAMING else "refused")
        self.state = CLOSED
        self._deadline = None
        self._held, self._held_bytes = [], 0
        return [Close(exc.code, str(exc), end)]
