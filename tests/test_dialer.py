"""What a dialer asks for besides words, end to end: AMD, beeps and tones, intents.

A real node (broker, ingress, a worker, the Korean model) hears generated answers
(bench/amd_corpus.py: espeak-ng and sox, 8 kHz, G.711 µ-law, line noise; made here,
nothing downloaded) and the Korean fixtures, streamed as mod_audio_stream does
(tests/peers.py) or as mod_socket_audio does (bench/fs_peer.py, a peer standing in for
FreeSWITCH byte for byte). The answers' truth is the corpus manifest: what was put in
each file, not what the farm said about it last time.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soxr

from bench.amd_corpus import Case, generate
from bench.fs_peer import SocketAudioCall
from farm.client import Commands, Subscription
from farm.protocol.events import Event
from farm.sender import metadata_for, read_wav, send_pcm

from .conftest import DATA, MS, Node, run_call, start_node


pytestmark = pytest.mark.skipif(
    not (shutil.which("espeak-ng") and shutil.which("sox")), reason="espeak-ng and sox make the answers"
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_INTENTS = ROOT / "deploy" / "intents" / "ko-example.toml"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = start_node(tmp_path_factory.mktemp("farm-dialer"), "--intents", str(EXAMPLE_INTENTS), workers=1)
    yield n
    assert n.stop() == 0


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Case]]:
    """The first case of each kind the tests need, from the deterministic corpus."""
    out = tmp_path_factory.mktemp("answers")
    cases = generate(out, count=40, seed=1, kinds=["human", "machine_beep", "sit"])
    first: dict[str, tuple[Path, Case]] = {}
    for case in cases:
        first.setdefault(case.kind, (out / case.file, case))
    return first


def of(events: list[Event], type: str) -> list[Event]:
    return [e for e in events if e.type == type]


def test_a_human_greeting_is_decided_human_once_when_the_url_asks_for_amd(
    node: Node, answers: dict[str, tuple[Path, Case]]
) -> None:
    wav, case = answers["human"]
    run = asyncio.run(run_call(node, wav, realtime=False, path_suffix="?amd=1"))
    [amd] = run.of("amd")
    assert (amd["result"], amd["reason"]) == ("human", "after_greeting_silence"), amd.data
    # Decided after the greeting ended, from what was heard: the features say so.
    speech_end = max(s.end_ms for s in case.speech)
    assert speech_end < amd["decision_ms"] <= case.duration_ms
    assert amd["features"]["words"] >= 1 and amd["features"]["initial_silence_ms"] >= 0
    assert not run.of("beep") and not run.of("error")
    assert run.events[-1].type == "call_end"


def test_a_voicemail_greeting_is_a_machine_and_its_beep_end_is_published_within_100_ms(
    node: Node, answers: dict[str, tuple[Path, Case]]
) -> None:
    wav, case = answers["machine_beep"]
    call_id = f"amd-{uuid.uuid4()}"
    metadata = metadata_for(call_id, 8000, 1, {"amd": True})
    run = asyncio.run(run_call(node, wav, call_id=call_id, realtime=False, metadata=metadata))
    [amd] = run.of("amd")
    assert amd["result"] == "machine", amd.data
    assert run.events[-1]["stats"]["amd"] == "machine"
    [beep] = run.of("beep")
    [truth] = [t for t in case.tones if t.kind == "beep"]
    assert abs(beep["end_ms"] - truth.end_ms) <= 100, (beep.data, truth)
    assert abs(beep["freq_hz"] - truth.freq_hz) <= max(20, truth.freq_hz * 0.02)
    # The voicemail drop starts at the beep's end: it comes before the call's end.
    assert run.events.index(beep) < len(run.events) - 1


def test_tones_are_detected_on_every_call_and_a_call_may_turn_them_off(
    node: Node, answers: dict[str, tuple[Path, Case]]
) -> None:
    wav, case = answers["sit"]
    run = asyncio.run(run_call(node, wav, realtime=False))
    [sit] = [e for e in run.of("tone") if e["kind"] == "sit"]
    [truth] = [t for t in case.tones if t.kind == "sit"]
    assert abs(sit["start_ms"] - truth.start_ms) <= 100 and abs(sit["end_ms"] - truth.end_ms) <= 100
    assert not run.of("amd")  # not asked for
    call_id = f"quiet-{uuid.uuid4()}"
    metadata = metadata_for(call_id, 8000, 1, {"tones": False})
    quiet = asyncio.run(run_call(node, wav, call_id=call_id, realtime=False, metadata=metadata))
    assert not quiet.of("tone") and not quiet.of("beep") and quiet.events[-1].type == "call_end"


def test_the_node_intents_file_names_what_the_caller_meant(node: Node) -> None:
    """ko_02 says "네 맞습니다 잠시만 기다려 주세요": yes, and hold_on ("잠시만 기다려"), in
    deploy/intents/ko-example.toml; Vosk does not always hear the "맞습니다"."""
    run = asyncio.run(run_call(node, DATA / "ko_02.wav", realtime=False))
    intents = run.of("intent")
    assert intents, [(e.type, e.get("text")) for e in run.events]
    first = intents[0]
    assert first["source"] == "rules" and "hold_on" in [first["intent"], *first["also"]], first.data
    heard = " ".join(e["text"] for e in run.events if e.type in ("partial", "final"))
    assert first["matched"].replace(" ", "") in heard.replace(" ", "")
    # At most one report per utterance, unless a final revised an early one.
    assert len([e for e in intents if not e["revised"]]) <= len(run.of("final"))
    # The call's figures in call_end agree with its own events.
    stats = run.events[-1]["stats"]
    starts, ends = run.of("speech_start"), run.of("speech_end")
    assert stats["first_speech_ms"] == starts[0].offset_ms and stats["utterances"] == len(ends)
    assert stats["talk_ms"] == sum(e["duration_ms"] for e in ends) > 0
    assert stats["intents"] == [e["intent"] for e in intents] and stats["amd"] is None
    assert stats["playback_ms"] == 0 and stats["talk_to_playback"] is None and stats["barge_ins"] == 0


def test_a_call_may_bring_its_own_intents_and_bad_ones_are_an_error_that_loses_nothing_else(
    node: Node,
) -> None:
    own = {"intents": {"hold_on": {"phrases": ["기다려"]}}}
    call_id = f"own-{uuid.uuid4()}"
    run = asyncio.run(
        run_call(
            node, DATA / "ko_02.wav", call_id=call_id, realtime=False, metadata=metadata_for(call_id, 16000, 1, own)
        )
    )
    assert [e["intent"] for e in run.of("intent")][:1] == ["hold_on"], [(e.type, e.get("text")) for e in run.events]

    bad = {"intents": {"yes": {"patterns": ["(네+)+"]}}, "amd": {"greeting_ms": "long"}}
    call_id = f"bad-{uuid.uuid4()}"
    run = asyncio.run(
        run_call(
            node, DATA / "ko_02.wav", call_id=call_id, realtime=False, metadata=metadata_for(call_id, 16000, 1, bad)
        )
    )
    reasons = [e["reason"] for e in run.of("error")]
    assert any(r.startswith("intents:") for r in reasons) and any(r.startswith("amd: greeting_ms") for r in reasons)
    assert run.finals and not run.of("intent") and not run.of("amd")  # the call went on without them


def test_a_socket_audio_channel_asks_for_amd_with_a_channel_variable(
    node: Node, answers: dict[str, tuple[Path, Case]]
) -> None:
    wav, _ = answers["human"]
    with wave.open(str(wav)) as w:
        pcm8k = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    pcm16k = soxr.resample(pcm8k, 8000, 16000).astype("<i2").tobytes()

    async def scenario() -> list[Event]:
        peer = SocketAudioCall(variables={"farm_amd": json.dumps({"after_greeting_silence": 700})})
        async with Subscription(node.events, peer.uuid) as sub:
            assert await sub.ready(timeout=30_000 * MS)
            await peer.connect("127.0.0.1", node.esl_port, timeout=30_000 * MS)
            await peer.stream(pcm16k, timeout=30_000 * MS)
            events: list[Event] = []
            while not of(events, "amd"):
                events.append(await sub.next(timeout=60_000 * MS))
            await peer.hangup()
            while events[-1].type != "call_end":
                events.append(await sub.next(timeout=60_000 * MS))
            await peer.aclose()
            return events

    events = asyncio.run(scenario())
    [amd] = of(events, "amd")
    assert amd["result"] == "human", amd.data
    assert not of(events, "error")


def test_amd_by_command_counts_from_the_answer_the_dialer_names(
    node: Node, answers: dict[str, tuple[Path, Case]]
) -> None:
    """A stream that began before the answer (2 s of ringing silence): the dialer says
    "answered now" with the amd command, and AMD decides from there, once."""
    wav, case = answers["human"]
    pcm, rate, _ = read_wav(str(wav))
    # 2 s before the answer: the line's own noise (the answer's lead-in before its first word,
    # repeated), not digital silence, after which webrtcvad would hear the noise as voice.
    lead = pcm[: case.speech[0].start_ms * rate // 1000 * 2]
    ringing = (lead * (2 * rate * 2 // len(lead) + 1))[: 2 * rate * 2]
    call_id = f"amd-cmd-{uuid.uuid4()}"

    async def scenario() -> tuple[dict, dict, list[Event]]:
        async with Subscription(node.events, call_id) as sub, Commands(node.commands) as farm:
            sending = asyncio.create_task(
                send_pcm(f"{node.url}/{call_id}", ringing + pcm, rate=rate, metadata=metadata_for(call_id, rate, 1))
            )
            events = [await sub.next(timeout=30_000 * MS)]  # call_start: the stream is up
            await asyncio.sleep(1.95)
            reply = await farm.amd(call_id)
            again = await farm.amd(call_id)  # answered once: the first request stands
            while events[-1].type != "call_end":
                events.append(await sub.next(timeout=60_000 * MS))
            await sending
            return reply, again, events

    reply, again, events = asyncio.run(scenario())
    assert reply["ok"] and again["at_ms"] == reply["at_ms"]
    assert 1000 <= reply["at_ms"] <= 3000  # where the stream was when asked
    [amd] = of(events, "amd")
    assert (amd["result"], amd["reason"]) == ("human", "after_greeting_silence"), amd.data
    assert amd["from_ms"] == reply["at_ms"] and amd.offset_ms == reply["at_ms"] + amd["decision_ms"]
    # Its initial silence is the greeting's own plus what was left of the ringing.
    first_word = case.speech[0].start_ms + 2000 - reply["at_ms"]
    assert abs(amd["features"]["initial_silence_ms"] - first_word) <= 300, (amd.data, first_word)
