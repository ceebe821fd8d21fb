"""Per-call conversation figures: what every dialer report wants, from a call's events.

Two places keep them, from what passes through them anyway (no audio is looked at twice):
the worker, for ``call_end``'s ``stats`` (its speech_start/speech_end, barge-in requests,
amd, intents, and playback from the ring's playing flag, read once per pump; a worker that
took the call over counts from where it started, ``from_ms``), and the ingress, for the
``stats`` command on a live call (the same events as relayed, barge-in cuts, and playback
from ``playback_stop``'s ``played_ms``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


__all__ = ["CallStats"]


@dataclass
class CallStats:
    """What the caller did, in audio time (ms from the start of the stream, i.e. answer)."""

    from_ms: int = 0  # where this worker started counting
    first_speech_ms: int | None = None  # the caller's first speech_start
    talk_ms: int = 0  # the caller's speech, summed over utterances
    utterances: int = 0
    longest_silence_ms: int = 0  # between the caller's utterances (and before the first)
    playback_ms: int = 0  # audio time during which farm was playing to the caller
    barge_ins: int = 0  # playback cuts the caller's speech asked for
    amd: str | None = None
    intents: list[str] = field(default_factory=list)
    _quiet_since: int | None = None  # end of the last utterance (or from_ms), while silent

    def __post_init__(self) -> None:
        self._quiet_since = self.from_ms

    def observe(self, type: str, channel: int, offset_ms: int, data: Mapping[str, Any]) -> None:
        """One event of the call, as published."""
        if channel != 0:
            return
        if type == "speech_start":
            if self.first_speech_ms is None:
                self.first_speech_ms = offset_ms
            if self._quiet_since is not None:
                self.longest_silence_ms = max(self.longest_silence_ms, offset_ms - self._quiet_since)
            self._quiet_since = None
        elif type == "speech_end":
            self.utterances += 1
            self.talk_ms += int(data.get("duration_ms", 0))
            self._quiet_since = offset_ms
        elif type in ("flush", "barge_in"):  # the worker's request (W_FLUSH); the ingress's cut
            self.barge_ins += 1
        elif type == "playback_stop":  # the ingress's view of playback
            self.playback_ms += int(data.get("played_ms", 0))
        elif type == "amd":
            self.amd = str(data.get("result"))
        elif type == "intent":
            self.intents.append(str(data.get("intent")))

    def played(self, ms: int) -> None:
        self.playback_ms += ms

    def summary(self, end_ms: int) -> dict[str, Any]:
        """The figures for ``call_end`` (``end_ms``: the call's audio length)."""
        longest = self.longest_silence_ms
        if self._quiet_since is not None:
            longest = max(longest, end_ms - self._quiet_since)
        return {
            "from_ms": self.from_ms,
            "first_speech_ms": self.first_speech_ms,
            "talk_ms": self.talk_ms,
            "utterances": self.utterances,
            "longest_silence_ms": longest,
            "playback_ms": self.playback_ms,
            "talk_to_playback": round(self.talk_ms / self.playback_ms, 3) if self.playback_ms else None,
            "barge_ins": self.barge_ins,
            "amd": self.amd,
            "intents": self.intents,
        }
