"""alphacep/vosk-server's WebSocket protocol on top of farm events: sans-I/O.

The WebSocket itself is the ``websockets`` library's job; this module decides what a
vosk-server client's messages mean and what farm answers, byte for byte as
vosk-server 0.3.x does (``websocket/asr_server.py`` at alphacep/vosk-server
c2e82f0; replies are vosk-api's own JSON):

- an optional text message ``{"config": {...}}`` sets ``sample_rate`` (default 8000),
  ``words`` (default on), ``max_alternatives`` (default 0) and ``phrase_list``; it
  gets no reply (asr_server.py:43-57). It counts only before the first audio, since
  vosk-server builds its recognizer from it then (:60-67);
- every binary message gets exactly one reply (:71-72): a result if an utterance
  ended since the previous reply, else ``{"partial": ...}``;
- ``{"eof" : 1}`` gets the final result, then the server closes normally (:14-15, 73);
- ``{"reset" : 1}`` gets the final result and the stream goes on (:16-17): like
  vosk-server's ``FinalResult()``, the utterance in progress ends there and its words
  are in the reply (the ingress waits for that final before answering).

vosk-server compares eof and reset as exact strings and hands anything else that
is not a config to the recognizer, which fails the connection; here any JSON
object with a true ``eof`` or ``reset`` member counts, and other text closes the
connection with a reason (:class:`VoskServerError`).

Replies are formatted as vosk-api's bundled SimpleJSON prints them (keys sorted,
two-space indent per level, ``" : "``, floats with six decimals), so clients that
compare strings, not only parsed JSON, see the same bytes.
"""

from __future__ import annotations

import enum
import json
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from farm.protocol.exceptions import CLOSE_INVALID, CLOSE_UNSUPPORTED, VoskServerError
from farm.protocol.pcm import SUPPORTED_RATES


__all__ = [
    "VoskConfig",
    "VoskServerError",
    "VoskSession",
    "Command",
    "CONFIG",
    "EOF",
    "RESET",
    "dump",
    "format_partial",
    "format_result",
    "EMPTY_RESULT",
    "CLOSE_INVALID",
    "CLOSE_UNSUPPORTED",
    "DEFAULT_RATE",
]

DEFAULT_RATE = 8000  # asr_server.py:97, VOSK_SAMPLE_RATE

# vosk-api returns these when nothing was decoded since the recognizer was created
# or last returned a result (recognizer.cc StoreEmptyReturn): compact, unlike the rest.
EMPTY_RESULT = '{"text": ""}'
EMPTY_ALTERNATIVES = '{"alternatives" : [{"text": "", "confidence" : 1.0}] }'


class Command(enum.IntEnum):
    """What a text message asks for."""

    CONFIG = 1
    EOF = 2
    RESET = 3


CONFIG = Command.CONFIG
EOF = Command.EOF
RESET = Command.RESET


@dataclass
class VoskConfig:
    """A connection's settings; vosk-server's defaults (asr_server.py:32-34, 97-99)."""

    sample_rate: int = DEFAULT_RATE
    words: bool = True  # bool(os.environ.get('VOSK_SHOW_WORDS', True)) is always true
    max_alternatives: int = 0
    phrase_list: list[Any] | None = None
    ignored: list[str] = field(default_factory=list)  # members farm accepted but cannot honour


def _rate(raw: Any) -> int:
    try:
        value = float(raw)  # vosk-server: float(jobj['sample_rate'])
        rate = int(value)
    except (TypeError, ValueError, OverflowError):
        raise VoskServerError(f"config sample_rate {str(raw)[:32]!r} is not a number") from None
    if rate != value or rate not in SUPPORTED_RATES:
        allowed = ", ".join(str(r) for r in SUPPORTED_RATES)
        raise VoskServerError(f"unsupported sample rate {str(raw)[:32]} (supported: {allowed})")
    return rate


def parse_config(obj: Any, base: VoskConfig) -> VoskConfig:
    """Apply a ``config`` object's members to ``base`` (asr_server.py:44-56)."""
    if not isinstance(obj, dict):
        raise VoskServerError("config is not a JSON object")
    cfg = VoskConfig(base.sample_rate, base.words, base.max_alternatives, base.phrase_list, list(base.ignored))
    if "sample_rate" in obj:
        cfg.sample_rate = _rate(obj["sample_rate"])
    if "words" in obj:
        cfg.words = bool(obj["words"])
    if "max_alternatives" in obj:
        try:
            cfg.max_alternatives = int(obj["max_alternatives"])
        except (TypeError, ValueError, OverflowError):
            bad = str(obj["max_alternatives"])[:32]
            raise VoskServerError(f"config max_alternatives {bad!r} is not a number") from None
        if cfg.max_alternatives < 0:
            raise VoskServerError(f"config max_alternatives {cfg.max_alternatives} is negative")
    if "phrase_list" in obj:
        cfg.phrase_list = obj["phrase_list"] if isinstance(obj["phrase_list"], list) else None
    known = ("sample_rate", "words", "max_alternatives")
    cfg.ignored += [k for k in obj if k not in known and k not in cfg.ignored]
    return cfg


def parse_text(text: str) -> tuple[Command, Any]:
    """Classify a text message: ``(CONFIG, config members)``, ``(EOF, None)`` or ``(RESET, None)``.

    Raises:
        VoskServerError: not JSON (code 1007), or JSON that is none of the three.
    """
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise VoskServerError(f"text message is not JSON: {exc}", CLOSE_INVALID) from None
    if not isinstance(obj, dict):
        raise VoskServerError("text message is not a JSON object", CLOSE_INVALID)
    if "config" in obj:
        return CONFIG, obj["config"]
    if obj.get("eof"):
        return EOF, None
    if obj.get("reset"):
        return RESET, None
    keys = ", ".join(sorted(obj))[:60]
    raise VoskServerError(f"text message is neither config, eof nor reset (members: {keys})")


# -- vosk-api's JSON printer ----------------------------------------------------------


def _escape(text: str) -> str:
    # SimpleJSON json_escape: these six and nothing else; UTF-8 stays as it is.
    return (
        text.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\b", "\\b")
        .replace("\f", "\\f")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )


def dump(value: Any, depth: int = 1) -> str:
    """``value`` as vosk-api's SimpleJSON ``dump()`` prints it (objects in key order)."""
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        pad = "  " * depth
        inner = ",\n".join(f'{pad}"{_escape(str(k))}" : {dump(value[k], depth + 1)}' for k in sorted(value))
        return "{\n" + inner + "\n" + "  " * (depth - 1) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(dump(v, depth + 1) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:f}"  # std::to_string(double)
    if value is None:
        return "null"
    return f'"{_escape(str(value))}"'


def format_partial(text: str) -> str:
    """A reply to audio when no utterance ended (``rec.PartialResult()``)."""
    return dump({"partial": text})


def _seconds(ms: Any) -> float:
    return float(ms) / 1000.0


def format_result(text: str, words: Sequence[Mapping[str, Any]], cfg: VoskConfig) -> str:
    """An utterance's result (``rec.Result()``, ``rec.FinalResult()``) as ``cfg`` asks.

    ``words`` are farm's (``word``, ``start_ms``, ``end_ms``, ``conf``, times from the
    start of the stream); vosk's are in seconds from the start of the stream too.
    """
    if cfg.max_alternatives > 0:
        # vosk-api NbestResult: words without conf; farm has one hypothesis only.
        alt: dict[str, Any] = {"confidence": 1.0, "text": text}
        if cfg.words and words:
            alt["result"] = [
                {"end": _seconds(w["end_ms"]), "start": _seconds(w["start_ms"]), "word": str(w["word"])} for w in words
            ]
        return dump({"alternatives": [alt]})
    obj: dict[str, Any] = {"text": text}
    if cfg.words and words:
        obj["result"] = [
            {
                "conf": float(w.get("conf", 1.0)),
                "end": _seconds(w["end_ms"]),
                "start": _seconds(w["start_ms"]),
                "word": str(w["word"]),
            }
            for w in words
        ]
    return dump(obj)


# -- one connection ----------------------------------------------------------------------


class VoskSession:
    """What one vosk-server connection has been told and what it answers next.

    Feed it the client's text messages (:meth:`receive_text`) and farm's events for
    the call (:meth:`receive_event`); ask it for the reply to each audio message
    (:meth:`audio_reply`) and to eof or reset (:meth:`final_reply`).

    Everything that changes what the client sees lives here: finals queue until a
    reply carries them, the partial is the latest one since the last final.
    """

    def __init__(self) -> None:
        self.config = VoskConfig()
        self.audio_seen = False  # the first audio fixes the config (vosk-server makes its recognizer then)
        self.partial = ""
        self.finals: deque[tuple[str, list[dict[str, Any]]]] = deque()
        self.audio_since_result = False

    def receive_text(self, text: str) -> Command:
        """A text message arrived; a config is applied (before audio) or ignored (after).

        Raises:
            VoskServerError: the message cannot be served; close the connection with it.
        """
        command, body = parse_text(text)
        if command is CONFIG and not self.audio_seen:
            self.config = parse_config(body, self.config)
        return command

    def receive_audio(self) -> None:
        """An audio message arrived (call before :meth:`audio_reply`)."""
        self.audio_seen = True
        self.audio_since_result = True

    def receive_event(self, type: str, data: Mapping[str, Any]) -> None:
        """One of farm's events for this call (``partial`` and ``final`` matter)."""
        if type == "partial":
            self.partial = str(data.get("text", ""))
        elif type == "final":
            words = [dict(w) for w in data.get("words") or () if isinstance(w, Mapping)]
            self.finals.append((str(data.get("text", "")), words))
            self.partial = ""

    def audio_reply(self) -> str:
        """The one reply to an audio message: the next utterance that ended, else the partial."""
        if self.finals:
            text, words = self.finals.popleft()
            self.audio_since_result = False
            return format_result(text, words, self.config)
        return format_partial(self.partial)

    def final_reply(self) -> str:
        """The reply to eof or reset: everything recognized since the last result sent.

        vosk-server's ``FinalResult()`` covers all audio after its last result, so the
        finals no reply has carried yet go out as one result (texts joined by a space,
        words in order). No audio since the last result: vosk-api's compact empty form;
        audio but no words: an empty result in the usual form.
        """
        pending, self.finals = list(self.finals), deque()
        self.partial = ""
        said = [(t, w) for t, w in pending if t]
        heard, self.audio_since_result = self.audio_since_result, False
        if not said and not heard:
            return EMPTY_ALTERNATIVES if self.config.max_alternatives > 0 else EMPTY_RESULT
        text = " ".join(t for t, _ in said)
        words = [w for _, ws in said for w in ws]
        return format_result(text, words, self.config)
