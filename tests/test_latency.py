"""The latency vocabulary over events' stamps (farm/protocol/latency.py): no sockets."""

from __future__ import annotations

from typing import Any

from farm.protocol.events import Event
from farm.protocol.latency import LATENCY_STAGES, stage_latencies


def event(type: str, stamps: dict[str, int], **data: Any) -> Event:
    return Event(type, "call", 1, 0, data, stamps)


class TestStages:
    def test_speech_start_measures_ingress_dispatch_vad_and_publish(self) -> None:
        e = event("speech_start", {"recv": 10, "commit": 15, "read": 40, "vad": 42, "publish": 50})
        assert stage_latencies(e, 70) == [("ingress", 5), ("dispatch", 25), ("vad", 2), ("publish", 20)]

    def test_a_partial_measures_asr_from_the_commit_of_the_audio_heard(self) -> None:
        e = event("partial", {"recv": 10, "commit": 12, "asr": 300, "publish": 301}, text="x")
        assert stage_latencies(e, 302) == [("ingress", 2), ("asr", 288), ("publish", 1)]

    def test_a_final_ending_an_utterance_measures_end_of_speech_to_final_not_ingress(self) -> None:
        for reason in ("vad", "end"):
            e = event("final", {"recv": 100, "commit": 900, "asr": 1000, "publish": 1010}, reason=reason)
            assert stage_latencies(e, 1100) == [("asr", 100), ("publish", 90), ("end_of_speech_to_final", 1000)]

    def test_an_endpoint_or_reset_final_has_no_end_of_speech(self) -> None:
        for reason in ("endpoint", "reset"):
            e = event("final", {"recv": 100, "commit": 900, "asr": 1000, "publish": 1010}, reason=reason)
            assert [s for s, _ in stage_latencies(e, 1100)] == ["asr", "publish"]

    def test_a_barge_in_measures_first_voiced_frame_to_flush(self) -> None:
        e = event("barge_in", {"recv": 100, "commit": 101, "read": 150, "vad": 151, "flush": 400, "publish": 401})
        assert stage_latencies(e, 402) == [("ingress", 1), ("publish", 1), ("barge_in", 300)]

    def test_missing_stamps_leave_their_stages_out(self) -> None:
        assert stage_latencies(event("call_start", {}), 5) == []
        assert stage_latencies(event("speech_start", {"read": 3}), 5) == []
        assert stage_latencies(event("barge_in", {"recv": 3}), 5) == []

    def test_a_negative_difference_is_left_out(self) -> None:
        e = event("speech_start", {"recv": 10, "commit": 5, "publish": 100})
        assert stage_latencies(e, 50) == []

    def test_every_stage_is_named_in_pipeline_order(self) -> None:
        assert LATENCY_STAGES == (
            "ingress",
            "dispatch",
            "vad",
            "asr",
            "publish",
            "end_of_speech_to_final",
            "barge_in",
        )
