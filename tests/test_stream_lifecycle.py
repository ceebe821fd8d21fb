"""mod_audio_stream lifecycle cases from PROTOCOLS.md §1.7 and §1.10, on a real node:
audio before metadata (libwsc under load) and a reconnect that re-sends the metadata
(IXWebSocket builds). The sender is farm.sender, which frames audio as the module does."""

from __future__ import annotations

import asyncio

from .conftest import DATA, Node, decode_heard, run_call


def test_audio_that_arrives_before_the_metadata_is_held_and_read_at_the_metadata_rate(node: Node) -> None:
    wav = DATA / "ko_02.wav"
    # Five 20 ms frames first, then the metadata that says 16 kHz (the default is 8 kHz).
    run = asyncio.run(run_call(node, wav, realtime=True, metadata_after_frames=5))
    assert run.of("call_start")[0]["rate"] == 16000
    assert run.finals and run.finals == decode_heard(wav, run)
    assert run.of("call_end")[0]["duration_ms"] >= 2500  # no held frame was lost


def test_a_reconnect_with_the_same_call_id_continues_the_call_numbering(node: Node) -> None:
    async def two_legs() -> tuple:
        first = await run_call(node, DATA / "ko_01.wav", call_id="reconnecting", realtime=False)
        second = await run_call(node, DATA / "ko_02.wav", call_id="reconnecting", realtime=False)
        return first, second

    first, second = asyncio.run(two_legs())
    assert first.of("call_start")[0]["leg"] == 1
    assert second.of("call_start")[0]["leg"] == 2
    # One call id, one sequence: the second leg starts where the first one ended.
    assert second.events[0].seq == first.events[-1].seq + 1
    assert second.finals == decode_heard(DATA / "ko_02.wav", second)
