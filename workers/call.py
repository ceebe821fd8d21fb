"""One call served by a worker: ring in, resample, VAD, recognition streams, events out.

The main loop calls :meth:`CallSession.pump` every tick; it reads what the ingress
wrote since the last tick and returns the events the VAD decided. Recognizer outputs
come back through :meth:`CallSession.on_asr`. Everything runs on the worker's main
thread except the Vosk work inside :class:`~workers.asr.AsrStream`.

The committed cursor (ring header) is what makes a worker crash lose no words: it
only moves past audio whose utterance has been finalised, and while the caller is
silent it trails the read cursor by the VAD's onset window plus the preroll, so a
worker that attaches later and replays from it rebuilds the same utterances.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import soxr

from farm.broker.wire import FlushRequest
from farm.config import Config
from farm.protocol.audio_stream import is_background
from farm.protocol.call_stats import CallStats
from farm.protocol.events import Event
from farm.ring import Ring
from workers.analysis import CallAnalysis, Found, Options
from workers.asr import AsrOutput, AsrStream, ResultQueue
from workers.engines.vosk import RecognizerPool
from workers.scheduler import AsrScheduler
from workers.vad import SpeechEnd, SpeechPause, SpeechResume, SpeechStart, Vad, VadConfig, VadState


__all__ = ["FLUSH", "CallSession", "Draft", "vad_config_for"]

log = logging.getLogger(__name__)

FRAME_MS = 20
# A background call (a recorded file) is read from its ring no further ahead of its
# recognition than this: the ring then fills and the ingress stops taking the file's audio
# (farm/ingress/audio_stream.py), so a file queues in the sender, not in a worker's memory.
BACKGROUND_BACKLOG_MS = 5000
# Audio one pump takes from a call's ring at most, s (see CallSession.pump).
PUMP_MAX_S = 1


def vad_config_for(config: Config) -> VadConfig:
    """The VAD settings of every call; raises ValueError on bad knobs (``farm up`` checks at start)."""
    return VadConfig(
        aggressiveness=config.vad_aggressiveness,
        onset_ms=config.vad_onset_ms,
        onset_window_ms=max(100, config.vad_onset_ms),
        hangover_ms=config.vad_hangover_ms,
        preroll_ms=config.vad_preroll_ms,
        tail_margin_db=config.vad_tail_margin_db,
        tail_range_db=config.vad_tail_range_db,
        tentative_ms=config.vad_tentative_ms,
    )


# A draft of this type is no event: the worker sends it to the ingress as W_FLUSH.
FLUSH = "flush"


@dataclass
class Draft:
    """An event before it gets its sequence number (or a barge-in request, :data:`FLUSH`)."""

    type: str
    offset_ms: int
    data: dict[str, Any]
    stamps: dict[str, int]
    channel: int


class _Channel:
    """One transcribed channel: resampler, VAD, preroll and its recognition stream."""

    def __init__(self, session: CallSession, index: int, asr: AsrStream) -> None:
        cfg = session.config
        self.session = session
        self.index = index
        self.asr = asr
        rate = session.ring.rate
        self.resampler = (
            soxr.ResampleStream(rate, session.model_rate, 1, dtype="int16", quality="QQ")
            if rate != session.model_rate
            else None
        )
        self.vad_config = vad_config_for(cfg)
        self.vad = Vad(session.model_rate, self.vad_config)
        self.frame_bytes = self.vad.frame_bytes
        self.in_block = rate * FRAME_MS // 1000  # input samples per 20 ms
        self.unresampled = np.zeros(0, dtype="<i2")
        self.pending = bytearray()  # model-rate audio not yet a whole frame
        self.preroll: list[bytes] = []  # recent silent frames, fed when speech starts
        self.utterance = -1  # ring cursor that opened the current utterance, -1 if none
        self.open_utterances: list[int] = []  # opened and not yet finalised
        # Utterances whose speech_end went out and whose final has not: start -> end cursor
        # (the ring header carries their count, for a worker taking the call over).
        self.owed: dict[int, int] = {}
        # After a SpeechPause: the quiet frames since, held back from the recognizer (its
        # piece is finalised); fed if the caller resumes, dropped if the utterance ends.
        self.held: list[tuple[bytes, int, int]] | None = None
        self.onset_frame = 0  # SpeechStart.frame of the current utterance
        # Barge-in is the caller's (channel 0) to make, once per utterance.
        self.barge_in_done = index != 0 or not session.config.barge_in
        # A fresh webrtcvad flags ~100 ms of any noise at its start as speech: let it
        # hear one onset window before it may start an utterance. A resumed worker
        # also knows the preroll before its start was silence (its predecessor said so).
        self.quiet_frames = self.vad_config.onset_window_ms // FRAME_MS + 1
        if session.resumed and cfg.gating:
            if session.ring.in_speech:
                # The predecessor published this utterance's speech_start; it began at
                # the committed cursor, preroll included.
                self.utterance = session.cursor_of(0)
                self.open_utterances.append(self.utterance)
                self.vad.resume_speech(self.vad.preroll_frames)
                self.onset_frame = self.vad.preroll_frames
            else:
                self.quiet_frames += self.vad.preroll_frames

    def push(self, samples: np.ndarray, read_ns: int, last: bool = False) -> list[Draft]:
        drafts: list[Draft] = []
        if self.index == 0 and len(samples):
            drafts += self.session.found(self.session.analysis.on_audio(samples), {"read": read_ns})
        if self.resampler is not None:
            # Resample whole 20 ms input blocks only: soxr's output moves by an LSB or
            # two with the chunking, and what the ring holds at each look is timing.
            # One call per block, so the blocks seen are the same whatever arrives together.
            buf = np.concatenate((self.unresampled, samples)) if len(self.unresampled) else samples
            whole = len(buf) - len(buf) % self.in_block
            for i in range(0, whole, self.in_block):
                self.pending += self.resampler.resample_chunk(buf[i : i + self.in_block]).tobytes()
            self.unresampled = buf[whole:]
            if last:
                self.pending += self.resampler.resample_chunk(self.unresampled, last=True).tobytes()
                self.unresampled = self.unresampled[:0]
        else:
            self.pending += samples.tobytes()
        fb = self.frame_bytes
        n = len(self.pending) // fb
        for i in range(n):
            frame = bytes(self.pending[i * fb : (i + 1) * fb])
            drafts.extend(self._frame(frame, read_ns))
        del self.pending[: n * fb]
        return drafts

    def _frame(self, frame: bytes, read_ns: int) -> list[Draft]:
        s = self.session
        k = self.vad.frames  # index of this frame
        decision = self.vad.process(frame)
        if isinstance(decision, SpeechStart) and k < self.quiet_frames:
            self.vad.reset()
            decision = None
        drafts: list[Draft] = []
        if self.index == 0:
            voiced = self.vad.voiced and k >= self.quiet_frames  # a fresh webrtcvad flags any onset
            drafts += s.found(s.analysis.on_frame(s.offset_ms(k), voiced), {"read": read_ns})
        cursor_end = s.cursor_of(k + 1)
        if not s.config.gating:
            if self.utterance < 0:
                self.utterance = s.cursor_of(k)
                self.open_utterances.append(self.utterance)
            self.asr.feed(frame, s.offset_ms(k), self.utterance, cursor_end)
        if isinstance(decision, SpeechStart):
            drafts.append(self._speech_start(decision, read_ns))
            if s.config.gating:
                first = k - len(self.preroll)
                self.utterance = s.cursor_of(first)
                self.open_utterances.append(self.utterance)
                for j, old in enumerate(self.preroll):
                    self.asr.feed(old, s.offset_ms(first + j), self.utterance, s.cursor_of(first + j + 1))
                self.preroll.clear()
                self.asr.feed(frame, s.offset_ms(k), self.utterance, cursor_end)
        elif self.vad.state is VadState.SPEECH and s.config.gating:
            if isinstance(decision, SpeechPause):
                # The caller may be done: finalise now (what was fed, this frame included),
                # so the final is ready when the hangover confirms the end.
                self.asr.feed(frame, s.offset_ms(k), self.utterance, cursor_end)
                self.asr.cut(self.utterance, cursor_end)
                self.held = []
            elif self.held is not None and not isinstance(decision, SpeechResume):
                self.held.append((frame, s.offset_ms(k), cursor_end))
            else:
                for old, offset, end in self.held or ():
                    self.asr.feed(old, offset, self.utterance, end)
                self.held = None
                self.asr.feed(frame, s.offset_ms(k), self.utterance, cursor_end)
        else:
            if isinstance(decision, SpeechEnd):
                drafts.append(self._speech_end(decision, read_ns))
                if s.config.gating:
                    # Fed up to the pause (or through the hangover); this frame is silence.
                    self.asr.end("vad", self.utterance, cursor_end)
                    self.owed[self.utterance] = cursor_end
                    self.utterance = -1
                    self.held = None
            if s.config.gating:
                self.preroll.append(frame)
                if len(self.preroll) > self.vad.preroll_frames:
                    del self.preroll[0]
        if (
            not self.barge_in_done
            and self.vad.state is VadState.SPEECH
            and self.vad.voiced_ms >= s.config.barge_in_min_speech_ms
            and s.ring.playing
        ):
            self.barge_in_done = True
            drafts.append(self._flush_request(read_ns))
        return drafts

    def _flush_request(self, read_ns: int) -> Draft:
        """Ask the ingress to cut what it plays: the caller is talking over it.

        The ingress owns playback and does the cut; it answers with a ``barge_in``
        event. ``t.recv`` is when the utterance's first voiced frame arrived.
        """
        s = self.session
        stamps = s.stamps_at(s.cursor_of(self.onset_frame), read_ns)
        stamps["vad"] = time.monotonic_ns()
        data = {"voiced_ms": self.vad.voiced_ms, "speech_start_ms": s.offset_ms(self.onset_frame)}
        return Draft(FLUSH, s.offset_ms(self.vad.frames), data, stamps, self.index)

    def _speech_start(self, d: SpeechStart, read_ns: int) -> Draft:
        s = self.session
        s.ring.in_speech = True
        self.onset_frame = d.frame
        if s.replays(s.cursor_of(d.frame)):
            s.replays_started += 1
        self.barge_in_done = self.index != 0 or not s.config.barge_in
        stamps = s.stamps_at(s.cursor_of(d.frame), read_ns)
        stamps["vad"] = time.monotonic_ns()
        return Draft("speech_start", s.offset_ms(d.frame), {}, stamps, self.index)

    def _speech_end(self, d: SpeechEnd, read_ns: int) -> Draft:
        s = self.session
        s.ring.in_speech = False
        # recv of the last voiced frame: "end of speech" in the latency vocabulary.
        stamps = s.stamps_at(s.cursor_of(d.frame) - 1, read_ns)
        stamps["vad"] = time.monotonic_ns()
        s.end_of_speech[self.index] = stamps.get("recv", 0)
        if s.replays(s.cursor_of(self.onset_frame)):
            s.replays_ended += 1
        return Draft(
            "speech_end",
            s.offset_ms(d.frame),
            {"duration_ms": d.duration_frames * FRAME_MS, "start_ms": s.offset_ms(d.frame - d.duration_frames)},
            stamps,
            self.index,
        )

    def finalize(self, read_ns: int) -> list[Draft]:
        """An explicit end of utterance (a vosk-server reset, a finalize command): end the
        utterance in progress here and give its final now; with none in progress, an
        empty final, so whoever asked gets an answer."""
        drafts: list[Draft] = []
        s = self.session
        cursor = s.cursor_of(self.vad.frames)
        if self.vad.state is VadState.SPEECH:
            end = self.vad.frames
            self.vad.reset()
            drafts.append(self._speech_end(SpeechEnd(end, end - 1, end - self.onset_frame, False), read_ns))
        self.asr.end("reset", self.utterance, cursor)
        if self.utterance >= 0:
            self.owed[self.utterance] = cursor
        self.utterance = -1  # without gating, the next frame opens the next one
        self.held = None
        return drafts

    def finish(self, read_ns: int) -> list[Draft]:
        """The ring is closed and drained: flush everything into a last final."""
        drafts = self.push(np.zeros(0, dtype="<i2"), read_ns, last=True) if self.resampler else []
        end = self.vad.flush()
        cursor = self.session.ring.write_cursor
        if isinstance(end, SpeechEnd):
            drafts.append(self._speech_end(end, read_ns))
        if self.utterance >= 0:
            self.asr.end("end", self.utterance, cursor)
            self.owed[self.utterance] = cursor
            self.utterance = -1
            self.held = None
        if self.index == 0:
            drafts += self.session.found(self.session.analysis.on_end(), {"read": read_ns})
        return drafts


class CallSession:
    """A call this worker serves; created on B_ASSIGN, dropped after W_DONE."""

    def __init__(
        self,
        call_id: str,
        ring: Ring,
        info: dict[str, Any],
        config: Config,
        *,
        options: Options,
        pool: RecognizerPool,
        scheduler: AsrScheduler,
        results: ResultQueue,
    ) -> None:
        self.call_id = call_id
        self.ring = ring
        self.info = info
        self.config = config
        self.model_rate = pool.rate
        self.width = 2 * ring.channels  # bytes per sample frame in the ring
        self.in_frame_bytes = ring.rate * FRAME_MS // 1000 * self.width
        # A worker before us read this ring (and died): resume where the last
        # finalised utterance ended. A fresh call starts at 0.
        self.resumed = ring.read_cursor > 0 or ring.in_speech
        # Ours from now: a worker that served it before (declared gone while it was only
        # starved) stops at its next look instead of reading the ring beside us.
        self.pid = os.getpid()
        ring.reader_pid = self.pid
        committed = ring.committed
        ring.seek(committed)
        # Finals the worker before us owed (speech_end said, final not): the replay from the
        # committed cursor gives them again, unless the writer laps it first (see _settle_owed).
        self.inherited, self.inherited_end = ring.owed, ring.owed_end
        self.replay_cursor = committed  # where the replay reads next
        self.lapped_ms = 0  # audio of the replay the writer overwrote before we read it
        self.replays_started = self.replays_ended = 0  # utterances replayed that began before inherited_end
        self.base = ring.read_cursor - ring.read_cursor % self.width
        ring.seek(self.base)
        self.carry = b""  # partial sample frame between reads
        self.next_cursor = self.base
        self.overrun_seen = ring.overrun_bytes
        self.end_of_speech: dict[int, int] = {}
        # A recorded file: its recognition waits for every live call's (workers/scheduler.py).
        self.background = is_background(info.get("metadata"))
        wanted = info.get("transcribe", config.transcribe)
        channels = range(ring.channels) if wanted == "both" else range(1)
        self.channels = [
            _Channel(
                self,
                c,
                AsrStream(
                    pool,
                    scheduler,
                    results,
                    partial_frames=config.partial_interval_ms // FRAME_MS,
                    hold=not config.gating,
                    tag=(call_id, c),
                    background=self.background,
                ),
            )
            for c in channels
        ]
        self.by_index = {ch.index: ch for ch in self.channels}
        # AMD, tones and intents of the caller's channel (workers/analysis.py).
        self.analysis = CallAnalysis(ring.rate, options, self.offset_ms_of_cursor(self.base), self.resumed)
        self.amd_on_request = options.amd_on_request
        # The amd command (Ring.request_amd) is taken once, where it was asked; one asked before
        # this worker took the call over was its predecessor's to run.
        self.amd_pending = ring.amd_at is None or ring.amd_at >= self.base
        self.stats = CallStats(from_ms=self.offset_ms_of_cursor(self.base))  # for call_end
        self.finishing = False
        self.writer_lost = False  # the ingress that writes the ring died: what came is all there is
        self.release_asked = 0.0  # when the broker asked to move this call to another worker (0: not)
        # Explicit ends of utterance (Ring.request_finalize) at cursors before ours were
        # honoured by the worker before us, or belong to audio we replay: not again.
        self.finalized_until = self.base

    # -- cursor arithmetic -----------------------------------------------------

    def cursor_of(self, frame: int) -> int:
        """Ring cursor where 20 ms model frame ``frame`` (counted from ``base``) starts."""
        return self.base + frame * self.in_frame_bytes

    def offset_ms(self, frame: int) -> int:
        return self.offset_ms_of_cursor(self.cursor_of(frame))

    def stamps_at(self, cursor: int, read_ns: int) -> dict[str, int]:
        stamps = {"read": read_ns}
        arrival = self.ring.arrival(max(cursor, 0))
        if arrival is not None:
            stamps["recv"], stamps["commit"] = arrival
        return stamps

    # -- main loop entry points --------------------------------------------------

    def pump(self) -> list[Draft]:
        """Process what the ingress wrote since the last call; return VAD events."""
        if self.finishing or (self.background and self.backlog_ms > BACKGROUND_BACKLOG_MS):
            return []
        ring = self.ring
        if ring.read_cursor != self.next_cursor and self.next_cursor >= ring.write_cursor - ring.capacity:
            # Another reader moved the shared cursor: the worker before us read once more
            # before it saw the call taken over. Read on from ours.
            ring.seek(self.next_cursor)
        closed = self.ring.closed or self.writer_lost  # read before the data so no audio is missed
        finalize_at = self.ring.finalize_at
        if finalize_at is not None and finalize_at < self.finalized_until:
            finalize_at = None  # done already
        # Read no further than an explicit end of utterance: the audio after it is the next one's;
        # and no more than PUMP_MAX_S at a time: a call resumed far behind (moved to this worker)
        # must not hold the loop that beats the worker's heartbeats (a missed beat moves it again).
        most = self.in_frame_bytes * (PUMP_MAX_S * 1000 // FRAME_MS)
        if finalize_at is not None:
            most = min(most, finalize_at - self.ring.read_cursor)
        amd_at = self.ring.amd_at if self.amd_pending else None
        if amd_at is not None:
            if self.ring.read_cursor >= amd_at:  # the answer: AMD decides from here
                self.amd_pending = False
                self.analysis.start_amd(self.offset_ms_of_cursor(self.ring.read_cursor), self.amd_on_request)
            else:
                most = min(most, amd_at - self.ring.read_cursor)  # frames before it are not AMD's
        start, data = self.ring.read(most)
        read_ns = time.monotonic_ns()
        drafts: list[Draft] = []
        if self.inherited and start > self.replay_cursor:  # the writer lapped the replay
            self.lapped_ms += self.offset_ms_of_cursor(start) - self.offset_ms_of_cursor(self.replay_cursor)
        overrun = self.ring.overrun_bytes
        if overrun != self.overrun_seen:
            drafts.append(
                Draft(
                    "overrun",
                    self.offset_ms_of_cursor(start),
                    {"bytes": overrun - self.overrun_seen, "total_bytes": overrun, "count": self.ring.overrun_count},
                    {"read": read_ns},
                    0,
                )
            )
            self.overrun_seen = overrun
        if data:
            if self.ring.playing:
                self.stats.played(self.offset_ms_of_cursor(len(data)))
            drafts.extend(self._consume(start, data, read_ns))
        if self.inherited:
            drafts.extend(self._settle_owed(start + len(data), read_ns))
        if finalize_at is not None and self.ring.read_cursor >= finalize_at:
            self.finalized_until = finalize_at + 1
            for ch in self.channels:
                drafts.extend(ch.finalize(read_ns))
        if closed and self.ring.read_cursor >= self.ring.write_cursor:
            self.finishing = True
            for ch in self.channels:
                drafts.extend(ch.finish(read_ns))
        return drafts

    def _settle_owed(self, cursor: int, read_ns: int) -> list[Draft]:
        """The finals the worker before us owed, once the replay has read up to ``cursor``.

        Each owed utterance the replay reads is recognized again and gets its final from us.
        If the writer lapped the replay (a worker starved and declared gone, its finals long
        pending, or this one starved before its first look), the owed utterances whose audio
        went with it never start again: once the replay is past the last owed end, each of
        their finals comes empty, reason lost, with ``lost_ms`` (the audio overwritten)."""
        self.replay_cursor = cursor
        if cursor < self.inherited_end - 1:
            return []
        lost = self.inherited - self.replays_started if self.lapped_ms else 0
        self.inherited = 0
        offset = self.offset_ms_of_cursor(cursor)
        data = {"text": "", "words": [], "reason": "lost", "audio_ms": [], "lost_ms": self.lapped_ms}
        return [Draft("final", offset, dict(data), {"read": read_ns}, 0) for _ in range(max(0, lost))]

    def replays(self, cursor: int) -> bool:
        """Is the utterance begun at ``cursor`` one whose final the worker before us owed?"""
        return self.inherited > 0 and cursor < self.inherited_end - 1

    @property
    def taken_over(self) -> bool:
        """Another worker serves this call now (we were declared gone and it was moved)."""
        return self.ring.reader_pid != self.pid

    def commit(self) -> None:
        """Write, for a worker that may take this call over, where it resumes and the finals owed."""
        ring = self.ring
        if self.taken_over:
            return  # the header is the new reader's
        ring.committed = max(ring.committed, self.committed_cursor())
        ends = [end for ch in self.channels for end in ch.owed.values()]
        # Owed before us and not yet said again: a worker after us owes them too.
        ends += [self.inherited_end - 1] * max(0, self.inherited - self.replays_ended)
        ring.owed, ring.owed_end = len(ends), max(ends) + 1 if ends else 0

    def offset_ms_of_cursor(self, cursor: int) -> int:
        return cursor * 1000 // (self.ring.rate * self.width)

    def _consume(self, start: int, data: bytes, read_ns: int) -> list[Draft]:
        if start != self.next_cursor:
            # The reader fell behind and the writer overwrote audio (counted as an
            # overrun): re-align on a sample frame and shift the frame clock.
            skip = -start % self.width
            data, start = data[skip:], start + skip
            self.base += start - self.next_cursor
            self.carry = b""
        self.next_cursor = start + len(data)
        buf = self.carry + data
        usable = len(buf) - len(buf) % self.width
        self.carry = buf[usable:]
        if not usable:
            return []
        samples = np.frombuffer(buf[:usable], dtype="<i2")
        if self.ring.channels > 1:
            samples = samples.reshape(-1, self.ring.channels)
        drafts: list[Draft] = []
        for ch in self.channels:
            mono = samples[:, ch.index] if self.ring.channels > 1 else samples
            drafts.extend(ch.push(np.ascontiguousarray(mono), read_ns))
        return drafts

    def found(self, found: list[Found], stamps: dict[str, int]) -> list[Draft]:
        """Drafts of what the call's analysis found (workers/analysis.py), on the caller's channel."""
        return [Draft(type, offset, data, dict(stamps), 0) for type, offset, data in found]

    def on_asr(self, out: AsrOutput) -> list[Draft]:
        """A recognizer output for this call arrived on the main loop."""
        ch = out.stream.tag[1]
        stamps = self.stamps_at(out.fed_until - 1, 0)
        stamps.pop("read", None)
        stamps["asr"] = out.asr_ns
        data: dict[str, Any] = {"text": out.text}
        if out.kind == "final":
            data["words"] = out.words
            data["reason"] = out.reason
            data["audio_ms"] = list(out.heard_ms)  # what the recognizer heard for this final
            if out.pieces:  # finalised piece by piece at the caller's pauses
                data["pieces_ms"] = [list(p) for p in out.pieces]
            eos = self.end_of_speech.pop(ch, 0) if out.reason in ("vad", "end", "reset") else 0
            if eos:
                stamps["recv"] = eos  # end of speech -> final is what a dialer waits on
            channel = self.by_index[ch]
            if out.reason != "endpoint":
                if out.utterance in channel.open_utterances:
                    channel.open_utterances.remove(out.utterance)
                channel.owed.pop(out.utterance, None)
            elif not self.config.gating:
                # No VAD gating: one recognizer hears the whole call, so the last
                # endpoint is the only place a replay can start from.
                channel.open_utterances = [out.fed_until]
        found: list[Found] = []
        if ch == 0:
            heard_ms = self.offset_ms_of_cursor(out.fed_until)
            found = self.analysis.on_transcript(heard_ms, out.text, out.kind == "final")
            # Not a final the call's end made: its call_end follows at once, and nothing
            # of a call comes after that.
            if out.kind == "final" and out.reason != "end" and self.analysis.ask_llm(out.text):
                data["llm_intent"] = True
        return [Draft(out.kind, out.offset_ms, data, stamps, ch), *self.found(found, stamps)]

    def committed_cursor(self) -> int:
        """Where a worker taking over this call would have to start."""
        ch0 = self.channels[0]
        opened = [u for ch in self.channels for u in ch.open_utterances]
        if opened:
            return min(opened)
        # Silence: keep the onset window and the preroll replayable.
        back = ch0.vad.preroll_frames + ch0.vad_config.onset_window_ms // FRAME_MS + 1
        return max(self.base, self.cursor_of(ch0.vad.frames - back))

    @property
    def idle(self) -> bool:
        return self.finishing and not any(ch.asr.pending for ch in self.channels)

    def releasable(self, patient: bool) -> bool:
        """Can another worker take this call over now? Between utterances, and (``patient``)
        with nothing left to recognize, so the next worker repeats no work; impatient, a
        final still being recognized is recognized again by the next worker, from the
        committed cursor (its speech_start and speech_end come twice, the final once)."""
        # The next worker replays from the committed cursor: if the writer is far ahead of
        # it (a final pending for long, on a busy node), the ring may overwrite that audio
        # before the replay reads it, and the words go with it (seen under stress-ng: a call
        # moved with its final pending 32 s back in a 30 s ring never got that final). Such
        # a call stays where its recognition is.
        replayable = self.ring.write_cursor - self.ring.committed <= self.ring.capacity // 2
        # AMD deciding: the answer's cadence is here, a worker taking the call would not have it.
        return (
            replayable
            and not self.analysis.deciding
            and not self.finishing
            and all(
                ch.vad.state is VadState.SILENCE and ch.utterance < 0 and (not patient or not ch.asr.pending)
                for ch in self.channels
            )
        )

    @property
    def backlog_ms(self) -> int:
        return max(ch.asr.backlog_ms for ch in self.channels)

    @property
    def partials_skipped(self) -> int:
        """Partials not published because recognition was behind (workers/asr.py)."""
        return sum(ch.asr.partials_skipped for ch in self.channels)

    @property
    def in_speech(self) -> int:
        return sum(ch.vad.state is VadState.SPEECH for ch in self.channels)

    def event(self, draft: Draft) -> Event:
        """Give a draft its sequence number; the counter lives in the ring so a
        worker taking over the call continues it."""
        seq = self.ring.event_seq
        self.ring.event_seq = seq + 1
        self.stats.observe(draft.type, draft.channel, draft.offset_ms, draft.data)
        return Event(draft.type, self.call_id, seq, draft.offset_ms, draft.data, draft.stamps, draft.channel)

    def flush_request(self, draft: Draft) -> FlushRequest:
        """A barge-in draft as the ``W_FLUSH`` the ingress acts on (counted in the call's stats)."""
        self.stats.observe(draft.type, draft.channel, draft.offset_ms, draft.data)
        voiced, start = int(draft.data["voiced_ms"]), int(draft.data["speech_start_ms"])
        return FlushRequest(draft.offset_ms, voiced, start, tuple(draft.stamps.items()))

    def event_for(self, type: str, offset_ms: int, data: dict[str, Any]) -> Event:
        return self.event(Draft(type, offset_ms, data, {}, 0))

    def close(self) -> None:
        for ch in self.channels:
            ch.asr.release()
        self.ring.close()
