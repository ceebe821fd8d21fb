"""Logging set-up shared by every farm process: one line per record, pid in every line.

Peers control much of what farm logs (call ids, metadata, URL paths, Event Socket
headers, vosk configs). A newline in any of them must not let a peer write a line of
its own into farm's log, so the formatter escapes every control character of a
message, and indents the lines of a traceback, which then can never pass for a
record of their own. Call sites still quote what a peer sent (:func:`quote` or
``%r``), so its limits are clear to the reader.

A call's lines carry its id as a field: pass ``extra={"call_id": ...}`` or log
through :func:`call_logger`; the formatter writes ``call <id>: `` before the message.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import TextIO


__all__ = ["setup_logging", "quote", "escape", "call_logger", "LineFormatter"]

# C0 and C1 controls, DEL, and what some viewers take for a line break (U+2028, U+2029).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# What a peer's string may hold to be logged as it is: anything else is quoted.
_PLAIN = re.compile(r"[A-Za-z0-9._:@+/=-]+")
_CONTINUATION = "\n    | "


def escape(text: str) -> str:
    """``text`` with every control character written as its Python escape (``\\n``)."""
    return _UNSAFE.sub(lambda m: ascii(m.group())[1:-1], text)


def quote(value: object) -> str:
    """A peer's string as one token: as it is when plain (a UUID), else a JSON string
    with every control and non-ASCII character escaped."""
    text = str(value)
    return text if _PLAIN.fullmatch(text) else json.dumps(text)


def call_logger(logger: logging.Logger, call_id: str) -> logging.LoggerAdapter[logging.Logger]:
    """A logger whose every line names the call (the ``call_id`` field)."""
    return logging.LoggerAdapter(logger, {"call_id": call_id})


class LineFormatter(logging.Formatter):
    """One line per record (plus indented traceback lines), the call id as a field."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape(record.getMessage())
        call_id = getattr(record, "call_id", None)
        record.__dict__["call"] = "" if call_id is None else f"call {quote(call_id)}: "
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        for block in (record.exc_text, record.stack_info and self.formatStack(record.stack_info)):
            if block:
                line += "".join(_CONTINUATION + escape(part) for part in block.split("\n"))
        return line


def setup_logging(level: str = "INFO", role: str = "", stream: TextIO | None = None) -> None:
    """Configure the root logger to write to ``stream`` (stderr); call once at the start of each process."""
    fmt = f"%(asctime)s %(levelname)-7s {role or '%(processName)s'}[%(process)d] %(name)s: %(call)s%(message)s"
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(LineFormatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # websockets logs every failed handshake at ERROR with a traceback; our own lines say it.
    logging.getLogger("websockets").setLevel(logging.CRITICAL)
