"""Utterance segmentation: webrtcvad on 20 ms frames behind a hysteresis state machine.

Sans-I/O: the caller feeds 20 ms frames and gets decisions back; the Vad keeps
no audio and reads no clock. Positions are frame indices since creation (x 20 ms).

webrtcvad pads every voiced run with its own hangover (4-6 frames in modes 2-3,
5-8 in modes 0-1) and flags ~5 frames at any noise onset. So a 20 ms click reads
as ~100 ms of voicing and passes a 60 ms onset (use onset_ms >= 120 or the
`short` flag), and SpeechEnd.frame lands ~100 ms after the speech really stops.
"""

from __future__ import annotations


__all__ = [
    "SILENCE",
    "SPEECH",
    "SpeechEnd",
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

    VOICED = "voiced"
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
            recogniser hears the first phoneme (the Vad keeps no audio).
        min_speech_ms: utterances shorter than this (start to end) are flagged
            `short=True` in their SpeechEnd; 0 flags nothing.

    Raises:
        ValueError: on any invalid value; the message carries the numbers.
    """

    aggressiveness: int = 2
    onset_ms: int = 60
    onset_window_ms: int = 100
    hangover_ms: int = 300
    preroll_ms: int = 300
    min_speech_ms: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.aggressiveness <= 3:
            raise ValueError(f"aggressiveness must be 0..3, got {self.aggressiveness}")
        for name in ("onset_ms", "onset_window_ms", "hangover_ms", "preroll_ms", "min_speech_ms"):
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
    """Speech began. Start sending audio from `frame` (minus the preroll) to the recogniser.

    Attributes:
        frame: index of the first voiced frame of the onset window (utterance start).
        decided_frame: index of the frame whose arrival made the decision.
    """

    frame: int
    decided_frame: int


@dataclass(frozen=True)
class SpeechEnd:
    """Speech ended. Finalise the recogniser; drop the utterance if `short` and unwanted.

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


VadEvent: TypeAlias = SpeechStart | SpeechEnd


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
        self._webrtc = webrtcvad.Vad(config.aggressiveness)
        self._state = SILENCE
        self._frames = 0
        self._onset_voiced: deque[int] = deque()  # indices of voiced frames in the onset window
        self._start = 0  # SpeechStart.frame of the current utterance (valid in SPEECH)
        self._last_voiced = 0  # index of the latest voiced frame (valid in SPEECH)
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
            SpeechStart or SpeechEnd when this frame decides one, else None.

        Raises:
            ValueError: if `frame` is not exactly `frame_bytes` long (nothing is counted).
        """
        voiced = self.is_voiced(frame)
        self._frames += 1
        return self._step(_Input.VOICED if voiced else _Input.UNVOICED)

    def flush(self) -> SpeechEnd | None:
        """Call at end of stream (hangup). Returns the SpeechEnd of an open utterance, else None.

        The utterance ends just after its last voiced frame, as a hangover end would.
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
        so the hangover only counts unvoiced frames after it.
        """
        self._resume_at = onset_frame
        self._step(_Input.RESUME)

    # ---- State machine: the only code that changes self._state. -------------
    # SILENCE + voiced:   note it, forget voiced frames older than the onset window; once
    #                     onset_frames remain -> SPEECH, emit SpeechStart(frame = oldest of them).
    # SILENCE + unvoiced: nothing (the window is pruned by index on the next voiced frame).
    # SILENCE + flush/reset: clear the window, so no onset spans the break.
    # SPEECH + voiced:    note it as the last voiced frame.
    # SPEECH + unvoiced:  after hangover_frames unvoiced in a row -> SILENCE, emit
    #                     SpeechEnd(frame = last voiced + 1). SPEECH + flush: the same, at once.
    # SPEECH + reset:     -> SILENCE, no event.
    # SILENCE + resume:   -> SPEECH, no event, onset (and last voiced frame) at the given frame.
    def _step(self, event: _Input) -> VadEvent | None:
        now = self._frames - 1  # index of the latest frame processed
        if self._state is SPEECH:
            if event is _Input.VOICED:
                self._last_voiced = max(self._last_voiced, now)
                self._voiced += 1
                return None
            if event is _Input.UNVOICED and now - self._last_voiced < self._hangover_frames:
                return None
            self._state = SILENCE
            if event is _Input.RESET:
                return None
            end = self._last_voiced + 1
            duration = end - self._start
            return SpeechEnd(end, now, duration, duration < self._min_speech_frames)
        if event is _Input.VOICED:
            voiced = self._onset_voiced
            voiced.append(now)
            while voiced[0] <= now - self._window_frames:  # never empties: `now` stays
                voiced.popleft()
            if len(voiced) >= self._onset_frames:
                self._state = SPEECH
                self._start = voiced[0]
                self._last_voiced = now
                self._voiced = len(voiced)
                voiced.clear()
                return SpeechStart(self._start, now)
        elif event is _Input.RESUME:
            self._state = SPEECH
            self._start = self._last_voiced = self._resume_at
            self._voiced = 0  # the predecessor's count is lost; barge-in counts afresh
            self._onset_voiced.clear()
        elif event is not _Input.UNVOICED:
            self._onset_voiced.clear()
        return None
