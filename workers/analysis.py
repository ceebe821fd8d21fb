"""What a dialer wants from a call besides its words: answering-machine detection, beeps
and call-progress tones, and intents. One :class:`CallAnalysis` per call, fed by the
worker's :class:`~workers.call.CallSession` with what it already has for the caller's
channel: the input audio (tones), each VAD frame's voicing (AMD cadence) and the
recognizer's partials and finals (AMD phrases, intents).

What a call gets is asked for with the call (:func:`options_for`): in mod_audio_stream's
metadata or URL query, or as ``farm_*`` channel variables of a mod_socket_audio call::

    amd      true | false | {"greeting_ms": 1200, "phrases": [...], ...}  (AmdConfig fields
             or amd.conf's names; --amd all turns it on for every call)
    tones    true | false   (--tones, default on: every call)
    intents  NAME (a set of the --intents directory) | {inline rules, farm/intents.py}
             | false   (--intents FILE: every call; a directory's "default" set likewise)

A bad option is an ``error`` event for the call, which goes on without that part (not
with the node's settings for it: the call asked for other ones).

Events (offsets are audio time from the start of the stream, i.e. from answer):

- ``amd``: result human|machine|unknown, reason, decision_ms, features (workers/amd.py).
- ``beep``: start_ms, end_ms (the moment to start a voicemail drop), freq_hz, level_dbfs.
- ``tone``: kind sit|busy|reorder|fax_cng|fax_ced, with the same members.
- ``intent``: intent, matched, source "rules", early (fired on a stable partial), also,
  revised (a final that overrides an early intent).
- with ``--llm-url``, a final no rule reported (:meth:`CallAnalysis.ask_llm`) carries
  ``llm_intent: true``: the ingress asks the LLM and publishes its ``intent`` (source
  "llm") after the final (farm/ingress/llm_intents.py). Never here: a worker's loop is
  the calls' media path.

A worker that takes a call over from another (a move, a crash) starts no AMD for it:
the answer's cadence is behind it. It still detects tones and matches intents.

The tone detector's cost is mostly per feed (workers/tones.py: ~30 us a frame fed 20 ms
at a time, ~9 us in 100 ms blocks), so the audio is fed ``TONE_BLOCK_MS`` at a time: a
tone's event, and an AMD decision (whose cadence waits for the frames' tonal flags,
amd.py rule 10), come up to that much later; their times (``end_ms``, where a beep ends)
are as exact as before.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from farm.call_options import call_metadata, call_option
from farm.config import Config
from farm.intents import IntentLibrary, IntentMatcher, IntentRules
from workers.amd import AmdConfig, AmdDecider, AmdDecision
from workers.tones import ToneDetector, ToneEvent


__all__ = ["Found", "Options", "node_amd_config", "options_for", "CallAnalysis"]

# (event type, offset_ms, data): what the session turns into an event.
Found = tuple[str, int, dict[str, Any]]

TONE_BLOCK_MS = 100  # audio fed to the tone detector at a time (see the module docstring)


def node_amd_config(config: Config) -> AmdConfig:
    """``--amd-params`` as an AmdConfig; raises ValueError naming what is wrong."""
    try:
        params = json.loads(config.amd_params or "{}")
    except ValueError as exc:
        raise ValueError(f"amd_params is not JSON ({exc})") from None
    if not isinstance(params, dict):
        raise ValueError(f"amd_params must be a JSON object, got {config.amd_params[:40]!r}")
    try:
        return AmdConfig.from_mapping(params)
    except ValueError as exc:
        raise ValueError(f"amd_params: {exc}") from None


@dataclass(frozen=True)
class Options:
    """What one call asked for (None / False: not that part)."""

    amd: AmdConfig | None = None
    tones: bool = True
    intents: IntentRules | None = None
    amd_on_request: AmdConfig = AmdConfig()  # the node's settings, for the amd command
    llm: bool = False  # --llm-url: finals no rule matched go to the ingress's LLM fallback


def options_for(
    info: Mapping[str, Any], config: Config, library: IntentLibrary, node_amd: AmdConfig
) -> tuple[Options, list[str]]:
    """The call's options, and what was wrong with the ones it sent (each an error message)."""
    metadata = call_metadata(info)
    errors: list[str] = []

    amd: AmdConfig | None = node_amd if config.amd == "all" else None
    try:
        asked = call_option(metadata, "amd")
        if isinstance(asked, Mapping):
            amd = AmdConfig.from_mapping(asked, over=node_amd)
        elif asked is True:
            amd = node_amd
        elif asked is False:
            amd = None
        elif asked is not None:
            raise ValueError(f"must be true, false or an object, got {str(asked)[:40]!r}")
    except ValueError as exc:
        errors.append(f"amd: {exc}")
        amd = None  # not the node's settings either: the call asked for others

    tones = config.tones
    try:
        asked = call_option(metadata, "tones")
        if isinstance(asked, bool):
            tones = asked
        elif asked is not None:
            raise ValueError(f"must be true or false, got {str(asked)[:40]!r}")
    except ValueError as exc:
        errors.append(f"tones: {exc}")

    try:
        intents = library.for_call(call_option(metadata, "intents"))
    except ValueError as exc:  # IntentsError included
        errors.append(f"intents: {exc}")
        intents = None  # not the node's default either: its campaign's intents are others
    return Options(amd, tones or amd is not None, intents, node_amd, bool(config.llm_url)), errors


class CallAnalysis:
    """AMD, tones and intents of one call's caller channel (see the module docstring)."""

    def __init__(
        self, rate: int, options: Options, start_ms: int, resumed: bool, *, tone_block_ms: int = TONE_BLOCK_MS
    ) -> None:
        self.tones = ToneDetector(rate, start_ms=start_ms) if options.tones else None
        self.tone_block = rate * tone_block_ms // 1000  # samples
        self.unfed: list[np.ndarray] = []  # audio the tone detector has not had yet
        self.unfed_samples = 0
        self.amd_frames: deque[tuple[int, bool]] = deque()  # VAD frames AMD waits on their tonal flag for
        self.amd = AmdDecider(options.amd) if options.amd is not None and not resumed else None
        self.intents = IntentMatcher(options.intents) if options.intents is not None else None
        self.llm = options.llm
        self.offset_ms = start_ms  # end of the audio seen
        self.amd_from_ms = 0  # where AMD's "answer" is: 0, or where the amd command put it

    def start_amd(self, at_ms: int, config: AmdConfig) -> bool:
        """The amd command: the call was answered at ``at_ms``; decide from there (offsets
        seen by the decider count from it). False if the call runs or ran AMD already."""
        if self.amd is not None:
            return False
        self.amd, self.amd_from_ms = AmdDecider(config), at_ms
        return True

    @property
    def deciding(self) -> bool:
        """AMD has not decided yet: the call should stay on this worker until it has."""
        return self.amd is not None and self.amd.decision is None

    def on_audio(self, samples: np.ndarray) -> list[Found]:
        """The caller's input-rate audio, before the VAD frames made of it."""
        if self.tones is None or not len(samples):
            return []
        self.unfed.append(samples)
        self.unfed_samples += len(samples)
        return self._feed_tones() if self.unfed_samples >= self.tone_block else []

    def on_frame(self, offset_ms: int, voiced: bool) -> list[Found]:
        """One 20 ms VAD frame; ``voiced`` is webrtcvad's flag (False while it settles)."""
        self.offset_ms = offset_ms + 20
        if self.amd is None or self.amd.decision is not None or offset_ms < self.amd_from_ms:
            return []
        if self.tones is None:
            return self._amd(self.amd.on_frame(offset_ms - self.amd_from_ms, voiced, False))
        self.amd_frames.append((offset_ms, voiced))
        return self._amd_frames_until(self.tones.analysed_ms)

    def _feed_tones(self) -> list[Found]:
        assert self.tones is not None
        block = np.concatenate(self.unfed) if len(self.unfed) > 1 else self.unfed[0]
        self.unfed.clear()
        self.unfed_samples = 0
        events = self.tones.feed(block)
        # AMD's frames up to where the detector got first: a tone's decision time is then
        # where its event really came, not before the frames ahead of it.
        return self._amd_frames_until(self.tones.analysed_ms) + self._tones(events)

    def _amd_frames_until(self, analysed_ms: int) -> list[Found]:
        """AMD's waiting frames that the tone detector has analysed (or all: ``analysed_ms`` past them)."""
        found: list[Found] = []
        frames, tones = self.amd_frames, self.tones
        while frames and frames[0][0] + 20 <= analysed_ms:
            offset_ms, voiced = frames.popleft()
            tonal = tones is not None and tones.is_tonal(offset_ms)  # not a word (amd.py rule 10)
            if self.amd is not None:
                found += self._amd(self.amd.on_frame(offset_ms - self.amd_from_ms, voiced, tonal))
        return found

    def ask_llm(self, text: str) -> bool:
        """Call right after :meth:`on_transcript` of a final: does the LLM fallback classify
        it? Only when the call has intents, no rule reported its utterance (neither early
        nor now) and it has words."""
        return self.llm and self.intents is not None and self.intents.unmatched and bool(text.strip())

    def on_transcript(self, offset_ms: int, text: str, final: bool) -> list[Found]:
        found: list[Found] = []
        if self.amd is not None and self.amd.decision is None and text:
            found += self._amd(self.amd.on_transcript(max(0, offset_ms - self.amd_from_ms), text, final))
        if self.intents is not None:
            match = self.intents.on_final(text) if final else self.intents.on_partial(text)
            if match is not None:
                found.append(("intent", offset_ms, match.to_dict()))
        return found

    def on_end(self) -> list[Found]:
        """The call's audio is over."""
        found: list[Found] = []
        if self.tones is not None:
            found += self._feed_tones() if self.unfed else []
            found += self._tones(self.tones.flush())
        found += self._amd_frames_until(self.offset_ms + 20)  # the last part frame is nobody's tone
        if self.amd is not None:
            found += self._amd(self.amd.on_end(self.offset_ms - self.amd_from_ms))
        return found

    def _amd(self, decision: AmdDecision | None) -> list[Found]:
        if decision is None:
            return []
        data = decision.to_dict()  # decision_ms: from the answer
        if self.amd_from_ms:
            data["from_ms"] = self.amd_from_ms  # the answer, by the amd command
        return [("amd", self.amd_from_ms + decision.decision_ms, data)]

    def _tones(self, events: list[ToneEvent]) -> list[Found]:
        found: list[Found] = []
        for tone in events:
            data = tone.to_dict()
            found.append(("beep" if tone.kind == "beep" else "tone", tone.end_ms, data))
            if self.amd is not None and tone.end_ms > self.amd_from_ms:
                start, end = max(0, tone.start_ms - self.amd_from_ms), tone.end_ms - self.amd_from_ms
                found += self._amd(self.amd.on_tone(tone.kind, start, end))
        return found
