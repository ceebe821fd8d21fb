"""Recognition off the worker's main loop: one serial stream of Vosk work per call channel.

Vosk's AcceptWaveform is bursty (p99 ~200 ms, max ~0.9 s per 20 ms chunk here: the
network runs in 240 ms batches). If the worker fed every call from its main loop,
one call's burst would freeze VAD decisions, heartbeats and the other calls of the
worker. So the main loop only queues audio; each :class:`AsrStream` drains its queue
on the worker's recognition threads (:mod:`workers.scheduler`; the vosk binding
releases the GIL), one slice at a time per stream so a call's audio stays in order,
several streams in parallel, streams whose final is awaited first.

Results go back to the main loop through a queue plus an eventfd the loop polls,
because ZeroMQ sockets and sequence numbers belong to the main thread.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Any

from workers.engines.vosk import Recognizer, RecognizerPool, Result
from workers.scheduler import AsrScheduler


__all__ = ["AsrOutput", "AsrStream", "ResultQueue"]


@dataclass(frozen=True)
class AsrOutput:
    """A recognizer output for the main loop to publish."""

    stream: AsrStream
    kind: str  # "partial" | "final"
    offset_ms: int  # call offset of the utterance start
    text: str
    words: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""  # finals: "vad" | "endpoint" | "end"
    utterance: int = -1  # ring cursor that opened the utterance (for the committed cursor)
    fed_until: int = 0  # ring cursor of the end of the audio heard
    asr_ns: int = 0
    heard_ms: tuple[int, int] = (0, 0)  # finals: call time span of the audio this final decoded
    pieces: tuple[tuple[int, int, str], ...] = ()  # finalised in pieces: each one's span and how it ended


class ResultQueue:
    """Thread-safe queue whose readiness is an fd the main loop's poller can watch."""

    def __init__(self) -> None:
        self._q: SimpleQueue[AsrOutput] = SimpleQueue()
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def put(self, out: AsrOutput) -> None:
        self._q.put(out)
        os.eventfd_write(self.fd, 1)

    def drain(self) -> list[AsrOutput]:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        out = []
        while not self._q.empty():
            out.append(self._q.get_nowait())
        return out

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class _Item:
    """Queued by the main loop: audio of an utterance, a pause in it, or its end."""

    kind: str  # "audio" | "cut" | "end"
    pcm: bytes  # audio: model-rate int16 mono
    reason: str  # end: "vad" | "end" | "reset"
    offset_ms: int  # audio: call offset of its first sample
    utterance: int  # ring cursor that opened the utterance
    end_cursor: int  # ring cursor just after this audio


@dataclass(frozen=True)
class _Piece:
    """What Vosk gave for one piece of an utterance (up to a pause), words in call time."""

    text: str
    words: list[dict[str, Any]]
    heard_ms: tuple[int, int]
    how: str  # "final": FinalResult(), the next piece starts on fresh features; "endpoint": Vosk's own


_SLICE = 10  # frames (200 ms of audio) per turn on a recognition thread
# A stream this many frames behind does not publish its partials: stale by the time they
# would go out, and the first thing given up under load (finals keep their priority). They
# are still asked of Vosk, whose words depend on where partials are asked for.
PARTIAL_BACKLOG = 25  # 500 ms


class AsrStream:
    """Serial recognition work for one channel of one call.

    Call :meth:`feed` with model-rate audio and :meth:`end` when the VAD closes an
    utterance, from the main loop only. ``hold`` keeps one recognizer for the whole
    call (no VAD gating: Vosk hears everything and its own endpoint ends utterances).

    :meth:`cut` at a pause inside an utterance finalises what was fed so far now, while
    the caller may still go on: if they do, the utterance continues as a new piece on the
    same recognizer; if the VAD ends it, :meth:`end` publishes at once, without a
    FinalResult of its own. The final is the pieces joined. A cut is a FinalResult: it
    must flush the features, because the network still lacks its right context for the
    last ~200 ms fed (Vosk's ``Result()`` there loses the last syllable, measured on every
    committed sentence); so a piece after it starts on fresh features, as a new
    recognizer would decode that audio alone.
    """

    def __init__(
        self,
        pool: RecognizerPool,
        scheduler: AsrScheduler,
        results: ResultQueue,
        *,
        partial_frames: int,
        hold: bool,
        tag: Any = None,
        background: bool = False,
    ) -> None:
        self.pool = pool
        self.scheduler = scheduler
        self.results = results
        self.partial_frames = partial_frames  # ask for a partial every N frames; 0 = never
        self.hold = hold
        self.tag = tag
        self.background = background  # a recorded file: served after every live stream (workers/scheduler.py)
        self._items: deque[_Item] = deque()
        self._lock = threading.Lock()
        self._scheduled = False  # queued for a slice, or running one
        self._awaited = 0  # cut and end items queued: a final is awaited
        self.partials_skipped = 0
        self._rec: Recognizer | None = None
        self._origin_ms = 0  # call offset of the recognizer's time zero
        self._first_ms = 0  # call offset of the first audio of the utterance
        self._utterance = -1
        self._last_partial = ""
        self._since_partial = 0
        self._fed_until = 0
        self._heard_from = -1  # call time of the first audio since the last final or cut
        self._heard_to = 0
        self._pieces: list[_Piece] = []  # finalised at pauses of the utterance in progress
        self.closed = False

    # -- main loop side --------------------------------------------------------

    def feed(self, pcm: bytes, offset_ms: int, utterance: int, end_cursor: int) -> None:
        """Queue audio of the utterance that started at ring cursor ``utterance``."""
        self._push(_Item("audio", pcm, "", offset_ms, utterance, end_cursor))

    def cut(self, utterance: int, end_cursor: int) -> None:
        """A pause in the utterance: finalise what was fed so far, the utterance may go on."""
        self._push(_Item("cut", b"", "", 0, utterance, end_cursor))

    def end(self, reason: str, utterance: int, end_cursor: int) -> None:
        """Close the current utterance: the stream will publish its final."""
        self._push(_Item("end", b"", reason, 0, utterance, end_cursor))

    def _push(self, item: _Item) -> None:
        awaited = item.kind != "audio"
        with self._lock:
            self._items.append(item)
            self._awaited += awaited
            if self._scheduled:
                if awaited:
                    self.scheduler.promote(self)
                return
            self._scheduled = True
            urgent = self._awaited > 0
        self.scheduler.submit(self, urgent, self.background)

    @property
    def pending(self) -> bool:
        return bool(self._items) or self._scheduled

    @property
    def backlog_ms(self) -> int:
        """Audio queued and not yet decoded (each item is a 20 ms frame, or an end)."""
        return len(self._items) * 20

    def release(self) -> None:
        """Drop what is queued and give the recognizer back, now or when the job
        running on the pool ends: never while Vosk is still using it."""
        with self._lock:
            self.closed = True
            self._items.clear()
            if self._scheduled:
                return  # _run gives it back
        self._give_back()

    def _give_back(self) -> None:
        rec, self._rec = self._rec, None
        if rec is not None:
            self.pool.give_back(rec)

    # -- thread pool side ------------------------------------------------------

    def run_slice(self) -> None:
        """One turn on a recognition thread: up to a slice of this stream's work."""
        for _ in range(_SLICE):
            with self._lock:
                if not self._items or self.closed:
                    self._scheduled = False
                    if self.closed:
                        self._give_back()
                    return
                item = self._items.popleft()
                self._awaited -= item.kind != "audio"
            if item.kind == "audio":
                self._accept(item)
            elif item.kind == "cut":
                self._cut(item.utterance, item.end_cursor)
            else:
                self._finish(item.reason, item.utterance, item.end_cursor)
        # Time slice over: queue again, behind the others of our class, so a call with
        # a backlog (a catch-up, a Vosk stall) does not hold a thread other calls'
        # finals are waiting for.
        with self._lock:
            if not self._items or self.closed:
                self._scheduled = False
                if self.closed:
                    self._give_back()
                return
            urgent = self._awaited > 0
        self.scheduler.submit(self, urgent, self.background)

    def _accept(self, item: _Item) -> None:
        # One AcceptWaveform per 20 ms frame and partials every `partial_frames`
        # frames of audio, never by wall clock: Vosk's output depends on where the
        # chunks end and where partials are asked for, so a schedule tied to the
        # audio keeps a call's transcript independent of how busy the worker was.
        if self._rec is None:
            self._rec = self.pool.lease()
            # Word times count from the recognizer's creation: map them to the call.
            self._origin_ms = item.offset_ms - self._rec.heard_ms
            self._first_ms = item.offset_ms
            self._last_partial = ""
            self._since_partial = 0
        self._utterance = item.utterance
        self._fed_until = item.end_cursor
        if self._heard_from < 0:
            self._heard_from = item.offset_ms
        self._heard_to = item.offset_ms + len(item.pcm) * 1000 // (2 * self.pool.rate)
        if self._rec.accept(item.pcm):
            result = self._rec.result()
            if result.text:
                self._emit_final(result, "endpoint")
            self._last_partial = ""
            self._since_partial = 0
            if self.hold and self._rec.heard_s >= self.pool.max_audio_s:
                # Without gating one recognizer hears the whole call and its memory
                # grows with it: swap it at an endpoint so a long call stays bounded.
                self._give_back()
            return
        self._since_partial += 1
        if self.partial_frames and self._since_partial >= self.partial_frames:
            self._since_partial = 0
            text = self._joined(self._rec.partial())
            if len(self._items) > PARTIAL_BACKLOG:
                self.partials_skipped += 1
                return
            if text and text != self._last_partial:
                self._last_partial = text
                self.results.put(
                    AsrOutput(
                        self,
                        "partial",
                        self._first_ms,
                        text,
                        utterance=item.utterance,
                        fed_until=item.end_cursor,
                        asr_ns=time.monotonic_ns(),
                    )
                )

    def _joined(self, text: str) -> str:
        return " ".join([*(p.text for p in self._pieces if p.text), *([text] if text else [])])

    def _piece(self, result: Result, how: str) -> _Piece:
        """The piece the recognizer just finalised, words on the call's clock; starts the next."""
        words = [
            {**w, "start_ms": w["start_ms"] + self._origin_ms, "end_ms": w["end_ms"] + self._origin_ms}
            for w in result.words
        ]
        piece = _Piece(result.text, words, (max(self._heard_from, 0), self._heard_to), how)
        self._heard_from = -1
        return piece

    def _cut(self, utterance: int, end_cursor: int) -> None:
        if self._rec is None or self._heard_from < 0:
            return  # nothing fed since the utterance began or since the last cut
        self._utterance = utterance
        self._fed_until = max(self._fed_until, end_cursor)
        self._pieces.append(self._piece(self._rec.final(), "final"))
        self._since_partial = 0  # partials of the next piece count from its start, as after an endpoint

    def _finish(self, reason: str, utterance: int, end_cursor: int) -> None:
        if self._rec is None:
            # Nothing was fed (the VAD end came before any audio): an empty final keeps
            # speech_end and final paired for the consumer.
            self.results.put(AsrOutput(self, "final", 0, "", [], reason, utterance, end_cursor, time.monotonic_ns()))
            return
        self._utterance = utterance
        self._fed_until = max(self._fed_until, end_cursor)
        if self._heard_from >= 0 or not self._pieces:  # audio since the last cut: finalise it
            self._pieces.append(self._piece(self._rec.final(), "final"))
        self._emit_final(None, reason)
        self._last_partial = ""
        if not self.hold or reason == "end":
            rec, self._rec = self._rec, None
            self.pool.give_back(rec)

    def _emit_final(self, result: Result | None, reason: str) -> None:
        """Publish the utterance's pieces (and ``result``, Vosk's own endpoint) as one final."""
        if result is not None:
            self._pieces.append(self._piece(result, "endpoint"))
        pieces, self._pieces = self._pieces, []
        said = [p for p in pieces if p.text]
        words = [w for p in said for w in p.words]
        self.results.put(
            AsrOutput(
                self,
                "final",
                words[0]["start_ms"] if words else self._first_ms,
                " ".join(p.text for p in said),
                words,
                reason,
                self._utterance,
                self._fed_until,
                time.monotonic_ns(),
                (pieces[0].heard_ms[0], pieces[-1].heard_ms[1]),
                tuple((*p.heard_ms, p.how) for p in pieces) if len(pieces) > 1 else (),
            )
        )
