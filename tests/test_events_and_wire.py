"""The two written contracts: the event schema and the broker's FARMW01 frames."""

from __future__ import annotations

import json

import pytest

from farm.broker import wire
from farm.protocol.events import (
    END_REASONS,
    Event,
    EventError,
    call_id_from_topic,
    end_reason_code,
    end_reason_of,
    topic_for,
)


class TestEventSchema:
    def test_an_event_round_trips_through_json(self) -> None:
        e = Event("final", "c1", 7, 5120, {"text": "안녕", "words": [{"word": "안녕"}]}, {"recv": 1, "asr": 2}, 1)
        back = Event.from_json(e.to_json())
        assert back == e
        assert back["text"] == "안녕"

    def test_the_json_is_flat_with_stage_stamps_under_t(self) -> None:
        e = Event("speech_start", "c1", 1, 40, {}, {"recv": 10})
        obj = json.loads(e.to_json())
        assert obj == {"v": 1, "type": "speech_start", "call_id": "c1", "seq": 1, "offset_ms": 40, "channel": 0, "t": {"recv": 10}}

    def test_stamped_adds_a_stage_without_changing_the_original(self) -> None:
        e = Event("partial", "c1", data={"text": "a"})
        s = e.stamped("publish", 99)
        assert s.stamps == {"publish": 99} and e.stamps == {}

    def test_unknown_type_is_refused(self) -> None:
        with pytest.raises(EventError, match="unknown event type"):
            Event("shout", "c1")

    def test_data_may_not_shadow_common_members(self) -> None:
        with pytest.raises(EventError, match="redefine"):
            Event("final", "c1", data={"seq": 3})

    @pytest.mark.parametrize(
        "raw, message",
        [
            (b"not json", "not JSON"),
            (b"[1]", "not a JSON object"),
            (b'{"v": 2, "type": "final"}', "schema version"),
            (b'{"v": 1, "type": "final"}', "lacks member"),
            (b'{"v": 1, "type": "final", "call_id": "c", "seq": "x", "offset_ms": 0}', "malformed"),
            (b'{"v": 1, "type": "final", "call_id": "c", "seq": 1, "offset_ms": 0, "t": 5}', "'t' is not an object"),
        ],
    )
    def test_malformed_events_raise_event_error(self, raw: bytes, message: str) -> None:
        with pytest.raises(EventError, match=message):
            Event.from_json(raw)

    def test_every_end_reason_has_a_ring_code_and_back(self) -> None:
        assert set(END_REASONS) == {"hangup", "stop", "drain", "refused", "idle", "error", "lost"}
        codes = [end_reason_code(r) for r in END_REASONS]
        assert 0 not in codes and len(set(codes)) == len(codes)
        assert [end_reason_of(c) for c in codes] == list(END_REASONS)
        assert (end_reason_code("shrug"), end_reason_of(0), end_reason_of(99)) == (0, "", "")

    def test_topic_of_one_call_is_not_a_prefix_of_another(self) -> None:
        assert not topic_for("abcd").startswith(topic_for("abc"))
        assert call_id_from_topic(topic_for("abc")) == "abc"


class TestBrokerWire:
    def test_a_message_parses_back_to_its_command_and_body(self) -> None:
        frames = wire.message(wire.B_ASSIGN, "call-1", "farm-1-1", wire.encode_info({"a": 1}))
        assert frames[:3] == [b"", wire.HEADER, wire.B_ASSIGN]
        command, body = wire.parse(frames)
        assert command == wire.B_ASSIGN
        assert body[:2] == ["call-1", "farm-1-1"] and wire.decode_info(body[2]) == {"a": 1}

    def test_every_command_has_a_name(self) -> None:
        for cmd in (wire.W_READY, wire.W_HEARTBEAT, wire.W_DONE, wire.W_DISCONNECT, wire.W_RELEASED, wire.W_FLUSH,
                    wire.B_ASSIGN, wire.B_RELEASE, wire.B_HEARTBEAT, wire.B_DISCONNECT, wire.B_DROP, wire.I_OPEN,
                    wire.I_HEARTBEAT, wire.I_STATUS, wire.I_GAVE_UP, wire.I_FLUSH):
            assert not wire.name(cmd).startswith("b'")

    @pytest.mark.parametrize(
        "frames, message",
        [
            ([b"x", wire.HEADER, wire.W_READY], "malformed envelope"),
            ([b""], "malformed envelope"),
            ([b"", b"FARMW99", wire.W_HEARTBEAT, b"1"], "header"),
            ([b"", wire.HEADER, b"\x7f"], "unknown command"),
            ([b"", wire.HEADER, wire.W_DONE], r"carries 0 body frames, expected \(1, 2\)"),
            ([b"", wire.HEADER, wire.W_FLUSH, b"c"], "carries 1 body frames, expected 2"),
            ([b"", wire.HEADER, wire.W_DONE, b"\xff"], "not UTF-8"),
        ],
    )
    def test_frames_off_the_contract_raise_wire_error(self, frames: list[bytes], message: str) -> None:
        with pytest.raises(wire.WireError, match=message):
            wire.parse(frames)

    def test_building_a_message_checks_the_arity(self) -> None:
        with pytest.raises(wire.WireError, match=r"takes \(1, 2\) body frames, got 0"):
            wire.message(wire.W_DONE)
        with pytest.raises(wire.WireError, match="unknown command"):
            wire.message(b"\x7f")

    def test_ready_names_the_calls_a_worker_still_holds_or_none(self) -> None:
        held = [("c1", "farm-1-1", '{"a":1}'), ("c2", "farm-1-2", "{}")]
        _, body = wire.parse(wire.message(wire.W_READY, "3", "77", wire.encode_held(held)))
        assert wire.parse_ready(body) == (3, 77, tuple(held))
        _, body = wire.parse(wire.message(wire.W_READY, "3", "77"))
        assert wire.parse_ready(body) == (3, 77, ())
        with pytest.raises(wire.WireError, match="takes"):
            wire.message(wire.W_READY, "3")

    @pytest.mark.parametrize("held", ["nope", "{}", '[["c1", "r1"]]', '[["c1", "r1", 5]]', '["c1"]'])
    def test_a_malformed_held_list_raises_wire_error(self, held: str) -> None:
        with pytest.raises(wire.WireError, match="held"):
            wire.parse_ready(["0", "1", held])

    def test_a_flush_request_carries_its_stamps_through_the_wire(self) -> None:
        request = wire.FlushRequest(1234, 60, 1100, (("recv", 5), ("commit", 6), ("vad", 9)))
        _, body = wire.parse(wire.message(wire.W_FLUSH, "c1", request.encode()))
        assert body[0] == "c1" and wire.FlushRequest.decode(body[1]) == request
        assert wire.FlushRequest.decode("{}") == wire.FlushRequest()

    @pytest.mark.parametrize(
        "raw", ["nope", "[]", '{"voiced_ms": -1}', '{"stamps": [1]}', '{"stamps": {"recv": "x"}}', '{"offset_ms": true}']
    )
    def test_a_malformed_flush_request_raises_wire_error(self, raw: str) -> None:
        with pytest.raises(wire.WireError, match="flush request"):
            wire.FlushRequest.decode(raw)

    @pytest.mark.parametrize("raw", ["nope", "[1, 2]"])
    def test_call_info_must_be_a_json_object(self, raw: str) -> None:
        with pytest.raises(wire.WireError):
            wire.decode_info(raw)
