"""One FreeSWITCH channel's state and data, for the peer that stands in for FreeSWITCH in tests.

Not FreeSWITCH: the channel of a SIP call as FreeSWITCH 1.10.12 describes it in its events
(PROTOCOLS.md §3.4, §7): states, answer and hang-up times, codec, ``Caller-*`` profile and
``variable_*`` headers. The headers come from a real event recorded on FreeSWITCH 1.10.12
(captures/freeswitch-1.10.12/socket_audio_sip_pcmu/events.jsonl, kept as bench/fs_channel.json)
with the uuid replaced. Nothing here does I/O or fires events: bench/fs_peer.py's call
changes the state and fires the events.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path


__all__ = ["PTIME_MS", "Channel", "channel_template"]

# The channel's packetization time: mod_socket_audio sends and plays one frame per ptime (§2.3, §2.4).
PTIME_MS = 20
# The recorded playback_start event of captures/freeswitch-1.10.12/socket_audio_sip_pcmu
# (copied in tests/captures/), kept beside the peer so the bench runs without the tests.
_TEMPLATE_PATH = Path(__file__).parent / "fs_channel.json"


def channel_template() -> tuple[str, list[tuple[str, str]]]:
    """(uuid, channel headers) of a real SIP PCMU channel recorded on FreeSWITCH 1.10.12.

    The headers are those ``switch_channel_event_set_data`` adds (``Channel-State`` through
    the last ``variable_*``), taken from the recorded ``playback_start`` event.
    """
    event = json.loads(_TEMPLATE_PATH.read_text())
    names = list(event)
    start = names.index("Channel-State")
    return event["Unique-ID"], [(n, str(event[n])) for n in names[start:]]


class Channel:
    """A channel's state (``state``, ``call_state``, answered / hung up) and its event data.

    Args:
        uuid: the channel's Unique-ID.
        rate: the session codec rate (8000: PCMU; others: L16).
        variables: extra channel variables (``variable_<name>`` headers).
        answered: start answered (else ringing until :meth:`answer`).

    Times (µs since the epoch, as FreeSWITCH writes them): ``answered_us``, ``hangup_us``.
    """

    def __init__(
        self, uuid: str, *, rate: int = 8000, variables: Mapping[str, str] | None = None, answered: bool = False
    ) -> None:
        self.uuid = uuid
        self.rate = rate
        self.answered = answered
        self.hung_up = False
        self.hangup_cause: str | None = None
        self.state = "CS_EXECUTE"
        self.call_state = "ACTIVE" if answered else "RINGING"
        self.answered_us = time.time_ns() // 1000 if answered else 0
        self.hangup_us = 0
        template_uuid, template = channel_template()
        self._fixed = [(n, v.replace(template_uuid, uuid)) for n, v in template if not n.startswith("variable_")]
        self.variables: dict[str, str] = {
            n[len("variable_") :]: v.replace(template_uuid, uuid) for n, v in template if n.startswith("variable_")
        }
        for name in ("current_application", "current_application_data"):
            self.variables.pop(name, None)
        codec, bits = ("PCMU", "64000") if rate == 8000 else ("L16", str(rate * 16))
        for name, value in (("read_codec", codec), ("original_read_codec", codec), ("write_codec", codec)):
            self.variables[name] = value
        for name in ("read_rate", "original_read_rate", "write_rate", "rtp_use_codec_rate"):
            self.variables[name] = str(rate)
        self._codec = (codec, str(rate), bits)
        for name, value in (variables or {}).items():
            self.set_variable(name, value)

    def set_variable(self, name: str, value: str) -> None:
        """switch_channel_set_variable: a (re)set variable moves to the end of the list."""
        self.variables.pop(name, None)
        self.variables[name] = value

    def answer(self) -> bool:
        """Mark the channel answered; False if it already was (no CHANNEL_ANSWER then)."""
        if self.answered:
            return False
        self.answered = True
        self.call_state = "ACTIVE"
        self.answered_us = time.time_ns() // 1000
        return True

    def hang_up(self, cause: str) -> None:
        """switch_channel_perform_hangup's marks, before CHANNEL_HANGUP is fired."""
        self.hung_up = True
        self.hangup_cause = cause
        self.call_state = "HANGUP"
        self.hangup_us = time.time_ns() // 1000

    @property
    def name(self) -> str:
        return dict(self._fixed).get("Channel-Name", "")

    def data(self) -> list[tuple[str, str]]:
        """switch_channel_event_set_data: basic data, Caller-* profile, then variable_*."""
        answer_state = "hangup" if self.hung_up else "answered" if self.answered else "ringing"
        state_number = {"CS_EXECUTE": "4", "CS_HANGUP": "10", "CS_REPORTING": "11"}[self.state]
        codec, rate, bits = self._codec
        out: list[tuple[str, str]] = []
        for name, value in self._fixed:
            if name == "Channel-State":
                value = self.state
            elif name == "Channel-Call-State":
                value = self.call_state
            elif name == "Channel-State-Number":
                value = state_number
            elif name in ("Channel-Read-Codec-Name", "Channel-Write-Codec-Name"):
                value = codec
            elif name in ("Channel-Read-Codec-Rate", "Channel-Write-Codec-Rate"):
                value = rate
            elif name in ("Channel-Read-Codec-Bit-Rate", "Channel-Write-Codec-Bit-Rate"):
                value = bits
            elif name == "Caller-Channel-Answered-Time":
                value = str(self.answered_us)
            elif name == "Caller-Channel-Hangup-Time":
                value = str(self.hangup_us)
            out.append((name, value))
            if name == "Answer-State":
                out[-1] = (name, answer_state)
                if self.hangup_cause and self.state != "CS_REPORTING":
                    out.append(("Hangup-Cause", self.hangup_cause))
        out += [(f"variable_{n}", v) for n, v in self.variables.items()]
        return out
