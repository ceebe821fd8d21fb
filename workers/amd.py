"""Answering-machine detection: one human / machine / unknown decision per answered call.

Sans-I/O and clock-free: the caller feeds what it already has for the call, each with
its audio offset in ms from answer, and gets at most one :class:`AmdDecision` back, as
early as the rules below allow. Nothing here reads audio, a clock or a socket.

Inputs (any mix, in audio order):

- ``on_frame(offset_ms, voiced, tonal=False)``: one call per 20 ms frame with the VAD's
  per-frame voiced flag (webrtcvad's ``Vad.is_voiced``), the input of the cadence
  rules, and whether the tone detector found the frame tonal
  (``workers.tones.ToneDetector.is_tonal``; see rule 10);
- ``on_transcript(offset_ms, text, final)``: Vosk partial or final text;
- ``on_tone(kind, start_ms, end_ms)``: a tone detector's result (``kind`` one of
  beep, sit, busy, reorder, fax_cng, fax_ced);
- ``on_end(offset_ms)``: the call or its audio ended.

Cadence rules (from Asterisk's app_amd.c ``isAnsweringMachine``; its names in brackets).
A frame is *silence* when it is not voiced; *silence* below is the current run of
unvoiced frames, *voice* the total voiced time since answer, a *word* a run of voiced
frames of at least ``min_word_ms`` entered from silence, where silence means at least
``between_words_silence_ms`` of it (a shorter gap does not split a word):

1. total_analysis: the frame that brings the analysed time to ``total_analysis_ms`` ->
   unknown ``too_long`` (NOTSURE / TOOLONG); it is checked before the frame's analysis.
2. initial silence: no word yet and silence >= ``initial_silence_ms`` -> machine
   ``initial_silence`` (INITIALSILENCE). Asterisk's reason: a human says something
   when they pick up; a machine is slow to start its greeting.
3. after-greeting silence: a word was heard and silence >= ``after_greeting_silence_ms``
   -> human ``after_greeting_silence`` (HUMAN). Since rules 4-6 ended the analysis
   had the greeting been long, reaching this means a short greeting then a pause: a
   person waiting for the other side to speak.
4. maximum word length: one voiced run >= ``max_word_ms`` -> machine ``max_word_length``
   (MAXWORDLENGTH).
5. maximum words: words >= ``max_words`` -> machine ``max_words`` (MAXWORDS).
6. long greeting: a word was heard and voice >= ``greeting_ms`` -> machine
   ``long_greeting`` (LONGGREETING). Voice is all voiced time since answer, as in
   Asterisk, not only the first word's.

Rules 4-6 are checked on voiced frames in that order, 2-3 on unvoiced ones, as
Asterisk does. Where Asterisk measures silence with an energy threshold
(``silence_threshold`` 256) this takes the caller's VAD flag, so noise and hangover
handling are the VAD's. The caller should not pass the first ~100 ms of a fresh
webrtcvad as voiced (it flags any noise onset; the worker holds its first onset
window for that reason).

Transcript rules (ours, after jambonz' ``amd`` verb, which counts the greeting's words):

7. phrase: the text, normalised (NFKC, case-folded, everything but letters and digits
   removed, so Vosk's varying Korean spacing does not matter), contains a normalised
   voicemail phrase of ``phrases`` -> machine ``phrase``. Partials count: a phrase is
   decided the moment it is recognized.
8. transcript words: a partial or final with >= ``machine_words`` words (jambonz'
   threshold, default 9) -> machine ``transcript_words``.

Tone rules (ours; Asterisk has none, dialers pair it with a beep detector, carriers
report fax separately):

9. beep undecided -> machine ``beep``; fax_cng or fax_ced -> machine ``fax``; sit, busy
   or reorder -> unknown with that reason (the dialer marks the number, not a person).
   A tone is decisive whenever it comes before a decision: a beep after a short
   prompt ("leave a message", then the beep) is a machine, whatever the cadence made
   of the prompt so far.
10. Tonal frames are neither voice nor silence: a frame passed with ``tonal=True`` only
    advances the analysed time, as a lost frame does, and voiced frames within
    ``TONE_TAIL_MS`` after a tonal run of at least ``min_word_ms`` are the VAD's hangover
    of that tone (webrtcvad pads every voiced run with 4-6 frames in modes 2-3), not a
    word. A tone is no greeting and no pause after one; rule 9 judges it once the
    detector has reported it, which takes time (a beep ~40 ms after its end, busy ~1.9 s,
    CED 2 s). Counted as voice, a busy tone makes words (max_words: machine); counted as
    silence, the beep after a short prompt completes its after-greeting silence (human)
    before it is reported, and a fax CED runs into the initial silence. Tonal runs
    shorter than a word leave the voicing after them alone: a nasal murmur in speech can
    read tonal for a frame or a few.
11. A beep that comes after a machine decision, within ``wait_for_beep_ms`` of it, is
    not a second decision: it is kept in :attr:`AmdDecider.beep` (the moment to start a
    voicemail drop is its ``end_ms``), and :meth:`AmdDecider.wants_beep` tells the
    caller whether to keep its beep detector running. jambonz keeps a separate tone
    timer for this; the 20 s default here is ours (long enough for a greeting that was
    called a machine 1.5 s in and speaks up to ~15 s more before its beep).

End (Asterisk's HANGUP, ours in detail):

12. ``on_end`` with no decision -> unknown ``hangup``.

Exactly one decision per call: once decided, every ``on_*`` returns None and
:attr:`AmdDecider.decision` keeps the first one. A decision's ``decision_ms`` is the
offset at which it could be made: the end of the deciding frame, the transcript's
offset, or for a tone the later of its end and the last frame seen. Each frame stands
for 20 ms: a gap in the offsets (frames lost) advances the analysed time towards
``total_analysis_ms`` but counts as neither voice nor silence.
"""

from __future__ import annotations


__all__ = [
    "AMD_RESULTS",
    "DEFAULT_PHRASES",
    "FRAME_MS",
    "TONE_KINDS",
    "TONE_TAIL_MS",
    "AmdBeep",
    "AmdConfig",
    "AmdDecider",
    "AmdDecision",
    "normalise",
]

import dataclasses
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final


FRAME_MS: Final = 20  # what one on_frame call stands for
TONE_TAIL_MS: Final = 120  # voicing this soon after a tone is the VAD's hangover of it (rule 10)
AMD_RESULTS: Final = ("human", "machine", "unknown")
TONE_KINDS: Final = ("beep", "sit", "busy", "reorder", "fax_cng", "fax_ced")

# Korean voicemail and carrier phrases (normal spelling, as Vosk writes them), then English.
DEFAULT_PHRASES: Final[tuple[str, ...]] = (
    "음성 사서함",
    "음성 메시지",
    "삐 소리",
    "메시지를 남겨",
    "메세지를 남겨",
    "연결이 되지 않아",
    "전화를 받을 수 없",
    "고객님의 전화",
    "부재중",
    "녹음을 마치",
    "leave a message",
    "after the tone",
    "after the beep",
    "not available",
    "voicemail",
    "voice mail",
    "mailbox",
)

# amd.conf's names, accepted by from_mapping next to the field names.
_ASTERISK_NAMES: Final = {
    "initial_silence": "initial_silence_ms",
    "greeting": "greeting_ms",
    "after_greeting_silence": "after_greeting_silence_ms",
    "total_analysis_time": "total_analysis_ms",
    "min_word_length": "min_word_ms",
    "between_words_silence": "between_words_silence_ms",
    "maximum_number_of_words": "max_words",
    "maximum_word_length": "max_word_ms",
}


def normalise(text: str) -> str:
    """NFKC, case-folded, letters and digits only: how texts and phrases are compared."""
    return "".join(c for c in unicodedata.normalize("NFKC", text).casefold() if c.isalnum())


@dataclass(frozen=True)
class AmdConfig:
    """Tuning for one decider; Asterisk's amd.conf defaults. Validated on creation.

    Attributes:
        initial_silence_ms: silence from answer with no word yet that means a machine.
        greeting_ms: voiced time (since answer) past which the greeting is a machine's.
        after_greeting_silence_ms: silence after a short greeting that means a human.
        total_analysis_ms: audio analysed before giving up with unknown ``too_long``.
        min_word_ms: shortest voiced run that counts as a word.
        between_words_silence_ms: shortest silence that ends a word.
        max_words: words that mean a machine.
        max_word_ms: longest single voiced run a human says (longer: machine).
        machine_words: transcript words in the greeting that mean a machine (jambonz).
        phrases: voicemail phrases; a text containing one means a machine. The
            constructor takes them as given; ``from_mapping`` adds its ``phrases`` to
            the defaults.
        wait_for_beep_ms: after a machine decision, how long a beep is still taken as
            the greeting's (see AmdDecider.beep); 0 keeps none.

    Raises:
        ValueError: on a bad value; the message names the field and the value.
    """

    initial_silence_ms: int = 2500
    greeting_ms: int = 1500
    after_greeting_silence_ms: int = 800
    total_analysis_ms: int = 5000
    min_word_ms: int = 100
    between_words_silence_ms: int = 50
    max_words: int = 3
    max_word_ms: int = 5000
    machine_words: int = 9
    phrases: tuple[str, ...] = DEFAULT_PHRASES
    wait_for_beep_ms: int = 20000
    _normalised: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name.startswith("_") or f.name == "phrases":
                continue
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{f.name} must be an integer, got {value!r}")
            least = 0 if f.name in ("between_words_silence_ms", "wait_for_beep_ms") else 1
            if value < least:
                raise ValueError(f"{f.name} must be >= {least}, got {value}")
        if isinstance(self.phrases, str) or not all(isinstance(p, str) for p in self.phrases):
            raise ValueError(f"phrases must be a sequence of strings, got {self.phrases!r}")
        normalised = tuple(normalise(p) for p in self.phrases)
        for phrase, norm in zip(self.phrases, normalised, strict=True):
            if not norm:
                raise ValueError(f"phrases: {phrase!r} has no letters or digits")
        object.__setattr__(self, "phrases", tuple(self.phrases))
        object.__setattr__(self, "_normalised", normalised)

    @property
    def normalised_phrases(self) -> tuple[str, ...]:
        """The phrases as compared (see :func:`normalise`)."""
        return self._normalised

    @classmethod
    def from_mapping(cls, m: Mapping[str, object], over: AmdConfig | None = None) -> AmdConfig:
        """A config from JSON metadata or CLI options: ``over`` (the defaults if None)
        with the settings ``m`` gives.

        Keys are the field names or amd.conf's names (``initial_silence``,
        ``maximum_number_of_words``...); values must be integers (booleans are not),
        and ``phrases`` a list of strings, which extends ``over``'s phrases.

        Raises:
            ValueError: naming the key, on an unknown key, a wrong type or a bad value.
        """
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs: dict[str, object] = {}
        for key, value in m.items():
            name = _ASTERISK_NAMES.get(key, key)
            if name not in known:
                raise ValueError(f"unknown amd setting {key!r}")
            if name in kwargs:
                raise ValueError(f"amd setting {key!r} given twice")
            if name == "phrases":
                if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
                    raise ValueError(f"{key} must be a list of strings, got {type(value).__name__}")
                if not all(isinstance(p, str) for p in value):
                    raise ValueError(f"{key} must be a list of strings, got {value!r}")
                base = over.phrases if over is not None else DEFAULT_PHRASES
                extra = [p for p in value if p not in base]
                kwargs[name] = base + tuple(dict.fromkeys(extra))
            elif not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{key} must be an integer, got {type(value).__name__} {value!r}")
            else:
                kwargs[name] = value
        try:
            if over is not None:
                return dataclasses.replace(over, **kwargs)  # type: ignore[arg-type]
            return cls(**kwargs)  # type: ignore[arg-type]
        except ValueError as e:
            message = str(e)
            for key in m:  # name the key as the caller spelled it
                name = _ASTERISK_NAMES.get(key, key)
                if key != name and message.startswith(name):
                    message = key + message[len(name) :]
            raise ValueError(message) from None


@dataclass(frozen=True)
class AmdDecision:
    """The call's one AMD result.

    Attributes:
        result: "human", "machine" or "unknown".
        reason: the rule that decided it (see the module docstring).
        decision_ms: audio offset from answer at which it was decided.
        features: what decided it: initial_silence_ms, greeting_ms (voiced time),
            words, silence_after_ms, and where they decided, transcript_words, phrase,
            text, tone (kind, start_ms, end_ms).
    """

    result: str
    reason: str
    decision_ms: int
    features: Mapping[str, object]

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict: result, reason, decision_ms and a plain features dict."""
        return {
            "result": self.result,
            "reason": self.reason,
            "decision_ms": self.decision_ms,
            "features": dict(self.features),
        }


@dataclass(frozen=True)
class AmdBeep:
    """A beep heard after a machine decision: start the voicemail drop at ``end_ms``."""

    start_ms: int
    end_ms: int


class AmdDecider:
    """One call's AMD state machine; create one per answered call. See the module docstring."""

    def __init__(self, config: AmdConfig = AmdConfig()) -> None:
        self._cfg = config
        self._decision: AmdDecision | None = None
        self._beep: AmdBeep | None = None
        self._now = 0  # end of the last frame fed, ms from answer
        self._silence = 0  # current unvoiced run, ms
        self._run = 0  # current voiced run (Asterisk's consecutiveVoiceDuration), ms
        self._voice = 0  # voiced time since answer (voiceDuration), ms
        self._words = 0
        self._in_word = False  # Asterisk's currentState == STATE_IN_WORD
        self._greeting = False  # a word was heard (inGreeting; not inInitialSilence)
        self._first_word_ms: int | None = None  # where the first word's run began
        self._transcript_words = 0
        self._tone_run = 0  # current run of tonal frames, ms
        self._tone_tail = 0  # ms left in which voicing is a tone's hangover

    @property
    def config(self) -> AmdConfig:
        return self._cfg

    @property
    def decision(self) -> AmdDecision | None:
        """The decision, once made; None before."""
        return self._decision

    @property
    def beep(self) -> AmdBeep | None:
        """The beep that decided the call, or came within wait_for_beep_ms of a machine decision."""
        return self._beep

    def wants_beep(self, offset_ms: int) -> bool:
        """Should the caller still look for a beep at this offset? Undecided or machine in the window."""
        d = self._decision
        if d is None:
            return True
        return d.result == "machine" and self._beep is None and offset_ms <= d.decision_ms + self._cfg.wait_for_beep_ms

    # ---- inputs ------------------------------------------------------------------

    def on_frame(self, offset_ms: int, voiced: bool, tonal: bool = False) -> AmdDecision | None:
        """Feed the VAD's flag for the 20 ms frame starting at ``offset_ms``, and whether
        the tone detector found it tonal (rule 10); frames in order."""
        if self._decision is not None:
            return None
        cfg = self._cfg
        end = offset_ms + FRAME_MS
        step = max(0, min(FRAME_MS, end - self._now))  # a repeated offset adds no time
        self._now = max(self._now, end)
        if self._now >= cfg.total_analysis_ms:
            return self._decide("unknown", "too_long", self._now)
        if tonal:
            self._tone_run += step
            if self._tone_run >= cfg.min_word_ms:
                self._tone_tail = TONE_TAIL_MS
            return None
        self._tone_run = 0
        if self._tone_tail:
            self._tone_tail = max(0, self._tone_tail - step) if voiced else 0
            if voiced:
                return None
        if not voiced:
            self._silence += step
            if self._silence >= cfg.between_words_silence_ms:
                self._in_word = False
                self._run = 0
            if not self._greeting and self._silence >= cfg.initial_silence_ms:
                return self._decide("machine", "initial_silence", self._now)
            if self._greeting and self._silence >= cfg.after_greeting_silence_ms:
                return self._decide("human", "after_greeting_silence", self._now)
            return None
        self._silence = 0
        self._run += step
        self._voice += step
        if self._run >= cfg.min_word_ms and not self._in_word:
            self._words += 1
            self._in_word = True
            if not self._greeting:
                self._greeting = True
                self._first_word_ms = self._now - self._run
        if self._run >= cfg.max_word_ms:
            return self._decide("machine", "max_word_length", self._now, word_ms=self._run)
        if self._words >= cfg.max_words:
            return self._decide("machine", "max_words", self._now)
        if self._greeting and self._voice >= cfg.greeting_ms:
            return self._decide("machine", "long_greeting", self._now)
        return None

    def on_transcript(self, offset_ms: int, text: str, final: bool) -> AmdDecision | None:
        """Feed a recognizer's partial or final text heard by ``offset_ms``."""
        if self._decision is not None:
            return None
        norm = normalise(text)
        words = len(text.split())
        self._transcript_words = max(self._transcript_words, words)
        when = max(offset_ms, self._now)
        for phrase, key in zip(self._cfg.phrases, self._cfg.normalised_phrases, strict=True):
            if key in norm:
                return self._decide("machine", "phrase", when, phrase=phrase, text=text, final=final)
        if words >= self._cfg.machine_words:
            return self._decide("machine", "transcript_words", when, text=text, final=final)
        return None

    def on_tone(self, kind: str, start_ms: int, end_ms: int) -> AmdDecision | None:
        """Feed a tone detector's result. Raises ValueError on an unknown kind."""
        if kind not in TONE_KINDS:
            raise ValueError(f"tone kind must be one of {TONE_KINDS}, got {kind!r}")
        d = self._decision
        if d is not None:
            if kind == "beep" and self._beep is None and self.wants_beep(start_ms):
                self._beep = AmdBeep(start_ms, end_ms)
            return None
        tone = {"kind": kind, "start_ms": start_ms, "end_ms": end_ms}
        when = max(end_ms, self._now)
        if kind == "beep":
            self._beep = AmdBeep(start_ms, end_ms)
            return self._decide("machine", "beep", when, tone=tone)
        if kind in ("fax_cng", "fax_ced"):
            return self._decide("machine", "fax", when, tone=tone)
        return self._decide("unknown", kind, when, tone=tone)

    def on_end(self, offset_ms: int) -> AmdDecision | None:
        """The call or its audio ended at ``offset_ms``: unknown ``hangup`` if undecided."""
        if self._decision is not None:
            return None
        return self._decide("unknown", "hangup", max(offset_ms, self._now))

    # ---- the one decision ----------------------------------------------------------

    def _decide(self, result: str, reason: str, when: int, **extra: object) -> AmdDecision:
        first = self._first_word_ms
        features: dict[str, object] = {
            "initial_silence_ms": first if first is not None else self._now,
            "greeting_ms": self._voice,
            "words": self._words,
            "silence_after_ms": self._silence if self._greeting else 0,
            "transcript_words": self._transcript_words,
            "analysed_ms": self._now,
        }
        features.update(extra)
        self._decision = AmdDecision(result, reason, when, MappingProxyType(features))
        return self._decision
