"""Send audio into the farm exactly as mod_audio_stream would (PROTOCOLS.md §1.6-1.7).

A WebSocket client: optional metadata text frame, then raw int16 LE PCM in binary
frames of ``chunk_ms`` (20 ms by default: 320 B at 8 kHz mono, 640 B at 16 kHz),
paced in real time, then Close 1000. Used by ``farm call``, the tests and the bench.
"""

from __future__ import annotations

import asyncio
import json
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


__all__ = ["read_wav", "send_pcm", "SendResult"]


def read_wav(path: str) -> tuple[bytes, int, int]:
    """``(pcm, rate, channels)`` of a 16-bit PCM WAV file."""
    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: {8 * w.getsampwidth()}-bit samples, expected 16-bit PCM")
        return w.readframes(w.getnframes()), w.getframerate(), w.getnchannels()


@dataclass
class SendResult:
    frames: int = 0
    bytes: int = 0
    texts: list[str] = field(default_factory=list)  # text frames the farm sent back
    close_code: int | None = None
    close_reason: str = ""


async def send_pcm(
    url: str,
    pcm: bytes,
    *,
    rate: int,
    channels: int = 1,
    chunk_ms: int = 20,
    realtime: bool = True,
    metadata: str | None = None,
    metadata_after_frames: int = 0,
    chunk_bytes: int | None = None,
    on_text: Callable[[str], None] | None = None,
    linger_s: float = 0.0,
    compression: str | None = None,
) -> SendResult:
    """Stream ``pcm`` to ``url`` like FreeSWITCH; returns what happened.

    ``metadata_after_frames`` > 0 sends the metadata after that many audio frames, as
    the libwsc build does under load (amigniter#121). ``chunk_bytes`` overrides the
    frame size (odd sizes included) to exercise the farm's sample carry.
    """
    size = chunk_bytes or rate * chunk_ms // 1000 * 2 * channels
    period = chunk_ms / 1000 if chunk_bytes is None else chunk_bytes / (2 * channels * rate)
    result = SendResult()
    async with connect(url, compression=compression, max_size=None, open_timeout=10, ping_interval=None) as ws:

        async def receive() -> None:
            async for message in ws:
                if isinstance(message, str):
                    result.texts.append(message)
                    if on_text is not None:
                        on_text(message)

        reader = asyncio.create_task(receive())
        try:
            if metadata is not None and metadata_after_frames <= 0:
                await ws.send(metadata)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            for i, start in enumerate(range(0, len(pcm), size)):
                if realtime:
                    delay = t0 + i * period - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await ws.send(pcm[start : start + size])
                result.frames += 1
                result.bytes += len(pcm[start : start + size])
                if metadata is not None and i + 1 == metadata_after_frames:
                    await ws.send(metadata)
            if linger_s:
                # Stay open after the audio, as a call does, until the farm closes the
                # stream (the reader ends then) or the time is up.
                await asyncio.wait([reader], timeout=linger_s)
            await ws.close(1000, "Normal closure")
        except ConnectionClosed:
            pass  # the farm closed the stream: its code and reason say why
        result.close_code = ws.close_code
        result.close_reason = ws.close_reason or ""
        reader.cancel()
    return result


def metadata_for(call_id: str, rate: int, channels: int, extra: dict[str, Any] | None = None) -> str:
    """The metadata a dialer would pass to ``uuid_audio_stream … start``."""
    return json.dumps({"call_id": call_id, "rate": rate, "channels": channels, **(extra or {})})
