"""The reference call-flow robot (bench/robot.py) end to end, with both modules at once.

A real node (broker, ingress, a worker, the Korean model, deploy/intents/ko-example.toml)
and FreeSWITCH played by the peer in bench/ (not FreeSWITCH: bench/fs_peer*.py, byte for
byte per PROTOCOLS.md): its inbound Event Socket, where the robot sends its commands, one
channel the dialplan answered and parked (the robot starts mod_audio_stream on it) and one
that ran ``socket farm:8084 async full`` (farm takes it, mod_socket_audio). Both run the
committed example, deploy/robot/confirm_appointment.yaml. The callers say what the AMD
corpus makes (bench/amd_corpus.py: espeak-ng and sox, a human "안녕하세요", a voicemail
greeting with its beep) and tests/data/ko_02.wav ("네 맞습니다 잠시만 기다려 주세요": yes).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soxr

from bench.amd_corpus import Case, generate
from bench.fs_peer import SocketAudioCall
from bench.fs_peer_inbound import InboundEslServer
from bench.robot import CallRun, Robot
from bench.robot_scenario import load

from .conftest import DATA, MS, Node, start_node


pytestmark = pytest.mark.skipif(
    not (shutil.which("espeak-ng") and shutil.which("sox")), reason="espeak-ng and sox make the answers"
)

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "deploy" / "robot" / "confirm_appointment.yaml"
INTENTS = ROOT / "deploy" / "intents" / "ko-example.toml"
WAIT_S = 90_000 * MS  # generous: a shared, loaded machine


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = start_node(tmp_path_factory.mktemp("farm-robot"), "--intents", str(INTENTS), workers=1)
    yield n
    assert n.stop() == 0


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, Case]]:
    """16 kHz PCM of the first human and voicemail-with-beep answers of the corpus."""
    out = tmp_path_factory.mktemp("answers")
    first: dict[str, tuple[bytes, Case]] = {}
    for case in generate(out, count=4, seed=1, kinds=["human", "machine_beep"]):
        if case.kind not in first:
            first[case.kind] = (pcm16k(out / case.file), case)
    return first


def pcm16k(path: Path) -> bytes:
    with wave.open(str(path)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        rate = w.getframerate()
    return pcm.tobytes() if rate == 16000 else soxr.resample(pcm, rate, 16000).astype("<i2").tobytes()


def prompts_heard(call: SocketAudioCall) -> int:
    """Prompts the caller heard to their end: mod_dptools' playback (uuid_broadcast of the
    file mod_audio_stream wrote) or mod_socket_audio's queue playing out."""
    return sum(
        1
        for e in call.events
        if (e.name == "PLAYBACK_STOP" and e.header("Playback-Status") == "done")
        or (e.subclass == "socket_audio::playback_stop" and e.header("Playback-Stop-Reason") == "complete")
    )


async def until(check: object, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not check():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


async def two_calls(
    node: Node, greeting: bytes, answer: bytes | None
) -> tuple[InboundEslServer, dict[str, tuple[SocketAudioCall, CallRun]]]:
    """One mod_audio_stream and one mod_socket_audio call through the robot; each caller
    says ``greeting`` when the stream is up and ``answer`` (if any) once the first prompt
    has played out. Returns the switch and, per module, the peer's channel and the run."""
    switch = await InboundEslServer().start()
    parked = SocketAudioCall(answered=True, linger_scale=0.1)
    socketed = SocketAudioCall(linger_scale=0.1)
    for call in (parked, socketed):
        switch.attach(call)
    scenario = load(SCENARIO)

    async def caller(call: SocketAudioCall) -> None:
        with contextlib.suppress(ConnectionError):  # a machine talks on until it is hung up on
            await call.say(greeting, timeout=WAIT_S)
        if answer is not None:
            await until(lambda: prompts_heard(call) >= 1, "the question played out")
            await call.say(answer, timeout=WAIT_S)

    try:
        async with Robot(
            scenario,
            esl_address=f"127.0.0.1:{switch.port}",
            farm_ws=f"ws://127.0.0.1:{node.port}",
            events=node.events,
            commands=node.commands,
        ) as robot:
            parked.park()
            stream_run = asyncio.create_task(robot.run_audio_stream(parked.uuid))
            await socketed.connect("127.0.0.1", node.esl_port, timeout=WAIT_S)
            callers = [asyncio.create_task(caller(c)) for c in (parked, socketed)]
            socket_run = await robot.wait_call(socketed.uuid, WAIT_S)
            runs = {
                "audio_stream": (parked, await asyncio.wait_for(stream_run, WAIT_S)),
                "socket_audio": (socketed, socket_run),
            }
            await asyncio.gather(*callers)
            for call in (parked, socketed):
                if not call.hung_up:  # transferred: the agent's call ends
                    await call.hangup()
            for _, run in runs.values():  # farm's last word on each call
                while run.ended is None and await run.next(asyncio.get_running_loop().time() + WAIT_S):
                    pass
        return switch, runs
    finally:
        for call in (parked, socketed):
            await call.aclose()
        await switch.close()


def api_lines(switch: InboundEslServer, uuid: str, name: str) -> list[str]:
    return [c.line for c in switch.commands if c.line.startswith(f"api {name} {uuid}")]


def test_a_person_who_says_yes_is_transferred_on_both_modules(
    node: Node, answers: dict[str, tuple[bytes, Case]]
) -> None:
    greeting, case = answers["human"]
    end = max(s.end_ms for s in case.speech)
    greeting = greeting[: (end + 100) * 32]  # "안녕하세요", then the line goes quiet
    answer = pcm16k(DATA / "ko_02.wav")
    switch, runs = asyncio.run(two_calls(node, greeting, answer))
    for module, (call, run) in runs.items():
        assert run.module == module
        trace = [(e.type, e.offset_ms, e.get("text") or e.get("intent") or e.get("id")) for e in run.events]
        assert run.path == [("answered", "human"), ("ask", "yes"), ("confirmed", "ok")], (module, run.path, trace)
        # farm's events drove it: its AMD said human, its intent said yes, for this call.
        assert run.amd is not None and run.amd["result"] == "human" and run.amd.call_id == call.uuid
        [yes] = [e for e in run.events if e.type == "intent" and e["intent"] == "yes"][:1]
        assert yes.call_id == call.uuid
        # FreeSWITCH (the peer) was told to transfer, and did.
        assert api_lines(switch, call.uuid, "uuid_transfer") == [f"api uuid_transfer {call.uuid} 3000 XML agents"]
        assert [t[1:] for t in call.transfers] == [("3000", "XML", "agents")]
        assert call.channel.variables["transfer_source"].endswith(f":{call.uuid}:bl_xfer:3000/agents/XML")
        # Two prompts: the question, then "transferring you"; both played out.
        assert [e["id"] for e in run.events if e.type == "playback_stop"] == ["ask-1", "confirmed-2"]
        assert not api_lines(switch, call.uuid, "uuid_kill")
    parked, _ = runs["audio_stream"]
    [start] = api_lines(switch, parked.uuid, "uuid_audio_stream")
    assert start.startswith(
        f"api uuid_audio_stream {parked.uuid} start ws://127.0.0.1:{node.port}/{parked.uuid}?rate=16000&amd=1 mono 16k {{"
    )
    # mod_audio_stream wrote each prompt to a file; the robot played each with uuid_broadcast.
    broadcasts = api_lines(switch, parked.uuid, "uuid_broadcast")
    assert broadcasts == [f"api uuid_broadcast {parked.uuid} {f} aleg" for f in parked.audio_stream.files]
    # The question played out before the caller answered; the hang-up after the transfer
    # may cut the last file (farm times a streamAudio prompt by its own clock, FreeSWITCH
    # starts the file a little later).
    assert [p[1] for p in parked.playbacks] == [str(f) for f in parked.audio_stream.files]
    assert parked.playbacks[0][2] == "done"
    socketed, _ = runs["socket_audio"]
    assert not api_lines(switch, socketed.uuid, "uuid_audio_stream") and socketed.played  # farm streamed them


def test_a_voicemail_gets_the_message_after_its_beep_and_is_hung_up_on_both_modules(
    node: Node, answers: dict[str, tuple[bytes, Case]]
) -> None:
    greeting, case = answers["machine_beep"]
    switch, runs = asyncio.run(two_calls(node, greeting, None))
    [truth] = [t for t in case.tones if t.kind == "beep"]
    for module, (call, run) in runs.items():
        assert run.path == [
            ("answered", "machine"),
            ("voicemail", "beep"),
            ("leave_message", "played"),
            ("hang_up", "ok"),
        ], (module, run.path, [(e.type, e.offset_ms, e.get("result") or e.get("id")) for e in run.events])
        assert run.beep is not None and abs(run.beep["end_ms"] - truth.end_ms) <= 200, (module, run.beep.data)
        # The drop began after the beep, in the call's own audio time, and played out.
        [start] = [e for e in run.events if e.type == "playback_start"]
        [stop] = [e for e in run.events if e.type == "playback_stop"]
        assert start["id"] == stop["id"] == "leave_message-1" and stop["reason"] == "complete"
        assert start.offset_ms >= run.beep["end_ms"], (module, start.offset_ms, run.beep.data)
        # Then FreeSWITCH (the peer) was told to hang up, and the channel did.
        assert api_lines(switch, call.uuid, "uuid_kill") == [f"api uuid_kill {call.uuid} NORMAL_CLEARING"]
        assert call.hung_up and call.hangup_cause == "NORMAL_CLEARING"
        assert run.ended is not None and run.ended["reason"] == "hangup"
        assert not call.transfers
