"""Utterance segmentation: webrtcvad on 20 ms frames behind a hysteresis state machine.

Sans-I/O: the caller feeds 20 ms frames and gets decisions back; the Vad keeps
no audio and reads no clock. Positions are frame indices since creation (x 20 ms).

webrtcvad pads every voiced run with its own hangover (4-6 frames in modes 2-3,
5-8 in modes 0-1), flags ~5 frames at any noise onset, and voices straight through
pauses of 150-200 ms. So a 20 ms click reads as ~100 ms of voicing and passes a 60 ms
onset (use onset_ms >= 120 or the `short` flag), and an end decided on its voicing
alone lands ~100 ms after the speech really stops.

The end is therefore decided on *loud* frames: a voiced frame extends the utterance
only when its energy is well above the call's noise floor and not far below the
utterance's loudest frame (``tail_margin_db``, ``tail_range_db``). Measured on the
committed pause fixtures and recordings, that finds the last spoken 20 ms exactly on
espeak speech and measures 150-300 ms pauses to within a frame, so the hangover can
be the longest pause a sentence may hold (320 ms bridges 300) with nothing added. An
utterance that never rises clearly above the floor (a quiet caller on a noisy line)
keeps webrtcvad's voicing as its end, as before.

Inside an utterance a quiet run of ``tentative_ms`` gives a :class:`SpeechPause` (the
caller may have finished: a recognizer can prepare its final now) and loud speech
after it a :class:`SpeechResume`; the hangover still decides the :class:`SpeechEnd`.
"""

from __future__ import annotations


__all__ = [
    "SILENCE",
    "SPEECH",
    "SpeechEnd",
    "SpeechPause",
    "SpeechResume",
    "SpeechStart",
    "Vad",
    "VadConfig",
    "VadEvent",
    "VadState",
]

from collections import deque
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Final, TypeAlias

import numpy as np
import webrtcvad  # ships no type information


_FRAME_MS: Final = 20
_RATES: Final = (8000, 16000, 32000, 48000)  # the only rates webrtcvad accepts


class VadState(IntEnum):
    """Where the Vad is: outside or inside an utterance."""

    SILENCE = 0
    SPEECH = 1


SILENCE: Final = VadState.SILENCE
SPEECH: Final = VadState.SPEECH


class _Input(Enum):
    """What can happen to the state machine; only `Vad._step` interprets these."""

    LOUD = "loud"  # voiced, and loud enough to be speech (see the module docstring)
    VOICED = "voiced"  # voiced by webrtcvad only: its padding, a breath, room noise
    UNVOICED = "unvoiced"
    FLUSH = "flush"
    RESET = "reset"
    RESUME = "resume"


@dataclass(frozen=True)
class VadConfig:
    """Tuning for one Vad. Build once per call leg (or share); validated on creation.

    Attributes:
        aggressiveness: webrtcvad mode, 0 (keeps most audio) to 3 (drops most).
        onset_ms: voiced audio needed within the onset window to declare speech start.
        onset_window_ms: sliding window for the onset decision; >= onset_ms.
        hangover_ms: continuous unvoiced audio needed to declare speech end.
        preroll_ms: audio the caller should keep before the onset so the
            recognizer hears the first phoneme (the Vad keeps no audio).
        min_speech_ms: utterances shorter than this (start to end) are flagged
            `short=True` in their SpeechEnd; 0 flags nothing.
        tail_margin_db: a voiced frame extends an utterance only if its energy is
            this far above the noise floor; 0 lets webrtcvad's voicing alone decide.
        tail_range_db: ... and no further than this below the utterance's loudest frame.
        tentative_ms: quiet audio inside an utterance that gives a SpeechPause; 0: never.

    Raises:
        ValueError: on any invalid value; the message carries the numbers.
    """

    aggressiveness: int = 2
    onset_ms: int = 60
    onset_window_ms: int = 100
    hangover_ms: int = 320
    preroll_ms: int = 300
    min_speech_ms: int = 0
    tail_margin_db: float = 9.0
    tail_range_db: float = 35.0
    tentative_ms: int = 160

    def __post_init__(self) -> None:
        if not 0 <= self.aggressiveness <= 3:
            raise ValueError(f"aggressiveness must be 0..3, got {self.aggressiveness}")
        if self.tail_margin_db < 0 or self.tail_range_db <= 0:
            raise ValueError(
                f"tail_margin_db must be >= 0 and tail_range_db > 0, got {self.tail_margin_db} and {self.tail_range_db}"
            )
        for name in ("onset_ms", "onset_window_ms", "hangover_ms", "preroll_ms", "min_speech_ms", "tentative_ms"):
            value: int = getattr(self, name)
            if value < 0 or value % _FRAME_MS:
                raise ValueError(f"{name} must be a non-negative multiple of 20 ms, got {value}")
        # Zero onset would start speech on silence; zero hangover would end it on a voiced frame.
        for name in ("onset_ms", "hangover_ms"):
            if getattr(self, name) < _FRAME_MS:
                raise ValueError(f"{name} must be at least 20 ms, got {getattr(self, name)}")
        if self.onset_window_ms < self.onset_ms:
            raise ValueError(f"onset_window_ms ({self.onset_window_ms}) must be >= onset_ms ({self.onset_ms})")


@dataclass(frozen=True)
class SpeechStart:
    """Speech began. Start sending audio from `frame` (minus the preroll) to the recognizer.

    Attributes:
        frame: index of the first voiced frame of the onset window (utterance start).
        decided_frame: index of the frame whose arrival made the decision.
    """

    frame: int
    decided_frame: int


@dataclass(frozen=True)
class SpeechEnd:
    """Speech ended. Finalise the recognizer; drop the utterance if `short` and unwanted.

    Attributes:
        frame: index just after the last voiced frame (exclusive end of speech).
        decided_frame: index of the last frame processed when the decision was made.
        duration_frames: `frame` minus the matching SpeechStart.frame.
        short: duration is below `VadConfig.min_speech_ms`.
    """

    frame: int
    decided_frame: int
    duration_frames: int
    short: bool


@dataclass(frozen=True)
class SpeechPause:
    """Quiet for `tentative_ms` inside an utterance: it may be over (the hangover decides).

    Attributes:
        frame: index just after the last loud frame, where the utterance would end.
        decided_frame: index of the frame that completed the quiet run.
    """

    frame: int
    decided_frame: int


@dataclass(frozen=True)
class SpeechResume:
    """Loud speech again after a SpeechPause, before the hangover ran out: same utterance.

    Attributes:
        frame: index of the loud frame.
    """

    frame: int


VadEvent: TypeAlias = SpeechStart | SpeechEnd | SpeechPause | SpeechResume


class _Level:
    """The call's noise floor and the utterance's peak, in dB, to tell loud frames (sans-I/O).

    The floor follows non-loud frames: down fast (a quieter frame is closer to the
    floor), up slowly (a rising noise level is followed within seconds, a quiet
    phoneme hardly moves it).
    """

    _DOWN = 0.3
    _UP = 0.01

    def __init__(self, margin_db: float, range_db: float) -> None:
        self.margin_db = margin_db
        self.range_db = range_db
        self.floor: float | None = None
        self.peak = -np.inf  # of the current utterance; -inf until it has a loud frame

    @staticmethod
    def energy_db(frame: bytes) -> float:
        x = np.frombuffer(frame, dtype="<i2").astype(np.float32)
        return float(10.0 * np.log10(float(x @ x) / max(len(x), 1) + 1.0))

    def loud(self, frame: bytes) -> bool:
        """Is this voiced frame loud? Non-loud frames teach the floor."""
        e = self.energy_db(frame)
        if self.floor is None:
            self.floor = e
        if e >= max(self.floor + self.margin_db, self.peak - self.range_db):
            self.peak = max(self.peak, e)
            return True
        self.quiet(e)
        return False

    def quiet(self, e: float) -> None:
        assert self.floor is not None
        self.floor += (self._DOWN if e < self.floor else self._UP) * (e - self.floor)

    def unvoiced(self, frame: bytes) -> None:
        e = self.energy_db(frame)
        if self.floor is None:
            self.floor = e
        self.quiet(e)


class Vad:
    """One caller's voice activity detector. Create one per call leg and feed it every frame.

    Args:
        rate: sample rate in Hz: 8000, 16000, 32000 or 48000 (else ValueError).
        config: tuning; see VadConfig.
    """

    FRAME_MS: Final = _FRAME_MS

    def __init__(self, rate: int, config: VadConfig = VadConfig()) -> None:
        if rate not in _RATES:
            raise ValueError(f"rate must be one of {_RATES}, got {rate}")
        self._rate = rate
        self._frame_bytes = rate // (1000 // _FRAME_MS) * 2  # int16 mono
        self._onset_frames = config.onset_ms // _FRAME_MS
        self._window_frames = config.onset_window_ms // _FRAME_MS
        self._hangover_frames = config.hangover_ms // _FRAME_MS
        self._min_speech_frames = config.min_speech_ms // _FRAME_MS
        self._preroll_frames = config.preroll_ms // _FRAME_MS
        self._tentative_frames = config.tentative_ms // _FRAME_MS
        self._webrtc = webrtcvad.Vad(config.aggressiveness)
        self._level = _Level(config.tail_margin_db, config.tail_range_db) if config.tail_margin_db else None
        self._state = SILENCE
        self._frames = 0
        self.voiced = False  # webrtcvad's flag for the last frame processed (AMD cadence reads it)
        self._onset_voiced: deque[int] = deque()  # indices of voiced frames in the onset window
        self._start = 0  # SpeechStart.frame of the current utterance (valid in SPEECH)
        self._last_loud = 0  # index of the latest loud frame (valid in SPEECH)
        self._paused = False  # a SpeechPause was given and no loud frame came since
        self._resume_at = 0  # onset frame given to resume_speech
        self._voiced = 0  # voiced frames in the current utterance (valid in SPEECH)

    @property
    def frame_bytes(self) -> int:
        """Size of the one frame `process` accepts: 20 ms of int16 LE mono."""
        return self._frame_bytes

    @property
    def preroll_frames(self) -> int:
        """Frames of audio the caller should keep to replay before SpeechStart.frame."""
        return self._preroll_frames

    @property
    def state(self) -> VadState:
        """SILENCE or SPEECH, as of the last frame processed."""
        return self._state

    @property
    def voiced_ms(self) -> int:
        """Voiced audio in the current utterance so far, onset included; 0 in SILENCE.

        Barge-in waits on this rather than on time since the onset: a cough is a
        few voiced frames followed by a hangover of silence.
        """
        return self._voiced * _FRAME_MS if self._state is SPEECH else 0

    @property
    def frames(self) -> int:
        """Frames processed since creation (not cleared by reset); the next frame's index."""
        return self._frames

    def is_voiced(self, frame: bytes) -> bool:
        """Raw webrtcvad decision for one frame, no hysteresis; `process` calls this.

        Calling it directly still advances webrtcvad's adaptive noise model.

        Raises:
            ValueError: if `frame` is not exactly `frame_bytes` long.
        """
        if len(frame) != self._frame_bytes:
            raise ValueError(f"frame must be {self._frame_bytes} bytes, got {len(frame)}")
        return bool(self._webrtc.is_speech(frame, self._rate))

    def process(self, frame: bytes) -> VadEvent | None:
        """Feed the next 20 ms frame, in order, for every frame of the call.

        Returns:
            The SpeechStart, SpeechPause, SpeechResume or SpeechEnd this frame decides, else None.

        Raises:
            ValueError: if `frame` is not exactly `frame_bytes` long (nothing is counted).
        """
        self.voiced = self.is_voiced(frame)
        kind = self._classify(frame, self.voiced)
        self._frames += 1
        return self._step(kind)

    def _classify(self, frame: bytes, voiced: bool) -> _Input:
        """LOUD, VOICED or UNVOICED (see the module docstring); keeps the level up to date."""
        level = self._level
        if level is None:
            return _Input.LOUD if voiced else _Input.UNVOICED
        if not voiced:
            level.unvoiced(frame)
            if self._state is SILENCE:
                level.peak = -np.inf  # the next utterance's peak starts with its onset
            return _Input.UNVOICED
        if level.loud(frame):
            return _Input.LOUD
        # Nothing loud in this utterance yet: the caller is quiet for this line, so
        # webrtcvad's voicing decides as it did before levels were looked at.
        return _Input.LOUD if self._state is SPEECH and level.peak == -np.inf else _Input.VOICED

    def flush(self) -> SpeechEnd | None:
        """Call at end of stream (hangup). Returns the SpeechEnd of an open utterance, else None.

        The utterance ends just after its last loud frame, as a hangover end would.
        """
        event = self._step(_Input.FLUSH)
        assert event is None or isinstance(event, SpeechEnd)  # only SILENCE->SPEECH starts
        return event

    def reset(self) -> None:
        """Call to abandon the current utterance (e.g. barge-in handled elsewhere).

        Returns to SILENCE without an event. The frame counter keeps running so
        indices stay call-relative, and webrtcvad's noise model is kept because
        a fresh one misreads the first ~100 ms of any noise as speech.
        """
        self._step(_Input.RESET)

    def resume_speech(self, onset_frame: int) -> None:
        """Call before the first frame when taking over a call inside an utterance.

        Another worker already published that utterance's SpeechStart; this one
        enters SPEECH without an event, as if the onset had been at `onset_frame`,
        so the hangover only counts quiet frames after it.
        """
        self._resume_at = onset_frame
        self._step(_Input.RESUME)

    # ---- State machine: the only code that changes self._state. -------------
    # SILENCE + loud/voiced: note it, forget voiced frames older than the onset window; once
    #                     onset_frames remain -> SPEECH, emit SpeechStart(frame = oldest of them).
    # SILENCE + unvoiced: nothing (the window is pruned by index on the next voiced frame).
    # SILENCE + flush/reset: clear the window, so no onset spans the break.
    # SPEECH + loud:      note it as the last loud frame; after a SpeechPause, emit SpeechResume.
    # SPEECH + voiced/unvoiced (quiet): after tentative_frames quiet in a row emit SpeechPause
    #                     (once); after hangover_frames -> SILENCE, emit SpeechEnd(frame = last
    #                     loud + 1). A voiced frame still counts toward voiced_ms.
    # SPEECH + flush:     -> SILENCE, emit SpeechEnd at once. SPEECH + reset: -> SILENCE, no event.
    # SILENCE + resume:   -> SPEECH, no event, onset (and last loud frame) at the given frame.
    def _step(self, event: _Input) -> VadEvent | None:
        now = self._frames - 1  # index of the latest frame processed
        if self._state is SPEECH:
            if event is _Input.LOUD:
                self._last_loud = max(self._last_loud, now)
                self._voiced += 1
                if self._paused:
                    self._paused = False
                    return SpeechResume(now)
                return None
            if event is _Input.VOICED:
                self._voiced += 1
            if event is _Input.VOICED or event is _Input.UNVOICED:
                quiet = now - self._last_loud
                if quiet < self._hangover_frames:
                    if quiet == self._tentative_frames and not self._paused:
                        self._paused = True
                        return SpeechPause(self._last_loud + 1, now)
                    return None
            self._state = SILENCE
            self._paused = False
            if event is _Input.RESET:
                return None
            end = self._last_loud + 1
            duration = end - self._start
            return SpeechEnd(end, now, duration, duration < self._min_speech_frames)
        if event is _Input.LOUD or event is _Input.VOICED:
            voiced = self._onset_voiced
            voiced.append(now)
            while voiced[0] <= now - self._window_frames:  # never empties: `now` stays
                voiced.popleft()
            if len(voiced) >= self._onset_frames:
                self._state = SPEECH
                self._start = voiced[0]
                self._last_loud = now
                self._voiced = len(voiced)
                voiced.clear()
                return SpeechStart(self._start, now)
        elif event is _Input.RESUME:
            self._state = SPEECH
            self._start = self._last_loud = self._resume_at
            self._voiced = 0  # the predecessor's count is lost; barge-in counts afresh
            self._onset_voiced.clear()
        elif event is not _Input.UNVOICED:
            self._onset_voiced.clear()
        return None
