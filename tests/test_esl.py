"""Byte-level tests of the Event Socket codec, farm/protocol/esl.py (PROTOCOLS.md §3).

No sockets: every FreeSWITCH→us vector is parsed whole, one byte at a time, in
seeded random chunks and with the first bytes of a following message; everything
we send is compared with the exact bytes of the vector.
"""

from __future__ import annotations

import json
import random
import tracemalloc
from collections.abc import Iterator
from typing import get_args

import pytest
from hypothesis import given, settings, strategies as st

from farm.protocol.esl import (
    CLOSED,
    FAILED,
    MAX_BODY_BYTES,
    MAX_CONTENT_LENGTH,
    MAX_HEADER_BYTES,
    OPEN,
    ApiResponse,
    AuthRequest,
    ChannelData,
    DisconnectNotice,
    EslEvent,
    EventSocketParser,
    Headers,
    LogData,
    Message,
    Reply,
    RudeRejection,
    UnknownMessage,
    command,
    sendmsg,
    url_decode,
    url_encode,
)
from farm.protocol.exceptions import LocalProtocolError, ProtocolError, RemoteProtocolError


UUID = "6f2d1c1e-2b7a-4b8e-9a57-0c1f8f9a2d11"
JOB = "11111111-2222-4333-8444-555555555555"
GOODBYE = b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"

# A message that follows every vector in the "trailing bytes" replays; only its
# first bytes are fed, so it must stay pending and not disturb the vector.
NEXT = b"Content-Type: command/reply\nReply-Text: +OK\n\n"


# -- vector texts, transcribed from PROTOCOLS.md ---------------------------------

TV_ESL_5_JSON = (
    b'{"Event-Subclass":"mod_audio_stream::json","Event-Name":"CUSTOM",'
    b'"Unique-ID":"6f2d1c1e-2b7a-4b8e-9a57-0c1f8f9a2d11","Content-Length":"35",'
    b'"_body":"{\\"type\\":\\"transcript\\",\\"text\\":\\"hola\\"}"}'
)
TV_ESL_5 = b"Content-Length: 192\nContent-Type: text/event-json\n\n" + TV_ESL_5_JSON

_COMMON_HEAD = (
    "Event-Name: CUSTOM\n"
    "Core-UUID: 3c9d5a0e-1111-4222-8333-944455556666\n"
    "FreeSWITCH-Hostname: fs1\n"
    "FreeSWITCH-Switchname: fs1\n"
    "FreeSWITCH-IPv4: 10.0.0.5\n"
    "FreeSWITCH-IPv6: %3A%3A1\n"
    "Event-Date-Local: 2025-01-02%2003%3A04%3A05\n"
    "Event-Date-GMT: Thu,%2002%20Jan%202025%2003%3A04%3A05%20GMT\n"
    "Event-Date-Timestamp: 1735787045123456\n"
)
_COMMON_CHANNEL = (
    "Event-Sequence: 4711\n"
    "Channel-State: CS_EXECUTE\n"
    "Channel-Call-State: ACTIVE\n"
    "Channel-Name: sofia/internal/1000%4010.0.0.5\n"
    "Unique-ID: 6f2d1c1e-2b7a-4b8e-9a57-0c1f8f9a2d11\n"
    "Answer-State: answered\n"
    "Channel-Read-Codec-Name: PCMU\n"
    "Channel-Read-Codec-Rate: 8000\n"
    "variable_uuid: 6f2d1c1e-2b7a-4b8e-9a57-0c1f8f9a2d11\n"
)
TV_ESL_6_INNER = (
    "Event-Subclass: mod_audio_stream%3A%3Aconnect\n" + _COMMON_HEAD + "Event-Calling-File: mod_audio_stream.c\n"
    "Event-Calling-Function: responseHandler\n"
    "Event-Calling-Line-Number: 19\n" + _COMMON_CHANNEL + "Content-Length: 22\n"
    "\n"
    '{"status":"connected"}'
).encode()
TV_ESL_6 = b"Content-Length: 812\nContent-Type: text/event-plain\n\n" + TV_ESL_6_INNER

TV_MSA_4_INNER = (
    "Event-Subclass: socket_audio%3A%3Aplayback_stop\n" + _COMMON_HEAD + "Event-Calling-File: mod_socket_audio.c\n"
    "Event-Calling-Function: socket_audio_thread\n"
    "Event-Calling-Line-Number: 310\n" + _COMMON_CHANNEL + "Playback-Stop-Reason: flush\n"
    "\n"
).encode()
TV_MSA_4 = b"Content-Length: 806\nContent-Type: text/event-plain\n\n" + TV_MSA_4_INNER

TV_MSA_1 = (
    b"sendmsg\n"
    b"call-command: execute\n"
    b"execute-app-name: socket_audio\n"
    b"execute-app-arg: 127.0.0.1 40123\n"
    b"Event-UUID: 0b7e9a52-0001-4000-8000-000000000001\n"
    b"\n"
)

# TV-ESL-7 elides most of the CHANNEL_DATA block ("…"); this is a short but
# faithful stand-in: URL-encoded values, command/reply near the end, no length.
TV_ESL_7_CONNECT_REPLY = (
    b"Event-Name: CHANNEL_DATA\n"
    b"Core-UUID: 3c9d5a0e-1111-4222-8333-944455556666\n"
    b"Event-Date-Local: 2025-01-02%2003%3A04%3A05\n"
    b"Channel-Name: sofia/internal/1000%4010.0.0.5\n"
    b"Unique-ID: 6f2d1c1e-2b7a-4b8e-9a57-0c1f8f9a2d11\n"
    b"Caller-Caller-ID-Name: Jos%C3%A9\n"
    b"variable_socket_host: 127.0.0.1\n"
    b"Content-Type: command/reply\n"
    b"Reply-Text: %2BOK%0A\n"
    b"Socket-Mode: async\n"
    b"Control: full\n"
    b"\n"
)


# -- helpers ----------------------------------------------------------------------


def parse_whole(data: bytes) -> EventSocketParser:
    parser = EventSocketParser()
    parser.receive_data(data)
    return parser


def chunkings(data: bytes, seed: int = 0) -> Iterator[tuple[str, list[bytes]]]:
    """The replays of HOUSE_STYLE point 3: whole, byte by byte, random chunks."""
    yield "whole", [data]
    yield "bytewise", [data[i : i + 1] for i in range(len(data))]
    rng = random.Random(seed)
    for run in range(5):
        chunks, pos = [], 0
        while pos < len(data):
            size = rng.randint(1, 64)
            chunks.append(data[pos : pos + size])
            pos += size
        yield f"random{run}", chunks


def replay(data: bytes) -> list[Message]:
    """Parse ``data`` every way; all ways must give the same messages and a clean EOF."""
    results = []
    for _, chunks in chunkings(data, seed=len(data)):
        parser = EventSocketParser()
        received: list[Message] = []
        for chunk in chunks:
            parser.receive_data(chunk)
            received += parser.events_received()
        parser.receive_eof()
        received += parser.events_received()
        assert parser.parser_exc is None
        assert parser.state is CLOSED
        results.append(received)
    # Trailing bytes of a next message must neither be lost nor parsed early.
    for cut in (1, len(NEXT) // 2, len(NEXT) - 1):
        parser = parse_whole(data + NEXT[:cut])
        assert parser.events_received() == results[0]
        assert parser.state is OPEN
        parser.receive_data(NEXT[cut:])
        assert parser.events_received() == [Reply(Headers([("Content-Type", "command/reply"), ("Reply-Text", "+OK")]))]
    for received in results[1:]:
        assert received == results[0]
    return results[0]


def replay_one(data: bytes) -> Message:
    (message,) = replay(data)
    return message


def failed_with(data: bytes, *, eof: bool = False) -> str:
    parser = EventSocketParser()
    parser.receive_data(data)
    if eof:
        parser.receive_eof()
    assert parser.state is FAILED
    assert isinstance(parser.parser_exc, RemoteProtocolError)
    message = str(parser.parser_exc)
    assert message == message.lower()
    assert not message.endswith(".")
    return message


# -- tests ------------------------------------------------------------------------


class TestSection3_7TestVectors:
    """TV-ESL-1 … TV-ESL-8 (§3.7)."""

    def test_vector_lengths_match_the_document(self) -> None:
        assert len(TV_ESL_5_JSON) == 192
        assert len(TV_ESL_6_INNER) == 812
        assert TV_ESL_6_INNER.endswith(b"\n\n" + b'{"status":"connected"}')
        assert len(b'{"status":"connected"}') == 22
        assert len(TV_MSA_4_INNER) == 806
        assert len(GOODBYE) == 67
        assert len(b"Access Denied, go away.\n") == 24

    def test_esl_1_auth_request_parses(self) -> None:
        message = replay_one(b"Content-Type: auth/request\n\n")
        assert message == AuthRequest(Headers([("Content-Type", "auth/request")]))

    def test_esl_1_auth_command_serializes(self) -> None:
        assert command("auth", "ClueCon") == b"auth ClueCon\n\n"

    def test_esl_1_accepted_reply_is_ok(self) -> None:
        message = replay_one(b"Content-Type: command/reply\nReply-Text: +OK accepted\n\n")
        assert isinstance(message, Reply)
        assert message.ok
        assert message.reply_text == "+OK accepted"
        assert message.job_uuid is None

    def test_esl_1_wrong_password_gives_err_then_disconnect_notice(self) -> None:
        data = (
            b"Content-Type: command/reply\nReply-Text: -ERR invalid\n\n"
            b"Content-Type: text/disconnect-notice\nContent-Length: 67\n\n" + GOODBYE
        )
        reply, notice = replay(data)
        assert isinstance(reply, Reply) and not reply.ok
        assert isinstance(notice, DisconnectNotice)
        assert notice.body == GOODBYE.decode()
        assert not notice.linger

    def test_esl_2_subscription_command_and_reply(self) -> None:
        assert (
            command("event", "json", "CUSTOM", "socket_audio::playback_start", "socket_audio::playback_stop")
            == b"event json CUSTOM socket_audio::playback_start socket_audio::playback_stop\n\n"
        )
        message = replay_one(b"Content-Type: command/reply\nReply-Text: +OK event listener enabled json\n\n")
        assert isinstance(message, Reply) and message.reply_text == "+OK event listener enabled json"

    def test_esl_3_api_command_and_response(self) -> None:
        assert command("api", "uuid_socket_audio_flush", UUID) == f"api uuid_socket_audio_flush {UUID}\n\n".encode()
        message = replay_one(b"Content-Type: api/response\nContent-Length: 4\n\n+OK\n")
        assert message == ApiResponse(Headers([("Content-Type", "api/response"), ("Content-Length", "4")]), "+OK\n")
        assert isinstance(message, ApiResponse) and message.ok

    def test_esl_4_bgapi_with_own_job_uuid(self) -> None:
        assert (
            command("bgapi", "uuid_audio_stream", UUID, "stop", headers={"Job-UUID": JOB})
            == f"bgapi uuid_audio_stream {UUID} stop\nJob-UUID: {JOB}\n\n".encode()
        )
        message = replay_one(
            f"Content-Type: command/reply\nReply-Text: +OK Job-UUID: {JOB}\nJob-UUID: {JOB}\n\n".encode()
        )
        assert isinstance(message, Reply)
        assert message.ok and message.job_uuid == JOB
        assert message.reply_text == f"+OK Job-UUID: {JOB}"

    def test_esl_4_background_job_event_carries_the_output(self) -> None:
        inner = (
            f"Event-Name: BACKGROUND_JOB\nJob-UUID: {JOB}\nJob-Command: uuid_audio_stream\n"
            f"Job-Command-Arg: {UUID}%20stop\nContent-Length: 12\n\n+OK Success\n"
        ).encode()
        data = f"Content-Length: {len(inner)}\nContent-Type: text/event-plain\n\n".encode() + inner
        event = replay_one(data)
        assert isinstance(event, EslEvent)
        assert event.name == "BACKGROUND_JOB" and event.subclass is None
        assert event.headers["job-command-arg"] == f"{UUID} stop"
        assert event.body == "+OK Success\n"

    def test_esl_5_json_event_with_body(self) -> None:
        event = replay_one(TV_ESL_5)
        assert isinstance(event, EslEvent)
        assert event.content_type == "text/event-json"
        assert event.name == "CUSTOM"
        assert event.subclass == "mod_audio_stream::json"
        assert event.unique_id == UUID
        assert event.headers["Content-Length"] == "35"
        assert "_body" not in event.headers
        assert event.body == '{"type":"transcript","text":"hola"}'
        assert len(event.body) == 35
        assert event.raw is None

    def test_esl_6_plain_event_with_body_is_decoded_per_value(self) -> None:
        event = replay_one(TV_ESL_6)
        assert isinstance(event, EslEvent)
        assert event.content_type == "text/event-plain"
        assert event.name == "CUSTOM"
        assert event.subclass == "mod_audio_stream::connect"
        assert event.headers["FreeSWITCH-IPv6"] == "::1"
        assert event.headers["Event-Date-GMT"] == "Thu, 02 Jan 2025 03:04:05 GMT"
        assert event.headers["channel-name"] == "sofia/internal/1000@10.0.0.5"
        assert event.headers["Content-Length"] == "22"
        assert event.unique_id == UUID
        assert event.body == '{"status":"connected"}'
        assert list(event.headers)[0] == "Event-Subclass"  # original case and order kept
        assert len(event.headers) == 23

    def test_esl_7_outbound_start_commands_serialize(self) -> None:
        assert command("connect") == b"connect\n\n"
        assert command("myevents", "json") == b"myevents json\n\n"
        assert command("linger", "5") == b"linger 5\n\n"
        assert (
            command("event", "json", "CUSTOM", "socket_audio::playback_start", "socket_audio::playback_stop")
            == b"event json CUSTOM socket_audio::playback_start socket_audio::playback_stop\n\n"
        )
        assert sendmsg(app="answer") == b"sendmsg\ncall-command: execute\nexecute-app-name: answer\n\n"

    def test_esl_7_connect_reply_is_channel_data(self) -> None:
        message = replay_one(TV_ESL_7_CONNECT_REPLY)
        assert isinstance(message, ChannelData)
        assert message.unique_id == UUID
        assert message.reply_text == "+OK\n"
        assert message.ok
        assert message.headers["Socket-Mode"] == "async"
        assert message.headers["control"] == "full"
        assert message.headers["Caller-Caller-ID-Name"] == "José"
        assert message.headers["Event-Date-Local"] == "2025-01-02 03:04:05"

    def test_esl_7_replies_to_the_setup_commands(self) -> None:
        data = (
            b"Content-Type: command/reply\nReply-Text: +OK Events Enabled\n\n"
            b"Content-Type: command/reply\nReply-Text: +OK will linger 5 seconds\n\n"
            b"Content-Type: command/reply\nReply-Text: +OK event listener enabled json\n\n"
            b"Content-Type: command/reply\nReply-Text: +OK\n\n"
        )
        replies = replay(data)
        assert [r.reply_text for r in replies if isinstance(r, Reply)] == [
            "+OK Events Enabled",
            "+OK will linger 5 seconds",
            "+OK event listener enabled json",
            "+OK",
        ]

    @pytest.mark.parametrize(
        ("plain", "encoded"),
        [
            ("2024-08-16 13:46:02", "2024-08-16%2013%3A46%3A02"),
            ("sofia/internal/1000@10.0.0.1", "sofia/internal/1000%4010.0.0.1"),
            ("Fri, 16 Aug 2024 16:46:02 GMT", "Fri,%2016%20Aug%202024%2016%3A46%3A02%20GMT"),
            ("::1", "%3A%3A1"),
            ("socket_audio::playback_stop", "socket_audio%3A%3Aplayback_stop"),
            ("+OK\n", "%2BOK%0A"),
            ("é", "%C3%A9"),
        ],
    )
    def test_esl_8_url_encoding_round_trips(self, plain: str, encoded: str) -> None:
        assert url_encode(plain) == encoded
        assert url_decode(encoded) == plain

    def test_esl_8_uppercase_percent_sequence_is_left_alone_and_ambiguous(self) -> None:
        assert url_encode("a%41b") == "a%41b"
        assert url_decode("a%41b") == "aAb"  # the ambiguity §3.4 warns about
        assert url_encode("a%4ab") == "a%254ab"  # lowercase hex is not "already encoded"
        assert url_encode("50%") == "50%25"
        assert url_encode("5%4") == "5%254"


class TestSection2_8SocketAudioVectors:
    """TV-MSA-1, TV-MSA-3, TV-MSA-4 (§2.8) as they travel over ESL."""

    def test_msa_1_sendmsg_serializes_exactly(self) -> None:
        assert (
            sendmsg(
                call_command="execute",
                app="socket_audio",
                arg="127.0.0.1 40123",
                event_uuid="0b7e9a52-0001-4000-8000-000000000001",
            )
            == TV_MSA_1
        )

    def test_msa_1_reply_is_ok(self) -> None:
        message = replay_one(b"Content-Type: command/reply\nReply-Text: +OK\n\n")
        assert isinstance(message, Reply) and message.ok

    def test_msa_3_flush_api_ok(self) -> None:
        assert command("api", "uuid_socket_audio_flush", UUID) == f"api uuid_socket_audio_flush {UUID}\n\n".encode()
        message = replay_one(b"Content-Type: api/response\nContent-Length: 4\n\n+OK\n")
        assert isinstance(message, ApiResponse) and message.ok and message.body == "+OK\n"

    def test_msa_3_flush_of_unknown_uuid_is_an_error_body(self) -> None:
        body = f"-ERR Session not found: {UUID}\n".encode()
        data = b"Content-Type: api/response\nContent-Length: " + str(len(body)).encode() + b"\n\n" + body
        message = replay_one(data)
        assert isinstance(message, ApiResponse)
        assert not message.ok
        assert message.body == body.decode()

    def test_msa_4_playback_stop_event_plain(self) -> None:
        event = replay_one(TV_MSA_4)
        assert isinstance(event, EslEvent)
        assert event.name == "CUSTOM"
        assert event.subclass == "socket_audio::playback_stop"
        assert event.headers["Playback-Stop-Reason"] == "flush"
        assert event.unique_id == UUID
        assert event.body is None

    def test_vectors_back_to_back_in_one_stream(self) -> None:
        messages = replay(TV_ESL_6 + TV_MSA_4 + TV_ESL_5 + b"Content-Type: api/response\nContent-Length: 4\n\n+OK\n")
        assert [type(m).__name__ for m in messages] == ["EslEvent", "EslEvent", "EslEvent", "ApiResponse"]


class TestSection3_1Framing:
    """Message framing and dispatch on Content-Type (§3.1)."""

    def test_leading_blank_lines_are_skipped(self) -> None:
        message = replay_one(b"\n\r\n\nContent-Type: auth/request\n\n")
        assert isinstance(message, AuthRequest)

    def test_carriage_returns_are_ignored(self) -> None:
        message = replay_one(b"Content-Type: command/reply\r\nReply-Text: +OK\r\n\r\n")
        assert isinstance(message, Reply) and message.reply_text == "+OK"

    def test_header_lookups_ignore_case_and_keep_spelling(self) -> None:
        message = replay_one(b"content-type: command/reply\nREPLY-TEXT: +OK\n\n")
        assert isinstance(message, Reply)
        assert message.reply_text == "+OK"
        assert list(message.headers) == ["content-type", "REPLY-TEXT"]
        assert "Reply-Text" in message.headers
        assert 3 not in message.headers  # type: ignore[comparison-overlap]

    def test_header_with_empty_value(self) -> None:
        message = replay_one(b"Content-Type: command/reply\nReply-Text:\nX-Empty: \n\n")
        assert isinstance(message, Reply)
        assert message.reply_text == "" and not message.ok
        assert message.headers["x-empty"] == ""

    def test_command_reply_values_are_not_url_decoded(self) -> None:
        message = replay_one(b"Content-Type: command/reply\nReply-Text: +OK filter added. [a%41]=[b]\n\n")
        assert isinstance(message, Reply) and message.reply_text == "+OK filter added. [a%41]=[b]"

    def test_body_length_counts_bytes_not_characters(self) -> None:
        body = "é\n".encode()
        message = replay_one(b"Content-Type: api/response\nContent-Length: 3\n\n" + body)
        assert isinstance(message, ApiResponse) and message.body == "é\n"

    def test_api_response_without_body(self) -> None:
        message = replay_one(b"Content-Type: api/response\n\n")
        assert message == ApiResponse(Headers([("Content-Type", "api/response")]), "")

    def test_log_data(self) -> None:
        body = b"2025-01-02 03:04:05 [INFO] mod_x.c:1 hello\n"
        data = (
            b"Content-Type: log/data\nContent-Length: "
            + str(len(body)).encode()
            + b"\nLog-Level: 6\nText-Channel: 3\nLog-File: mod_x.c\nLog-Func: f\nLog-Line: 1\nUser-Data: \n\n"
            + body
        )
        message = replay_one(data)
        assert isinstance(message, LogData)
        assert message.headers["Log-Level"] == "6"
        assert message.body == body.decode()

    def test_linger_notice_then_final_notice(self) -> None:
        data = (
            b"Content-Type: text/disconnect-notice\nControlled-Session-UUID: " + UUID.encode() + b"\n"
            b"Content-Disposition: linger\nChannel-Name: sofia/internal/1000@10.0.0.5\nLinger-Time: 5\n"
            b"Content-Length: 0\n\n"
            b"Content-Type: text/disconnect-notice\nControlled-Session-UUID: " + UUID.encode() + b"\n"
            b"Content-Disposition: disconnect\nContent-Length: 67\n\n" + GOODBYE
        )
        linger, final = replay(data)
        assert isinstance(linger, DisconnectNotice) and linger.linger and linger.body == ""
        assert isinstance(final, DisconnectNotice) and not final.linger and final.body == GOODBYE.decode()

    def test_rude_rejection(self) -> None:
        message = replay_one(b"Content-Type: text/rude-rejection\nContent-Length: 24\n\nAccess Denied, go away.\n")
        assert isinstance(message, RudeRejection)
        assert message.body == "Access Denied, go away.\n"

    def test_xml_event_is_kept_raw(self) -> None:
        xml = b"<event><headers><Event-Name>CUSTOM</Event-Name></headers></event>"
        message = replay_one(b"Content-Type: text/event-xml\nContent-Length: " + str(len(xml)).encode() + b"\n\n" + xml)
        assert message == EslEvent(content_type="text/event-xml", raw=xml.decode())

    def test_unknown_content_type_is_kept_not_fatal(self) -> None:
        with_body = replay_one(b"Content-Type: x/new\nContent-Length: 2\n\nhi")
        assert with_body == UnknownMessage(
            Headers([("Content-Type", "x/new"), ("Content-Length", "2")]),
            "hi",
        )
        without = replay_one(b"Content-Type: x/new\n\n")
        assert isinstance(without, UnknownMessage) and without.body is None

    def test_invalid_utf8_in_a_body_is_replaced_not_fatal(self) -> None:
        message = replay_one(b"Content-Type: api/response\nContent-Length: 2\n\n\xff\n")
        assert isinstance(message, ApiResponse) and message.body == "\ufffd\n"

    def test_leading_zeros_in_content_length(self) -> None:
        message = replay_one(b"Content-Type: api/response\nContent-Length: 0004\n\n+OK\n")
        assert isinstance(message, ApiResponse) and message.body == "+OK\n"

    def test_maximum_content_length_is_accepted(self) -> None:
        parser = parse_whole(f"Content-Type: api/response\nContent-Length: {MAX_BODY_BYTES}\n\n".encode())
        assert parser.state is OPEN and parser.parser_exc is None

    def test_freeswitchs_own_maximum_is_accepted_when_allowed(self) -> None:
        parser = EventSocketParser(max_body=MAX_CONTENT_LENGTH)
        parser.receive_data(f"Content-Type: api/response\nContent-Length: {MAX_CONTENT_LENGTH}\n\n".encode())
        assert parser.state is OPEN and parser.parser_exc is None

    def test_header_block_of_exactly_the_limit_is_accepted(self) -> None:
        head = b"Content-Type: command/reply\n"
        filler_name = b"X-Fill: "
        filler = filler_name + b"a" * (MAX_HEADER_BYTES - len(head) - len(filler_name) - 2) + b"\n"
        assert len(head + filler + b"\n") == MAX_HEADER_BYTES  # the empty line counts
        message = replay_one(head + filler + b"\n")
        assert isinstance(message, Reply)


class TestSection3_4EventSerialization:
    """Plain and JSON event bodies (§3.4)."""

    def plain(self, inner: bytes) -> Message:
        return replay_one(
            b"Content-Type: text/event-plain\nContent-Length: " + str(len(inner)).encode() + b"\n\n" + inner
        )

    def test_encoded_newline_does_not_make_a_fake_line(self) -> None:
        event = self.plain(b"Event-Name: CUSTOM\nX-Text: line1%0AFake-Header: x\n\n")
        assert isinstance(event, EslEvent)
        assert event.headers["X-Text"] == "line1\nFake-Header: x"
        assert "Fake-Header" not in event.headers

    def test_plain_event_without_final_newline_is_tolerated(self) -> None:
        event = self.plain(b"Event-Name: HEARTBEAT\nX: y")
        assert isinstance(event, EslEvent) and event.name == "HEARTBEAT" and event.headers["X"] == "y"

    def test_plain_event_with_missing_name(self) -> None:
        event = self.plain(b"X: y\n\n")
        assert isinstance(event, EslEvent) and event.name == "" and event.subclass is None

    def test_plain_event_with_empty_outer_body(self) -> None:
        event = replay_one(b"Content-Type: text/event-plain\n\n")
        assert event == EslEvent(headers=Headers())

    def test_plain_event_with_short_inner_body_fails(self) -> None:
        inner = b"Event-Name: CUSTOM\nContent-Length: 10\n\nabc"
        data = b"Content-Type: text/event-plain\nContent-Length: " + str(len(inner)).encode() + b"\n\n" + inner
        assert failed_with(data) == "event body has 3 bytes, its content-length says 10"

    def test_json_multi_valued_and_non_string_members(self) -> None:
        obj = {"Event-Name": "CUSTOM", "X-Multi": ["a", "b"], "X-Num": 5, "_body": "x"}
        body = json.dumps(obj).encode()
        event = replay_one(
            b"Content-Type: text/event-json\nContent-Length: " + str(len(body)).encode() + b"\n\n" + body
        )
        assert isinstance(event, EslEvent)
        assert event.headers["X-Multi"] == "ARRAY::a|:b"
        assert event.headers["X-Num"] == "5"
        assert event.body == "x"

    def test_json_event_without_body(self) -> None:
        body = b'{"Event-Name":"HEARTBEAT"}'
        event = replay_one(
            b"Content-Type: text/event-json\nContent-Length: " + str(len(body)).encode() + b"\n\n" + body
        )
        assert isinstance(event, EslEvent) and event.name == "HEARTBEAT" and event.body is None

    @pytest.mark.parametrize(
        ("body", "why"),
        [
            (b"{not json", "does not parse"),
            (b"\xff\xfe", "does not parse"),
            (b"[" * 100_000, "does not parse"),
            (b"[1]", "is not an object"),
        ],
    )
    def test_bad_json_event_fails(self, body: bytes, why: str) -> None:
        data = b"Content-Type: text/event-json\nContent-Length: " + str(len(body)).encode() + b"\n\n" + body
        assert failed_with(data) == f"event json of {len(body)} bytes {why}"

    def test_url_decode_leaves_plus_and_bad_escapes(self) -> None:
        assert url_decode("a+b%zz%4") == "a+b%zz%4"
        assert url_decode("%FF") == "\ufffd"


class TestSection3_1BadInput:
    """Bad input never raises: parser_exc, terminal FAILED state (HOUSE_STYLE point 1)."""

    def test_garbage_line(self) -> None:
        message = failed_with(b"hello world\n\n")
        assert message == "malformed header line 1 (12 bytes)"

    @pytest.mark.parametrize("line", [b": value\n", b"Bad Name: x\n", b" Lead: x\n"])
    def test_bad_header_names(self, line: bytes) -> None:
        assert failed_with(line).startswith("malformed header line 1")

    def test_huge_content_length(self) -> None:
        assert failed_with(b"Content-Type: api/response\nContent-Length: 16777217\n\n") == (
            "content-length 16777217 exceeds the limit of 1048576 bytes"
        )

    def test_a_body_over_the_limit_is_refused_before_it_is_read(self) -> None:
        """FreeSWITCH's events are a few KiB (§3.4); a 16 MiB body would be held whole."""
        parser = EventSocketParser(max_body=4096)
        parser.receive_data(b"Content-Type: api/response\nContent-Length: 4097\n\n")
        assert parser.state is FAILED
        assert str(parser.parser_exc) == "content-length 4097 exceeds the limit of 4096 bytes"
        parser.receive_data(bytes(4097))  # the body that follows is not buffered
        assert parser.events_received() == []

    def test_the_limit_is_at_most_freeswitchs_own(self) -> None:
        with pytest.raises(LocalProtocolError, match="max_body 16777217 is not within 0-16777216 bytes"):
            EventSocketParser(max_body=MAX_CONTENT_LENGTH + 1)

    def test_a_parser_keeps_no_big_buffer_after_a_big_body(self) -> None:
        """A link lives as long as its call: one big body must not stay allocated in it."""
        body = b"+" * MAX_BODY_BYTES
        message = b"Content-Type: api/response\nContent-Length: " + str(len(body)).encode() + b"\n\n" + body
        tracemalloc.start()
        try:
            parser = EventSocketParser()
            for i in range(0, len(message), 65536):
                parser.receive_data(message[i : i + 65536])
            (response,) = parser.events_received()
            assert isinstance(response, ApiResponse) and len(response.body) == len(body)
            del response
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert parser.state is OPEN
        assert held < len(body) // 4, f"the parser holds {held} bytes after a {len(body)}-byte body"

    def test_enormous_content_length_is_not_converted(self) -> None:
        digits = "9" * 50_000
        assert failed_with(f"Content-Type: api/response\nContent-Length: {digits}\n\n".encode()).startswith(
            "content-length 99999999999999999999 exceeds"
        )

    @pytest.mark.parametrize("value", [b"abc", b"-1", b"", b"\xd9\xa3", b"1 2"])
    def test_non_numeric_content_length(self, value: bytes) -> None:
        assert failed_with(b"Content-Type: api/response\nContent-Length: " + value + b"\n\n").endswith(
            "is not a number"
        )

    def test_header_block_too_long_without_newline(self) -> None:
        parser = EventSocketParser()
        for _ in range(MAX_HEADER_BYTES // 4096 + 1):
            parser.receive_data(b"x" * 4096)
        assert parser.state is FAILED
        assert str(parser.parser_exc) == "header block exceeds 65536 bytes"

    def test_header_block_too_long_in_many_lines(self) -> None:
        line = b"X-Fill: " + b"a" * 100 + b"\n"
        message = failed_with(b"Content-Type: command/reply\n" + line * (MAX_HEADER_BYTES // len(line) + 1))
        assert message == "header block exceeds 65536 bytes"

    def test_header_block_one_byte_over_the_limit(self) -> None:
        head = b"Content-Type: command/reply\n"
        filler = b"X-Fill: " + b"a" * (MAX_HEADER_BYTES - len(head) - 9) + b"\n"
        assert len(head + filler + b"\n") == MAX_HEADER_BYTES + 1
        assert failed_with(head + filler + b"\n") == "header block exceeds 65536 bytes"

    def test_missing_content_type(self) -> None:
        assert failed_with(b"Reply-Text: +OK\n\n") == "message with 1 headers has no content-type"

    def test_eof_mid_body(self) -> None:
        message = failed_with(b"Content-Type: api/response\nContent-Length: 4\n\n+O", eof=True)
        assert message == "connection closed after 2 of 4 body bytes"

    def test_eof_mid_header_line(self) -> None:
        message = failed_with(b"Content-Type: api/resp", eof=True)
        assert message == "connection closed inside a header block after 22 bytes of a line"

    def test_eof_after_header_lines_without_the_empty_line(self) -> None:
        message = failed_with(b"Content-Type: api/response\n", eof=True)
        assert message == "connection closed inside a header block after 0 bytes of a line"

    def test_failed_parser_ignores_more_data_and_eof(self) -> None:
        parser = parse_whole(b"Content-Type: command/reply\nReply-Text: +OK\n\ngarbage\n\n")
        assert parser.state is FAILED
        exc = parser.parser_exc
        assert len(parser.events_received()) == 1  # what came before the garbage is kept
        parser.receive_data(TV_MSA_4)
        parser.receive_eof()
        assert parser.events_received() == []
        assert parser.parser_exc is exc and parser.state is FAILED

    def test_data_after_eof_is_our_bug(self) -> None:
        parser = EventSocketParser()
        parser.receive_eof()
        assert parser.state is CLOSED
        parser.receive_eof()  # harmless
        with pytest.raises(LocalProtocolError, match="3 bytes received after eof"):
            parser.receive_data(b"abc")

    def test_clean_eof_after_blank_lines(self) -> None:
        parser = parse_whole(b"\n\n")
        parser.receive_eof()
        assert parser.state is CLOSED and parser.parser_exc is None

    @settings(max_examples=300, deadline=None)
    @given(
        data=st.one_of(
            st.binary(max_size=2000),
            st.lists(
                st.sampled_from(
                    [
                        b"Content-Type: text/event-plain\n",
                        b"Content-Type: text/event-json\n",
                        b"Content-Type: command/reply\n",
                        b"Content-Type: api/response\n",
                        b"Event-Name: CHANNEL_DATA\n",
                        b"Content-Length: 5\n",
                        b"Content-Length: 30\n",
                        b"Content-Length: x\n",
                        b"X: %41%zz\n",
                        b"{}",
                        b'{"_body":1}',
                        b"\n",
                        b"\r\n",
                        b":",
                        b"\xff",
                    ]
                ),
                max_size=40,
            ).map(b"".join),
        ),
        cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=40),
        eof=st.booleans(),
    )
    def test_random_bytes_in_random_chunks_only_ever_give_remote_protocol_errors(
        self, data: bytes, cuts: list[int], eof: bool
    ) -> None:
        parser = EventSocketParser()
        pos = 0
        for cut in cuts:
            parser.receive_data(data[pos : pos + cut])
            pos += cut
        parser.receive_data(data[pos:])
        if eof:
            parser.receive_eof()
        for message in parser.events_received():
            assert isinstance(message, get_args(Message))
        assert parser.parser_exc is None or type(parser.parser_exc) is RemoteProtocolError
        assert (parser.state is FAILED) == (parser.parser_exc is not None)


class TestSection3_1Serializers:
    """What we send: commands and sendmsg (§3.1, §3.3, §3.6)."""

    def test_command_with_body_gets_content_length(self) -> None:
        assert command("sendevent", "CUSTOM", headers=[("Event-Subclass", "farm::x")], body="hé") == (
            b"sendevent CUSTOM\nEvent-Subclass: farm::x\nContent-Length: 3\n\nh\xc3\xa9"
        )
        assert command("x", body=b"\x00\x01") == b"x\nContent-Length: 2\n\n\x00\x01"

    @pytest.mark.parametrize(
        ("args", "kwargs"),
        [
            (("api", "a\nb"), {}),
            (("api", "a\rb"), {}),
            (("api",), {"headers": {"X": "a\nb"}}),
            (("api",), {"headers": {"X\n": "a"}}),
            (("api",), {"headers": {"X Y": "a"}}),
            (("api",), {"headers": {"X:Y": "a"}}),
            (("api",), {"headers": {"": "a"}}),
            (("api",), {"headers": {"content-length": "3"}, "body": "abc"}),
            (("",), {}),
            (("two words",), {}),
        ],
    )
    def test_command_rejects_what_the_wire_cannot_carry(self, args: tuple[str, ...], kwargs: dict[str, object]) -> None:
        with pytest.raises(LocalProtocolError):
            command(*args, **kwargs)  # type: ignore[arg-type]

    def test_command_rejects_an_oversized_body(self) -> None:
        with pytest.raises(LocalProtocolError, match="body of 16777217 bytes exceeds 16777216 bytes"):
            command("sendevent", "CUSTOM", body=b"x" * (MAX_CONTENT_LENGTH + 1))

    def test_line_break_message_gives_position(self) -> None:
        with pytest.raises(LocalProtocolError, match="command line has a line break at position 5 of 7"):
            command("api", "a\nb")

    def test_sendmsg_with_uuid_and_all_options(self) -> None:
        assert (
            sendmsg(
                UUID,
                app="playback",
                arg="/tmp/x.wav",
                loops=2,
                event_lock=True,
                event_uuid="e",
                headers={"hold-bleg": "true"},
            )
            == (
                f"sendmsg {UUID}\ncall-command: execute\nexecute-app-name: playback\nexecute-app-arg: /tmp/x.wav\n"
                "loops: 2\nevent-lock: true\nEvent-UUID: e\nhold-bleg: true\n\n"
            ).encode()
        )

    def test_sendmsg_hangup_needs_no_app(self) -> None:
        assert sendmsg(UUID, "hangup", headers=[("hangup-cause", "NORMAL_CLEARING")]) == (
            f"sendmsg {UUID}\ncall-command: hangup\nhangup-cause: NORMAL_CLEARING\n\n".encode()
        )

    def test_sendmsg_multiline_argument_goes_in_the_body(self) -> None:
        assert sendmsg(app="set", body="a=1\nb=2") == (
            b"sendmsg\ncall-command: execute\nexecute-app-name: set\ncontent-type: text/plain\n"
            b"content-length: 7\n\na=1\nb=2"
        )

    def test_sendmsg_rejects_misuse(self) -> None:
        with pytest.raises(LocalProtocolError, match="needs an application name"):
            sendmsg()
        with pytest.raises(LocalProtocolError, match="not both"):
            sendmsg(app="set", arg="a", body="b")
        with pytest.raises(LocalProtocolError, match="line break"):
            sendmsg(app="set", arg="a=1\nb=2")


class TestExceptions:
    """farm/protocol/exceptions.py hierarchy (HOUSE_STYLE point 8)."""

    def test_both_blames_are_protocol_errors(self) -> None:
        assert issubclass(RemoteProtocolError, ProtocolError)
        assert issubclass(LocalProtocolError, ProtocolError)
        assert not issubclass(RemoteProtocolError, LocalProtocolError)

    def test_headers_mapping_behaviour(self) -> None:
        headers = Headers([("A", "1"), ("b", "2"), ("a", "3")])
        assert list(headers.items()) == [("A", "3"), ("b", "2")]
        assert headers == {"A": "3", "b": "2"}
        assert hash(headers) == hash(Headers([("A", "3"), ("b", "2")]))
        assert repr(headers) == "Headers([('A', '3'), ('b', '2')])"
        with pytest.raises(KeyError):
            headers["c"]
