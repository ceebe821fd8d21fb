"""FreeSWITCH Event Socket (ESL) codec, both directions (PROTOCOLS.md §3): sans-I/O.

One codec serves the outbound server (FreeSWITCH connects to us from
``socket host:port async full``, §3.6) and the inbound client (we connect to
FreeSWITCH on port 8021, §3.3). It never touches sockets, clocks or loggers:

* :class:`EventSocketParser` turns bytes from FreeSWITCH into frozen message
  objects (:data:`Message`): feed it with :meth:`~EventSocketParser.receive_data`
  and :meth:`~EventSocketParser.receive_eof`, collect with
  :meth:`~EventSocketParser.events_received`.
* :func:`command` and :func:`sendmsg` build the bytes we send.
* :func:`url_decode` and :func:`url_encode` implement the value encoding of
  ``text/event-plain`` events and of the outbound ``connect`` reply (§3.4).

Header names are matched case-insensitively everywhere (:class:`Headers`) but keep
the case FreeSWITCH used, so a message can be logged or re-serialized as received.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterable, Mapping
from enum import IntEnum
from urllib.parse import unquote

from farm.protocol.esl_messages import (
    ApiResponse,
    AuthRequest,
    ChannelData,
    DisconnectNotice,
    EslEvent,
    Headers,
    LogData,
    Message,
    Reply,
    RudeRejection,
    UnknownMessage,
)
from farm.protocol.exceptions import LocalProtocolError, RemoteProtocolError


__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_CONTENT_LENGTH",
    "MAX_BODY_BYTES",
    "ParserState",
    "OPEN",
    "CLOSED",
    "FAILED",
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
    "EventSocketParser",
    "command",
    "sendmsg",
    "url_decode",
    "url_encode",
]

# Header lines plus the empty line ending them. A real CHANNEL_DATA block is 5-15 KiB;
# 64 KiB leaves room for big variable sets while bounding what a peer that never
# sends the empty line can make us buffer.
MAX_HEADER_BYTES = 64 * 1024
# FreeSWITCH refuses bodies above this itself (mes.c MAX_CONTENT_LENGTH, §3.1): the
# limit of what we send.
MAX_CONTENT_LENGTH = 16 * 1024 * 1024
# What we accept, by default (``--esl-max-body-bytes``). FreeSWITCH's own bodies are
# small: an event with every channel variable is 5-15 KiB (§3.4), an api/response a
# line. A peer allowed 16 MiB per connection makes the ingress hold 16 MiB per
# connection.
MAX_BODY_BYTES = 1024 * 1024

# 16 MiB is 8 digits; anything longer (after leading zeros) is too big without int(),
# which also keeps a 60 KiB digit string away from int()'s digit limit.
_MAX_LENGTH_DIGITS = len(str(MAX_CONTENT_LENGTH))


class ParserState(IntEnum):
    """Parser state machine (HOUSE_STYLE.md point 2).

    Everything that changes ``EventSocketParser.state`` lives in
    :meth:`EventSocketParser._step` and :meth:`EventSocketParser.receive_data`:

    * ``OPEN`` → ``CLOSED`` when EOF arrives between two messages;
    * ``OPEN`` → ``FAILED`` on any bad input, including EOF inside a message;
    * ``CLOSED`` and ``FAILED`` are terminal.
    """

    OPEN = 0
    CLOSED = 1
    FAILED = 2


OPEN = ParserState.OPEN
CLOSED = ParserState.CLOSED
FAILED = ParserState.FAILED


# ---------------------------------------------------------------------------
# URL encoding (§3.4)

# SWITCH_URL_UNSAFE plus what switch_url_encode_opt always escapes (< 0x20, > 0x7E).
_UNSAFE = frozenset(b'\r\n #%&+:;<=>?@[\\]^`{|}"') | frozenset(range(0x20)) | frozenset(range(0x7F, 0x100))
_UPPER_HEX = frozenset(b"0123456789ABCDEF")


def url_decode(value: str) -> str:
    """Decode ``%XX`` sequences of one header value, as UTF-8 (§3.4).

    Call it on a single value after the line was split, never on a whole block: a
    decoded ``%0A`` would otherwise make a fake line (§3.1). ``+`` stays ``+``
    (FreeSWITCH writes ``%2B``), a ``%`` not followed by two hex digits stays as is,
    and invalid UTF-8 becomes U+FFFD.
    """
    return unquote(value, encoding="utf-8", errors="replace")


def url_encode(value: str) -> str:
    """Encode a value the way FreeSWITCH's ``switch_url_encode_opt`` does (§3.4, TV-ESL-8).

    Use it to predict what FreeSWITCH writes, or for ``sendevent`` bodies. A ``%``
    already followed by two uppercase hex digits is left alone, as FreeSWITCH does,
    so ``a%41b`` stays ``a%41b`` (and decodes to ``aAb``: the format is ambiguous).
    """
    data = value.encode("utf-8")
    out: list[str] = []
    for i, byte in enumerate(data):
        following = data[i + 1 : i + 3]
        if byte == 0x25 and len(following) == 2 and _UPPER_HEX.issuperset(following):
            out.append("%")
            continue
        out.append(f"%{byte:02X}" if byte in _UNSAFE else chr(byte))
    return "".join(out)


# ---------------------------------------------------------------------------
# Parsing FreeSWITCH -> us (§3.1)


class _StreamReader:
    """Byte buffer read through generators that suspend until enough data arrived."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.eof = False

    def feed_data(self, data: bytes) -> None:
        self.buffer += data

    def feed_eof(self) -> None:
        self.eof = True

    def at_eof(self) -> Generator[None, None, bool]:
        """Wait until data is buffered (False) or the stream ended empty (True)."""
        while not self.buffer:
            if self.eof:
                return True
            yield
        return False

    def read_line(self, limit: int) -> Generator[None, None, bytes]:
        """Read one line including its LF; it may not be longer than ``limit`` bytes."""
        searched = 0
        while True:
            end = self.buffer.find(b"\n", searched)
            if end >= 0:
                break
            searched = len(self.buffer)
            if searched >= limit:
                raise RemoteProtocolError(f"header block exceeds {MAX_HEADER_BYTES} bytes")
            if self.eof:
                raise RemoteProtocolError(f"connection closed inside a header block after {searched} bytes of a line")
            yield
        if end + 1 > limit:
            raise RemoteProtocolError(f"header block exceeds {MAX_HEADER_BYTES} bytes")
        line = bytes(self.buffer[: end + 1])
        del self.buffer[: end + 1]
        return line

    def read_exact(self, n: int) -> Generator[None, None, bytes]:
        """Read exactly ``n`` bytes; ``n`` was checked against the parser's body limit."""
        while len(self.buffer) < n:
            if self.eof:
                raise RemoteProtocolError(f"connection closed after {len(self.buffer)} of {n} body bytes")
            yield
        data = bytes(self.buffer[:n])
        del self.buffer[:n]  # emptied, a bytearray gives its memory back (a major downsize)
        return data

    def discard(self) -> None:
        self.buffer.clear()


def _split_header(line: bytes, lineno: int) -> tuple[str, str]:
    # §3.1: split at the first ": "; FreeSWITCH always writes the space, but a bare
    # "Name:" (empty value) costs nothing to accept.
    text = line.rstrip(b"\r\n").decode("utf-8", "replace")
    name, sep, value = text.partition(":")
    if not sep or not name or name != name.strip() or " " in name or "\t" in name:
        # The peer's text stays out of the message: it is not ours to echo (point 8).
        raise RemoteProtocolError(f"malformed header line {lineno} ({len(line)} bytes)")
    return name, value[1:] if value.startswith(" ") else value


def _content_length(value: str, limit: int = MAX_CONTENT_LENGTH) -> int:
    digits = value.strip()
    if not digits or not digits.isascii() or not digits.isdigit():
        raise RemoteProtocolError(f"content-length of {len(value)} characters is not a number")
    significant = digits.lstrip("0")
    if len(significant) > _MAX_LENGTH_DIGITS or int(significant or "0") > limit:
        raise RemoteProtocolError(f"content-length {digits[:20]} exceeds the limit of {limit} bytes")
    return int(significant or "0")


def _text(body: bytes | None) -> str | None:
    # Bodies are UTF-8 by convention; a stray byte must not kill the connection.
    return None if body is None else body.decode("utf-8", "replace")


def _parse_plain_event(data: bytes) -> tuple[Headers, str | None]:
    """Parse the inner block of ``text/event-plain`` (§3.4): encoded headers, raw body."""
    pairs: list[tuple[str, str]] = []
    pos = 0
    lineno = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            end = len(data)  # tolerate a missing final LF
        line = data[pos : end + 1]
        pos = end + 1
        lineno += 1
        if not line.rstrip(b"\r\n"):
            break  # the empty line: the body, if any, follows
        name, value = _split_header(line, lineno)
        pairs.append((name, url_decode(value)))
    headers = Headers(pairs)
    length = headers.get("Content-Length")
    if length is None:
        return headers, None
    n = _content_length(length)
    body = data[pos : pos + n]
    if len(body) < n:
        raise RemoteProtocolError(f"event body has {len(body)} bytes, its content-length says {n}")
    return headers, _text(body)


def _json_value(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        # Same spelling as the plain format for multi-valued headers (§3.4).
        return "ARRAY::" + "|:".join(value)
    return json.dumps(value)


def _parse_json_event(data: bytes) -> tuple[Headers, str | None]:
    """Parse the body of ``text/event-json`` (§3.4): one flat object, ``_body`` apart."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8 too; RecursionError comes from deeply nested arrays.
        raise RemoteProtocolError(f"event json of {len(data)} bytes does not parse") from exc
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"event json of {len(data)} bytes is not an object")
    body = obj.pop("_body", None)
    headers = Headers((name, _json_value(value)) for name, value in obj.items())
    return headers, None if body is None else _json_value(body)


def _build(headers: Headers, body: bytes | None) -> Message:
    """Turn one outer message into its object, dispatching on ``Content-Type`` (§3.1)."""
    content_type = headers.get("Content-Type")
    if content_type is None:
        raise RemoteProtocolError(f"message with {len(headers)} headers has no content-type")
    if content_type == "command/reply":
        if "Event-Name" in headers:
            # The outbound connect reply (§3.6): a serialized CHANNEL_DATA event.
            return ChannelData(Headers((name, url_decode(value)) for name, value in headers.items()))
        return Reply(headers)
    if content_type == "auth/request":
        return AuthRequest(headers)
    if content_type == "api/response":
        return ApiResponse(headers, _text(body) or "")
    if content_type in ("text/event-plain", "text/event-json"):
        parse = _parse_plain_event if content_type == "text/event-plain" else _parse_json_event
        inner, inner_body = parse(body or b"")
        return EslEvent(inner.get("Event-Name", ""), inner.get("Event-Subclass"), inner, inner_body, content_type)
    if content_type == "text/event-xml":
        return EslEvent(content_type=content_type, raw=_text(body) or "")
    if content_type == "log/data":
        return LogData(headers, _text(body) or "")
    if content_type == "text/disconnect-notice":
        return DisconnectNotice(headers, _text(body) or "")
    if content_type == "text/rude-rejection":
        return RudeRejection(headers, _text(body) or "")
    return UnknownMessage(headers, _text(body))


class EventSocketParser:
    """Parse the byte stream FreeSWITCH sends on an Event Socket (§3.1).

    Use one per connection, in either mode. Call :meth:`receive_data` with every
    chunk read from the socket (any size, any boundary), :meth:`receive_eof` when
    the peer closes, then :meth:`events_received` to take the parsed messages.

    Bad input never raises: the parser records a
    :class:`~farm.protocol.exceptions.RemoteProtocolError` in :attr:`parser_exc`,
    moves to ``FAILED`` and ignores further data; the caller should close. A
    ``Content-Length`` over ``max_body`` is bad input, refused before its body is read.

    Attributes:
        state: ``OPEN``, ``CLOSED`` (clean EOF) or ``FAILED`` (terminal error).
        parser_exc: the error that moved the parser to ``FAILED``, else None.
    """

    def __init__(self, max_body: int = MAX_BODY_BYTES) -> None:
        if not 0 <= max_body <= MAX_CONTENT_LENGTH:
            raise LocalProtocolError(f"max_body {max_body} is not within 0-{MAX_CONTENT_LENGTH} bytes")
        self.max_body = max_body
        self.state = OPEN
        self.parser_exc: RemoteProtocolError | None = None
        self._reader = _StreamReader()
        self._messages: list[Message] = []
        self._parser = self._parse()
        self._step()

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the socket; call :meth:`events_received` afterwards.

        Raises:
            LocalProtocolError: if called after :meth:`receive_eof` (our bug).
        """
        if self.state is CLOSED:
            raise LocalProtocolError(f"{len(data)} bytes received after eof")
        if self.state is FAILED:
            return  # the connection is being dropped; nothing more to understand
        self._reader.feed_data(data)
        self._step()

    def receive_eof(self) -> None:
        """Signal that the peer closed; EOF inside a message becomes :attr:`parser_exc`.

        Calling it again, or after a failure, does nothing.
        """
        if self.state is not OPEN:
            return
        self._reader.feed_eof()
        self._step()

    def events_received(self) -> list[Message]:
        """Return the messages parsed since the last call, in arrival order."""
        messages, self._messages = self._messages, []
        return messages

    def _step(self) -> None:
        try:
            next(self._parser)
        except StopIteration:
            self.state = CLOSED
        except RemoteProtocolError as exc:
            self.parser_exc = exc
            self.state = FAILED
            self._reader.discard()

    def _parse(self) -> Generator[None, None, None]:
        reader = self._reader
        while True:
            pairs: list[tuple[str, str]] = []
            used = 0
            while True:
                if not pairs and (yield from reader.at_eof()):
                    return
                line = yield from reader.read_line(MAX_HEADER_BYTES - used)
                if not line.rstrip(b"\r\n"):
                    if pairs:
                        break
                    continue  # blank lines between messages are skipped, as FreeSWITCH does (§3.1)
                # The limit covers the header lines and the empty line that ends them.
                used += len(line)
                pairs.append(_split_header(line, len(pairs) + 1))
            headers = Headers(pairs)
            body: bytes | None = None
            length = headers.get("Content-Length")
            if length is not None:
                body = yield from reader.read_exact(_content_length(length, self.max_body))
            self._messages.append(_build(headers, body))
            body = None  # this frame waits here for the next message: hold nothing big meanwhile


# ---------------------------------------------------------------------------
# Serializing us -> FreeSWITCH (§3.1)


def _check_line(what: str, value: str) -> None:
    # A newline would end the command or header early and inject whatever follows (§3.1).
    for char in ("\n", "\r"):
        position = value.find(char)
        if position >= 0:
            raise LocalProtocolError(f"{what} has a line break at position {position} of {len(value)}")


def _serialize(
    line: str,
    headers: Iterable[tuple[str, str]],
    body: str | bytes | None,
    length_name: str,
) -> bytes:
    _check_line("command line", line)
    out = [line]
    for name, value in headers:
        _check_line(f"header name {name[:40]!r}", name)
        _check_line(f"header {name[:40]!r}", value)
        if not name or ":" in name or " " in name:
            raise LocalProtocolError(f"header name {name[:40]!r} is not a valid name")
        if name.lower() == "content-length":
            raise LocalProtocolError("content-length is computed from the body, do not pass it")
        out.append(f"{name}: {value}")
    data = b"" if body is None else body.encode("utf-8") if isinstance(body, str) else bytes(body)
    if body is not None:
        if len(data) > MAX_CONTENT_LENGTH:
            raise LocalProtocolError(f"body of {len(data)} bytes exceeds {MAX_CONTENT_LENGTH} bytes")
        out.append(f"{length_name}: {len(data)}")
    return ("\n".join(out) + "\n\n").encode("utf-8") + data


def _header_items(headers: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> list[tuple[str, str]]:
    if headers is None:
        return []
    if isinstance(headers, Mapping):
        return list(headers.items())
    return list(headers)


def command(
    name: str,
    *args: str,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    body: str | bytes | None = None,
) -> bytes:
    """Serialize one command we send (§3.1, §3.3, §3.6).

    Examples: ``command("connect")`` → ``b"connect\\n\\n"``;
    ``command("api", "uuid_socket_audio_flush", uuid)``;
    ``command("bgapi", "uuid_audio_stream", uuid, "stop", headers={"Job-UUID": job})``.
    A body gets a ``Content-Length`` header computed here.

    Raises:
        LocalProtocolError: on an empty name, a line break in the name, an argument,
            a header name or value, a malformed header name, a caller-supplied
            ``Content-Length``, or a body over 16 MiB.
    """
    if not name or " " in name:
        raise LocalProtocolError(f"command name {name[:40]!r} must be one non-empty word")
    return _serialize(" ".join((name, *args)), _header_items(headers), body, "Content-Length")


def sendmsg(
    uuid: str | None = None,
    call_command: str = "execute",
    app: str | None = None,
    arg: str | None = None,
    event_uuid: str | None = None,
    event_lock: bool = False,
    loops: int | None = None,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    body: str | None = None,
) -> bytes:
    """Serialize a ``sendmsg`` call command (§3.6, TV-MSA-1, TV-ESL-7).

    Call it to run an application on a channel: in outbound mode ``uuid`` may be None
    (the controlled channel). ``event_uuid`` comes back as ``Application-UUID`` on
    ``CHANNEL_EXECUTE``/``CHANNEL_EXECUTE_COMPLETE``. A multi-line argument goes in
    ``body`` (sent with ``content-type: text/plain``) instead of ``arg``. Header order
    is call-command, execute-app-name, execute-app-arg, loops, event-lock, Event-UUID,
    then ``headers``.

    Raises:
        LocalProtocolError: on ``execute`` without ``app``, both ``arg`` and
            ``body``, or a line break where it would end a header.
    """
    if call_command == "execute" and not app:
        raise LocalProtocolError("call-command execute needs an application name")
    if arg is not None and body is not None:
        raise LocalProtocolError("give the application argument as arg or as body, not both")
    items: list[tuple[str, str]] = [("call-command", call_command)]
    if app is not None:
        items.append(("execute-app-name", app))
    if arg is not None:
        items.append(("execute-app-arg", arg))
    if loops is not None:
        items.append(("loops", str(loops)))
    if event_lock:
        items.append(("event-lock", "true"))
    if event_uuid is not None:
        items.append(("Event-UUID", event_uuid))
    items += _header_items(headers)
    if body is not None:
        items.append(("content-type", "text/plain"))
    line = "sendmsg" if uuid is None else f"sendmsg {uuid}"
    return _serialize(line, items, body, "content-length")
