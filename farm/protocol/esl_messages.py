"""The messages FreeSWITCH's Event Socket sends, as frozen objects (PROTOCOLS.md §3).

:class:`farm.protocol.esl.EventSocketParser` makes them; everything that reads the
Event Socket matches on them. Header names are matched case-insensitively
(:class:`Headers`) but keep the case FreeSWITCH used, so a message can be logged or
re-serialized as received. ``farm.protocol.esl`` re-exports every name here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeAlias


__all__ = [
    "Headers",
    "AuthRequest",
    "Reply",
    "ApiResponse",
    "EslEvent",
    "LogData",
    "DisconnectNotice",
    "RudeRejection",
    "ChannelData",
    "UnknownMessage",
    "Message",
]


class Headers(Mapping[str, str]):
    """Immutable header block: case-insensitive lookups, original case kept.

    Iteration yields names as FreeSWITCH spelled them, in arrival order. When a name
    repeats (FreeSWITCH does not do that; multi-valued headers travel as
    ``ARRAY::a|:b``), the last value wins and the first spelling is kept.
    """

    __slots__ = ("_items", "_index")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        index: dict[str, int] = {}
        pairs: list[tuple[str, str]] = []
        for name, value in items:
            key = name.lower()
            if key in index:
                pairs[index[key]] = (pairs[index[key]][0], value)
            else:
                index[key] = len(pairs)
                pairs.append((name, value))
        self._items = tuple(pairs)
        self._index = index

    def __getitem__(self, name: str) -> str:
        return self._items[self._index[name.lower()]][1]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._index

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        return f"Headers({list(self._items)!r})"


def _ok(text: str) -> bool:
    # §3.2: success is signalled only by the +OK prefix; -ERR, -USAGE … are failures.
    return text.startswith("+OK")


@dataclass(frozen=True)
class AuthRequest:
    """``auth/request``: FreeSWITCH greets an inbound client; answer with ``auth`` (§3.3)."""

    headers: Headers = field(default_factory=Headers)


@dataclass(frozen=True)
class Reply:
    """``command/reply``: the answer to every command but ``api`` (§3.1, §3.2).

    Values are kept as received: they are not URL-encoded, and decoding them could
    change texts such as ``+OK filter added. [h]=[v]``.
    """

    headers: Headers = field(default_factory=Headers)

    @property
    def reply_text(self) -> str:
        """The ``Reply-Text`` header, ``""`` when missing."""
        return self.headers.get("Reply-Text", "")

    @property
    def ok(self) -> bool:
        """True when ``Reply-Text`` starts with ``+OK`` (§3.2)."""
        return _ok(self.reply_text)

    @property
    def job_uuid(self) -> str | None:
        """The ``Job-UUID`` header of a ``bgapi`` reply (§3.3), else None."""
        return self.headers.get("Job-UUID")


@dataclass(frozen=True)
class ApiResponse:
    """``api/response``: the output of a synchronous ``api`` command (§3.3)."""

    headers: Headers = field(default_factory=Headers)
    body: str = ""

    @property
    def ok(self) -> bool:
        """True when the output starts with ``+OK``; by habit only, the body is free text (§3.2)."""
        return _ok(self.body)


@dataclass(frozen=True)
class EslEvent:
    """One FreeSWITCH event (``text/event-plain``, ``-json`` or ``-xml``, §3.4).

    Attributes:
        name: ``Event-Name`` (``CUSTOM``, ``CHANNEL_ANSWER`` …), ``""`` when missing
            and for XML events.
        subclass: ``Event-Subclass`` of CUSTOM events, else None.
        headers: the event's own headers. Plain values are URL-decoded; JSON arrays
            (multi-valued headers) are joined as ``ARRAY::a|:b``, the way the plain
            format writes them, so both formats give the same headers.
        body: the event body (plain inner body, JSON ``_body``), None when absent.
        content_type: the outer ``Content-Type``.
        raw: for ``text/event-xml`` only, the XML text, which is not parsed here.
    """

    name: str = ""
    subclass: str | None = None
    headers: Headers = field(default_factory=Headers)
    body: str | None = None
    content_type: str = "text/event-plain"
    raw: str | None = None

    @property
    def unique_id(self) -> str | None:
        """The channel the event is about (``Unique-ID``), None for global events."""
        return self.headers.get("Unique-ID")


@dataclass(frozen=True)
class LogData:
    """``log/data``: one log line after ``log <level>`` (§3.1)."""

    headers: Headers = field(default_factory=Headers)
    body: str = ""


@dataclass(frozen=True)
class DisconnectNotice:
    """``text/disconnect-notice``: FreeSWITCH closes now, or lingers first (§3.6)."""

    headers: Headers = field(default_factory=Headers)
    body: str = ""

    @property
    def linger(self) -> bool:
        """True for the notice at linger start: events keep coming until the final notice."""
        return self.headers.get("Content-Disposition", "").lower() == "linger"


@dataclass(frozen=True)
class RudeRejection:
    """``text/rude-rejection``: the ACL refused us; FreeSWITCH closes next (§3.1)."""

    headers: Headers = field(default_factory=Headers)
    body: str = ""


@dataclass(frozen=True)
class ChannelData:
    """The outbound ``connect`` reply: a serialized CHANNEL_DATA event (§3.6, TV-ESL-7).

    It carries ``Content-Type: command/reply`` among the channel headers, has no
    outer ``Content-Length`` and URL-encodes its values; ``headers`` holds them decoded.
    """

    headers: Headers = field(default_factory=Headers)

    @property
    def unique_id(self) -> str | None:
        """The controlled channel's ``Unique-ID``."""
        return self.headers.get("Unique-ID")

    @property
    def reply_text(self) -> str:
        """Decoded ``Reply-Text`` (``"+OK\\n"`` on success), ``""`` when missing."""
        return self.headers.get("Reply-Text", "")

    @property
    def ok(self) -> bool:
        """True when the decoded ``Reply-Text`` starts with ``+OK``."""
        return _ok(self.reply_text)


@dataclass(frozen=True)
class UnknownMessage:
    """A message whose ``Content-Type`` this codec does not know; kept, not fatal."""

    headers: Headers = field(default_factory=Headers)
    body: str | None = None


Message: TypeAlias = (
    AuthRequest
    | Reply
    | ApiResponse
    | EslEvent
    | LogData
    | DisconnectNotice
    | RudeRejection
    | ChannelData
    | UnknownMessage
)
