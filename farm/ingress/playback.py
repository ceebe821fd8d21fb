"""Audio a call plays to the caller: queue, pacing, "is it playing now", the cut.

ARCHITECTURE.md, "Flush and playback": the ingress writes playback in small even
chunks slightly ahead of real time, knows whether the caller is hearing it (from its
own writes and from FreeSWITCH's playback events), and on barge-in stops writing,
drops its queue and has FreeSWITCH drop what it holds. The ring's PLAYING flag tells
the call's worker when caller speech is a barge-in.

A :class:`Player` is per call. Subclasses say how bytes reach FreeSWITCH
(:meth:`Player._write`) and how FreeSWITCH is told to drop them
(:meth:`Player._flush_remote`); mod_socket_audio streams PCM, mod_audio_stream
sends the clip as a file for FreeSWITCH to play.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
import uuid
import wave
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import soxr

from farm.broker.wire import FlushRequest
from farm.logs import call_logger, quote
from farm.protocol.events import Event
from farm.ring import Ring


__all__ = [
    "Clip",
    "Player",
    "PlaybackError",
    "to_pcm24k",
    "wav_to_pcm24k",
    "wav_duration_ms",
    "OUT_RATE",
    "FRAME_BYTES",
    "MAX_QUEUED_CLIPS",
]

log = logging.getLogger("farm.ingress.playback")

OUT_RATE = 24000  # mod_socket_audio's speaker side (PROTOCOLS.md §2.2); fine for streamAudio too
BYTES_PER_S = OUT_RATE * 2
FRAME_BYTES = 960  # 20 ms at 24 kHz: an even write, one FreeSWITCH frame (TV-MSA-2)
# After a flush FreeSWITCH discards what arrives for 50 ms; wait for its playback_stop
# or this long before writing the next clip, or its first chunk is eaten (§2.5).
FLUSH_HOLD_NS = 100_000_000
MAX_CLIP_S = 600
# Clips one call may have queued: each is an object and two events, whatever its length
# (the audio itself is bounded by the queued-audio limit, --playback-max-queued-s).
MAX_QUEUED_CLIPS = 256


class PlaybackError(ValueError):
    """A play request that cannot be played (bad audio, wrong rate, too long)."""


def to_pcm24k(pcm: bytes, rate: int, channels: int = 1) -> bytes:
    """int16 LE PCM at any rate and channel count -> 24 kHz mono int16 LE (soxr HQ)."""
    if not 4000 <= rate <= 384_000:
        raise PlaybackError(f"sample rate {rate} is out of range (4000-384000)")
    if channels < 1 or channels > 8:
        raise PlaybackError(f"{channels} channels: 1 to 8 are supported")
    if len(pcm) % (2 * channels):
        raise PlaybackError(f"{len(pcm)} bytes is not a whole number of {channels}-channel int16 samples")
    if len(pcm) // (2 * channels) > rate * MAX_CLIP_S:
        raise PlaybackError(f"clip longer than {MAX_CLIP_S} s")
    samples = np.frombuffer(pcm, dtype="<i2")
    if channels > 1:
        samples = (samples.reshape(-1, channels).astype(np.int32).sum(axis=1) // channels).astype(np.int16)
    if rate != OUT_RATE and len(samples):
        samples = soxr.resample(samples, rate, OUT_RATE, quality="HQ")
    return np.ascontiguousarray(samples, dtype="<i2").tobytes()


def wav_duration_ms(data: bytes) -> int:
    """How long a WAV file plays, from its header alone (0 if it has none: converting it says why)."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            # Streaming writers put a placeholder length in the header: the bytes bound it.
            frames = min(int(w.getnframes()), len(data) // max(int(w.getsampwidth() * w.getnchannels()), 1))
            return frames * 1000 // max(int(w.getframerate()), 1)
    except (wave.Error, EOFError):
        return 0


def wav_to_pcm24k(data: bytes) -> bytes:
    """A 16-bit PCM WAV file (any rate, any channel count) -> 24 kHz mono int16 LE."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            if w.getsampwidth() != 2:
                raise PlaybackError(f"WAV sample width {8 * w.getsampwidth()} bits: only 16-bit PCM is supported")
            return to_pcm24k(w.readframes(w.getnframes()), w.getframerate(), w.getnchannels())
    except (wave.Error, EOFError) as exc:
        raise PlaybackError(f"not a PCM WAV file: {exc}") from None


@dataclass
class Clip:
    """One play request: 24 kHz mono int16 PCM and how far it got."""

    pcm: bytes
    play_id: str = ""
    sent: int = 0  # bytes written to FreeSWITCH
    start_ns: int = 0  # when the caller starts hearing it (own clock)
    end_ns: int = 0  # when the caller has heard its last byte (own clock)

    def __post_init__(self) -> None:
        if not self.play_id:
            self.play_id = uuid.uuid4().hex[:12]

    @property
    def duration_ms(self) -> int:
        return len(self.pcm) * 1000 // BYTES_PER_S


class Player:
    """Plays clips to one call and knows whether the caller is hearing one.

    "Playing" is true while clips are queued, while written audio has not had time to
    play (own clock, real time), or between FreeSWITCH's playback_start and
    playback_stop when the module reports them.
    """

    def __init__(
        self,
        call_id: str,
        ring: Ring,
        publish: Callable[[Event], None],
        *,
        lead_ms: int,
        chunk_bytes: int | None = FRAME_BYTES,
        max_queued_ms: int = MAX_CLIP_S * 1000,
        max_clips: int = MAX_QUEUED_CLIPS,
    ) -> None:
        self.call_id = call_id
        self.log = call_logger(log, call_id)
        self.max_queued_ms = max_queued_ms
        self.max_clips = max_clips
        self.ring = ring
        self._publish = publish
        self.lead_ns = lead_ms * 1_000_000
        self.chunk_bytes = chunk_bytes  # None: a clip goes out whole
        self.queue: deque[Clip] = deque()
        self.sent: deque[Clip] = deque()  # written whole, still playing
        self.heard_until = 0  # when the last byte written will have played
        self.fs_playing = False
        self.hold_until = 0
        self.barge_ins = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    # -- what subclasses provide -------------------------------------------------

    def _write(self, clip: Clip, data: bytes) -> bool:
        """Send ``data`` (part of ``clip``) towards the caller; False: not now (backpressure)."""
        raise NotImplementedError

    def _flush_remote(self) -> int:
        """Tell FreeSWITCH to drop what it holds; return when the command was written (ns), 0 if not."""
        raise NotImplementedError

    # -- requests ----------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"playback {self.call_id}")

    def admit(self, duration_ms: int) -> int:
        """Check that a clip this long may be queued now; return what is queued (ms).

        Raises PlaybackError naming the limit: a dialer that queues without end would
        otherwise hold any amount of audio in the ingress.
        """
        if self.closed:
            raise PlaybackError("the call has ended")
        if len(self.queue) >= self.max_clips:
            raise PlaybackError(f"{len(self.queue)} clips are queued, the limit for one call")
        queued_ms = self.queued_ms(time.monotonic_ns())
        if queued_ms + duration_ms > self.max_queued_ms:
            raise PlaybackError(
                f"{queued_ms} ms are queued and this clip is {duration_ms} ms: over the limit of "
                f"{self.max_queued_ms} ms of queued audio (--playback-max-queued-s)"
            )
        return queued_ms

    def play(self, clip: Clip) -> dict[str, Any]:
        queued_ms = self.admit(clip.duration_ms)
        self.queue.append(clip)
        self._set_flag(time.monotonic_ns())
        self._wake.set()
        return {"id": clip.play_id, "duration_ms": clip.duration_ms, "starts_in_ms": queued_ms}

    def flush(self, reason: str = "flush") -> dict[str, Any]:
        """Cut playback at an app's request; no barge_in event."""
        now = time.monotonic_ns()
        if not self.is_playing(now):
            return {"flushed": False}
        info = self._cut(now, reason)
        info["flushed"] = bool(self._flush_remote())
        return info

    def barge_in(self, request: FlushRequest) -> bool:
        """A worker heard the caller speak over playback (its ``W_FLUSH``); True if it cut."""
        now = time.monotonic_ns()
        if not self.is_playing(now):
            # Playback ended between the worker's look at the flag and now: flushing
            # an idle mod_socket_audio would eat the next prompt's start (§2.5).
            self.log.debug("barge-in request after playback ended; nothing to cut")
            return False
        info = self._cut(now, "barge_in")
        flush_ns = self._flush_remote()
        self.barge_ins += 1
        stamps = dict(request.stamps)
        if flush_ns:
            stamps["flush"] = flush_ns
        data = {**info, "flush_sent": bool(flush_ns), "voiced_ms": request.voiced_ms}
        self._publish(Event("barge_in", self.call_id, 0, request.offset_ms, data, stamps))
        self.log.info(
            "barge-in, cut %s after %d ms, %d ms dropped",
            quote(info.get("id")),
            info.get("played_ms", 0),
            info.get("flushed_ms", 0),
        )
        return True

    def on_remote_playback(self, started: bool) -> None:
        """FreeSWITCH says it started or stopped playing (socket_audio::playback_*)."""
        self.fs_playing = started
        if not started:
            self.hold_until = 0  # the flush has been consumed: the next clip may go
            self._wake.set()
        self._set_flag(time.monotonic_ns())

    def state(self) -> dict[str, Any]:
        now = time.monotonic_ns()
        current = self._current(now)
        return {
            "playing": self.is_playing(now),
            "id": current.play_id if current else None,
            "queued": [c.play_id for c in self.queue],
            "queued_ms": self.queued_ms(now),
            "remote_playing": self.fs_playing,
            "barge_ins": self.barge_ins,
        }

    def close(self, reason: str = "hangup") -> None:
        """The call ended: stop, and say so for a clip that was playing."""
        if self.closed:
            return
        self.closed = True
        now = time.monotonic_ns()
        if self.is_playing(now):
            self._cut(now, reason)
        if self._task is not None:
            self._task.cancel()

    # -- state -------------------------------------------------------------------

    def is_playing(self, now: int) -> bool:
        return bool(self.queue) or now < self.heard_until or self.fs_playing

    def queued_ms(self, now: int) -> int:
        unplayed = max(0, self.heard_until - now) // 1_000_000
        return int(unplayed + sum(len(c.pcm) - c.sent for c in self.queue) * 1000 // BYTES_PER_S)

    def _current(self, now: int) -> Clip | None:
        for clip in self.sent:
            if clip.end_ns > now:
                return clip
        return self.queue[0] if self.queue else None

    def _set_flag(self, now: int) -> None:
        playing = self.is_playing(now)
        if self.ring.playing != playing:
            self.ring.playing = playing

    def _cut(self, now: int, reason: str) -> dict[str, Any]:
        self._finish_played(now)
        current = self._current(now)
        info: dict[str, Any] = {
            "id": current.play_id if current else None,
            "played_ms": max(0, now - current.start_ns) // 1_000_000 if current and current.start_ns else 0,
            "flushed_ms": self.queued_ms(now),
            "dropped": [c.play_id for c in self.queue if c is not current],
        }
        for clip in [*self.sent, *self.queue]:
            if clip.start_ns and clip.end_ns != -1:
                self._stop_event(clip, reason, min(clip.duration_ms, max(0, now - clip.start_ns) // 1_000_000))
        self.queue.clear()
        self.sent.clear()
        self.heard_until = now
        self.fs_playing = False
        self.hold_until = now + FLUSH_HOLD_NS
        self._set_flag(now)
        return info

    # -- the writer --------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            now = time.monotonic_ns()
            self._pump(now)
            self._finish_played(now)
            self._set_flag(now)
            if self.queue or self.sent or now < self.heard_until:
                await asyncio.sleep(0.01)
            else:
                self._wake.clear()
                await self._wake.wait()

    def _pump(self, now: int) -> None:
        if now < self.hold_until:
            return
        while self.queue and self.heard_until - now < self.lead_ns:
            clip = self.queue[0]
            left = len(clip.pcm) - clip.sent
            n = left if self.chunk_bytes is None else min(self.chunk_bytes, left)
            if not self._write(clip, clip.pcm[clip.sent : clip.sent + n]):
                return
            start = max(now, self.heard_until)
            if clip.sent == 0:
                clip.start_ns = start
                self._publish(
                    Event(
                        "playback_start",
                        self.call_id,
                        0,
                        self._offset_ms(),
                        {"id": clip.play_id, "duration_ms": clip.duration_ms},
                    )
                )
            self.heard_until = start + n * 1_000_000_000 // BYTES_PER_S
            clip.sent += n
            if clip.sent >= len(clip.pcm):
                clip.end_ns = self.heard_until
                self.sent.append(self.queue.popleft())

    def _finish_played(self, now: int) -> None:
        while self.sent and self.sent[0].end_ns <= now:
            clip = self.sent.popleft()
            self._stop_event(clip, "complete", clip.duration_ms)

    def _stop_event(self, clip: Clip, reason: str, played_ms: int) -> None:
        clip.end_ns = -1  # reported
        self._publish(
            Event(
                "playback_stop",
                self.call_id,
                0,
                self._offset_ms(),
                {"id": clip.play_id, "reason": reason, "played_ms": played_ms, "duration_ms": clip.duration_ms},
            )
        )

    def _offset_ms(self) -> int:
        """Where the caller's audio is now: playback events line up with speech events."""
        return self.ring.write_cursor * 1000 // (self.ring.rate * 2 * self.ring.channels)
