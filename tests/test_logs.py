"""farm's log lines: one per record whatever a peer sent, the call id as a field.

The log is set up exactly as every farm process sets it up (``farm.logs.setup_logging``),
writing to a buffer; the records are made by the logging module itself.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from farm.logs import call_logger, quote, setup_logging


FAKE = "2030-01-01 00:00:00,000 CRITICAL supervisor[1] farm.supervisor: fake"


@pytest.fixture
def log() -> Iterator[io.StringIO]:
    """The root logger as a farm process has it, writing to a buffer; restored after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buf = io.StringIO()
    setup_logging("DEBUG", "ingress", stream=buf)
    try:
        yield buf
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def lines(buf: io.StringIO) -> list[str]:
    return buf.getvalue().splitlines()


def test_a_control_character_in_an_argument_cannot_start_a_line(log: io.StringIO) -> None:
    logging.getLogger("farm.ingress").warning("closing: %s", f"x\n{FAKE}\r{FAKE}\u2028{FAKE}\x1b[2J\x85")
    [line] = lines(log)
    assert line.endswith(f"farm.ingress: closing: x\\n{FAKE}\\r{FAKE}\\u2028{FAKE}\\x1b[2J\\x85")
    assert " WARNING ingress[" in line


def test_a_call_id_is_a_field_of_the_line_quoted_when_it_is_not_plain(log: io.StringIO) -> None:
    call_logger(logging.getLogger("farm.ingress"), "6f2d-a1:b@c").info("mod_audio_stream from %s", "1.2.3.4:5")
    call_logger(logging.getLogger("workers.worker"), f"x\n{FAKE}").info("serving")
    logging.getLogger("farm.broker").info("queued", extra={"call_id": 'say "hi"'})
    logging.getLogger("farm.broker").info("no call here")
    assert [line.split(": ", 1)[1] for line in lines(log)] == [
        "call 6f2d-a1:b@c: mod_audio_stream from 1.2.3.4:5",
        f'call "x\\n{FAKE}": serving',
        'call "say \\"hi\\"": queued',
        "no call here",
    ]


def test_a_traceback_is_indented_so_its_lines_never_pass_for_records(log: io.StringIO) -> None:
    try:
        raise ValueError(f"bad\n{FAKE}")
    except ValueError:
        call_logger(logging.getLogger("farm.ingress"), "c1").exception("handling failed")
    first, *rest = lines(log)
    assert first.endswith("farm.ingress: call c1: handling failed")
    assert rest and all(line.startswith("    | ") for line in rest), rest
    assert f"    | {FAKE}" in rest


def test_quote_leaves_plain_ids_alone_and_escapes_the_rest() -> None:
    assert quote("6f2d1c3e-0b7a-4c51-9d8e-2f4a6b8c0d1e") == "6f2d1c3e-0b7a-4c51-9d8e-2f4a6b8c0d1e"
    assert quote("") == '""'
    assert quote("a b") == '"a b"'
    assert quote("통화\n") == '"\\ud1b5\\ud654\\n"'
