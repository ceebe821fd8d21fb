"""mod_audio_stream conventions on top of WebSocket (PROTOCOLS.md §1): sans-I/O.

The WebSocket itself is the ``websockets`` library's job. This module decides what a
connection *means*: which call it is, at which rate and channel count its PCM comes,
what its metadata says, and how arbitrary binary chunks become whole samples. It
serves the three generations on the wire (§1.11): amigniter libwsc (metadata may come
after the first audio), amigniter IXWebSocket and sptmru (reconnects re-send the
metadata; sptmru may send garbage metadata and never resamples, so the rate must be
told by the URL or metadata, else the configured default applies).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from farm.config import SUPPORTED_RATES


__all__ = [
    "StreamParams",
    "AudioStreamError",
    "call_id_from_path",
    "params_from_path",
    "parse_metadata",
    "resolve",
    "SampleCarry",
    "CLOSE_UNSUPPORTED",
    "CLOSE_POLICY",
]

CLOSE_UNSUPPORTED = 1003  # RFC 6455: data the endpoint cannot accept (rate, channels)
CLOSE_POLICY = 1008  # RFC 6455: policy violation (idle, limits)

_RATE_KEYS = ("rate", "sample_rate", "sampleRate", "samplerate")
_CHANNEL_KEYS = ("channels", "nchannels")
_ID_KEYS = ("call_id", "callId", "uuid", "call_uuid")
_K_RATES = {"8k": 8000, "16k": 16000}


class AudioStreamError(ValueError):
    """The stream cannot be served; ``code`` and the message go into the Close frame."""

    def __init__(self, message: str, code: int = CLOSE_UNSUPPORTED) -> None:
        super().__init__(message)
        self.code = code


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


def params_from_path(path: str) -> StreamParams:
    """Read the request target: the call id is the last path segment or ``call_id``.

    Raises :class:`AudioStreamError` for a rate or channel count farm cannot serve.
    """
    return _params(_query(path), call_id_from_path(path), {})


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
        metadata=meta.metadata,
    )


class SampleCarry:
    """Turns arbitrary binary chunks into whole sample frames, carrying the rest.

    A chunk may end in the middle of a sample (odd byte count) or of a stereo pair;
    the tail waits for the next chunk instead of shifting every later sample.
    """

    def __init__(self, width: int) -> None:
        self.width = width
        self._tail = b""

    def feed(self, chunk: bytes) -> bytes:
        if self._tail:
            chunk = self._tail + chunk
        cut = len(chunk) - len(chunk) % self.width
        self._tail = chunk[cut:]
        return chunk[:cut]

    @property
    def pending(self) -> int:
        return len(self._tail)
