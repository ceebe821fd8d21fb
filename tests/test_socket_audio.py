"""mod_socket_audio calls end to end: outbound Event Socket, audio port, playback, barge-in.

FreeSWITCH here is a **peer** (bench/fs_peer.py), not FreeSWITCH: it follows PROTOCOLS.md
§2, §3 and §7 byte for byte, connects to a real farm node's Event Socket port as
``socket … async full`` would, streams the caller at 16 kHz in 640-byte writes paced at
20 ms, plays farm's 24 kHz playback at real time and honours flush with its 50 ms
discard window. The farm, its workers and the model are real.
"""

from __future__ import annotations

import asyncio
import random
import re
import signal
import time
import uuid
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.fs_peer import InboundEslServer, SocketAudioCall
from farm.client import CommandError, Commands, Subscription
from farm.protocol.events import Event
from tests.conftest import DATA, MS, CallRun, Node, decode_heard, farm_segments, run_call, start_node
from tests.peers import AudioStreamPeer


def pcm_of(name: str) -> bytes:
    with wave.open(str(DATA / name)) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1
        return w.readframes(w.getnframes())


def prompt(seconds: float, rate: int = 22050) -> bytes:
    """A tone at a rate FreeSWITCH does not play, so farm has to convert it."""
    t = np.arange(int(rate * seconds)) / rate
    return (6000 * np.sin(2 * np.pi * 330 * t)).astype("<i2").tobytes()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = start_node(tmp_path_factory.mktemp("farm"))
    yield n
    n.stop()


class Leg:
    """One peer call plus its event subscription."""

    def __init__(self, node: Node, **peer: Any) -> None:
        self.node = node
        self.peer = SocketAudioCall(**peer)
        self.sub = Subscription(node.events, self.peer.uuid)
        self.events: list[Event] = []
        self.speech = b""  # what the caller said, for the reference decode
        self.barge: Event | None = None

    async def start(self, audio: bool = True) -> Leg:
        await asyncio.sleep(0.2)  # the subscription must reach the publisher first
        await self.peer.connect("127.0.0.1", self.node.esl_port)
        if audio:
            await asyncio.wait_for(self.peer.audio_connected.wait(), 10_000 * MS)
        return self

    async def until(self, type: str, timeout: float = 60_000 * MS, **match: Any) -> Event:
        for e in self.events:
            if e.type == type and all(e.get(k) == v for k, v in match.items()):
                return e
        deadline = time.monotonic() + timeout
        while True:
            e = await self.sub.next(timeout=max(0.01, deadline - time.monotonic()))
            self.events.append(e)
            if e.type == type and all(e.get(k) == v for k, v in match.items()):
                return e

    def of(self, type: str) -> list[Event]:
        return [e for e in self.events if e.type == type]

    def flush_commands(self) -> list[Any]:
        return [c for c in self.peer.commands if c.name == "api" and c.args.startswith("uuid_socket_audio_flush")]

    async def close(self) -> None:
        if not self.peer.hung_up:
            await self.peer.hangup()
        await self.until("call_end")
        await self.peer.aclose()
        self.sub.close()


def heard_reference(leg: Leg, tmp_path: Path) -> list[str]:
    """Vosk on exactly the audio the farm says it heard, rebuilt from what the peer sent."""
    parts = []
    pos = 0
    for _, n, is_speech in leg.peer.mic_sent:
        if is_speech:
            parts.append(leg.speech[pos : pos + n].ljust(n, b"\0"))
            pos += n
        else:
            parts.append(bytes(n))
    path = tmp_path / f"{leg.peer.uuid}.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"".join(parts))
    return decode_heard(path, CallRun(leg.peer.uuid, leg.events, None))


# ---- speech in, transcripts out ----------------------------------------------------------


def test_speech_in_gives_the_same_transcript_as_a_websocket_call(node: Node, tmp_path: Path) -> None:
    async def scenario() -> tuple[Leg, CallRun]:
        leg = await Leg(node, variables={"farm_campaign": "spring"}).start()
        leg.speech = pcm_of("ko_02.wav")
        await leg.peer.stream(leg.speech, odd_splits=True)  # some 641 + 639 byte writes
        await asyncio.sleep(0.8)
        await leg.close()
        ws = await run_call(node, DATA / "ko_02.wav")
        return leg, ws

    leg, ws = asyncio.run(scenario())
    finals = [e["text"] for e in leg.of("final") if e["text"]]
    assert finals and finals == heard_reference(leg, tmp_path)
    assert finals == ws.finals  # the same words whichever module carried the audio
    start = leg.of("call_start")[0]
    assert (start["protocol"], start["rate"], start["channels"]) == ("socket_audio", 16000, 1)
    assert start["metadata"]["farm_campaign"] == "spring"
    assert start["metadata"]["Channel-Read-Codec-Rate"] == "8000"
    assert leg.peer.violations == []


def test_farm_takes_the_channel_as_protocols_md_says(node: Node) -> None:
    async def scenario() -> Leg:
        leg = await Leg(node).start()
        await leg.close()
        return leg

    leg = asyncio.run(scenario())
    lines = [c.line for c in leg.peer.commands]
    assert lines[:4] == [
        "connect",
        "myevents json",
        "linger 5",
        "event json CUSTOM socket_audio::playback_start socket_audio::playback_stop",
    ]
    sendmsg = leg.peer.commands[4]
    assert sendmsg.name == "sendmsg" and sendmsg.header("call-command") == "execute"
    assert sendmsg.header("execute-app-name") == "socket_audio"
    host, port = (sendmsg.header("execute-app-arg") or "").split()
    assert host == "127.0.0.1" and 1024 <= int(port) <= 65535
    assert sendmsg.header("Event-UUID")
    # The listener served this one call and is gone.
    with pytest.raises(OSError):
        asyncio.run(asyncio.open_connection(host, int(port)))
    assert leg.of("call_end")


# ---- playback and barge-in ------------------------------------------------------------------


def test_playback_is_24k_even_chunks_a_little_ahead_of_real_time(node: Node) -> None:
    async def scenario() -> tuple[Leg, dict[str, Any]]:
        leg = await Leg(node).start()
        async with Commands(node.commands) as farm:
            reply = await farm.play(leg.peer.uuid, prompt(1.5), rate=22050, play_id="hello")
            stop = await leg.until("playback_stop")
            assert stop["reason"] == "complete"
            state = await farm.state(leg.peer.uuid)
        await asyncio.sleep(0.3)
        await leg.close()
        return leg, {**reply, "state": state}

    leg, reply = asyncio.run(scenario())
    assert reply["id"] == "hello" and reply["duration_ms"] == 1500
    assert not reply["state"]["playing"]
    got = sum(n for _, n in leg.peer.playback_recv)
    assert got == 1500 * 48  # 1.5 s at 24 kHz int16, converted from 22050 Hz
    assert leg.peer.violations == []
    # Paced: never more than the lead (200 ms) plus a little ahead of real time.
    t0, _ = leg.peer.playback_recv[0]
    total = 0
    for t, n in leg.peer.playback_recv:
        total += n
        assert total <= 48 * ((t - t0) / 1e6 + 200 + 150), "playback ran ahead of the lead"
    # One turn for FreeSWITCH: no start/stop flapping (§7).
    subclasses = [e.subclass for e in leg.peer.events if e.subclass and e.delivered]
    assert subclasses == ["socket_audio::playback_start", "socket_audio::playback_stop"]
    assert [e.type for e in leg.events if e.type.startswith("playback")] == ["playback_start", "playback_stop"]
    assert leg.flush_commands() == []


def test_caller_speech_over_a_prompt_flushes_it_and_publishes_barge_in(node: Node) -> None:
    async def scenario() -> Leg:
        leg = await Leg(node).start()
        async with Commands(node.commands) as farm:
            await farm.play(leg.peer.uuid, prompt(6.0), rate=22050, play_id="long")
            await asyncio.sleep(1.0)
            leg.speech = pcm_of("ko_01.wav")
            speaking = asyncio.create_task(leg.peer.stream(leg.speech))
            barge = await leg.until("barge_in")
            await speaking
            await leg.until("final")
            assert not (await farm.state(leg.peer.uuid))["playing"]
        await leg.close()
        leg.barge = barge
        return leg

    leg = asyncio.run(scenario())
    flushes = leg.flush_commands()
    assert len(flushes) == 1 and flushes[0].args == f"uuid_socket_audio_flush {leg.peer.uuid}"
    flushed_at = flushes[0].t_ns
    assert leg.peer.flushes and leg.peer.flushes[0][3]  # consumed while playing
    # The prompt stops: nothing of it is played after the flush was consumed, and farm
    # wrote nothing more.
    # (Margins: on a loaded 2-core box the peer's own tasks run late.)
    consumed = leg.peer.flushes[0][0]
    assert not [t for t, frame in leg.peer.played if t > consumed + 100_000_000 and any(frame)]
    assert not [t for t, _ in leg.peer.playback_recv if t > flushed_at + 100_000_000]
    b = leg.barge
    assert b is not None
    assert b["id"] == "long" and b["flush_sent"] and 900 <= b["played_ms"] <= 4000
    assert b["flushed_ms"] > 1500
    # Barge-in latency as the architecture defines it: first speech frame in -> flush out.
    assert b.stamps["recv"] <= b.stamps["flush"] <= flushed_at
    assert leg.peer.first_speech_ns is not None and leg.peer.first_speech_ns < flushed_at
    assert [e["reason"] for e in leg.of("playback_stop")] == ["barge_in"]
    assert leg.of("final")[0]["text"]


def test_no_flush_when_the_caller_speaks_while_nothing_plays(node: Node) -> None:
    async def scenario() -> Leg:
        leg = await Leg(node).start()
        async with Commands(node.commands) as farm:
            await farm.play(leg.peer.uuid, prompt(0.4), rate=22050)
            await leg.until("playback_stop")  # the prompt is over
            await asyncio.sleep(0.3)
            await leg.peer.stream(pcm_of("ko_03.wav"))
            await leg.until("final")
        await leg.close()
        return leg

    leg = asyncio.run(scenario())
    assert leg.of("speech_start") and leg.of("barge_in") == []
    assert leg.flush_commands() == []  # a pending flush would eat the next prompt's start (§2.5)


def test_app_flush_and_commands_errors(node: Node) -> None:
    async def scenario() -> tuple[Leg, list[dict[str, Any]], list[str]]:
        leg = await Leg(node).start()
        errors = []
        async with Commands(node.commands) as farm:
            await farm.play(leg.peer.uuid, prompt(3.0), rate=22050, play_id="one")
            await farm.play(leg.peer.uuid, prompt(1.0), rate=22050, play_id="two")
            await asyncio.sleep(0.5)
            state = await farm.state(leg.peer.uuid)
            cut = await farm.flush(leg.peer.uuid)
            again = await farm.flush(leg.peer.uuid)
            calls = await farm.calls()
            for bad in (
                farm.play("no-such-call", b"\0\0", rate=8000),
                farm.play(leg.peer.uuid, b"\0\0\0", rate=8000),
                farm.play(leg.peer.uuid, b"\0\0", rate=1),
                farm.play_wav(leg.peer.uuid, b"RIFF nonsense"),
                farm.request({"op": "dance", "call_id": leg.peer.uuid}),
            ):
                with pytest.raises(CommandError) as err:
                    await bad
                errors.append(str(err.value))
            assert (await farm.state(leg.peer.uuid))["playing"] is False  # still answering
        await leg.close()
        return leg, [state, cut, again, {"calls": calls}], errors

    leg, (state, cut, again, calls), errors = asyncio.run(scenario())
    assert state["playing"] and state["id"] == "one" and state["queued"] == ["one", "two"][: len(state["queued"])]
    assert cut["flushed"] and cut["id"] == "one" and cut["dropped"] == ["two"]
    assert again == {"ok": True, "flushed": False}
    assert {"call_id": leg.peer.uuid, "protocol": "socket_audio", "playing": False} in calls["calls"]
    assert len(leg.flush_commands()) == 1 and leg.of("barge_in") == []
    assert [e["reason"] for e in leg.of("playback_stop")] == ["flush"]
    assert "no live call" in errors[0]
    assert "whole number" in errors[1] and "out of range" in errors[2]
    assert "not a PCM WAV" in errors[3] and "unknown op" in errors[4]


def test_twenty_concurrent_bidirectional_calls(node: Node) -> None:
    files = [f"ko_{i:02d}.wav" for i in range(1, 11)]

    async def one(i: int) -> Leg:
        leg = await Leg(node).start()
        async with Commands(node.commands) as farm:
            await farm.play(leg.peer.uuid, prompt(4.0), rate=22050, play_id=f"p{i}")
            await asyncio.sleep(random.uniform(0.5, 1.5))
            leg.speech = pcm_of(files[i % len(files)])
            await leg.peer.stream(leg.speech, odd_splits=i % 2 == 1)
            await leg.until("barge_in", timeout=90_000 * MS)
            await leg.until("final", timeout=90_000 * MS)
        await leg.close()
        return leg

    async def scenario() -> list[Leg]:
        return await asyncio.gather(*(one(i) for i in range(20)))

    legs = asyncio.run(scenario())
    for i, leg in enumerate(legs):
        assert len(leg.flush_commands()) == 1, leg.peer.uuid
        assert leg.of("barge_in")[0]["id"] == f"p{i}"
        assert any(e["text"] for e in leg.of("final"))
        assert leg.of("call_end") and leg.peer.violations == []
    time.sleep(1)
    assert farm_segments(node.pids("ingress")[0]) == []


# ---- ends and bad input ----------------------------------------------------------------------


def test_hangup_stop_and_reset_each_end_the_call_cleanly(node: Node) -> None:
    async def scenario() -> list[Leg]:
        hung, stopped, reset = [await Leg(node).start() for _ in range(3)]
        async with Commands(node.commands) as farm:
            await farm.play(reset.peer.uuid, prompt(5.0), rate=22050)
        await asyncio.sleep(0.5)
        await hung.peer.hangup()
        await stopped.peer.stop_audio()  # uuid_socket_audio_stop: EOF on the audio socket
        reset.peer.abort()  # mid-playback: both sockets reset
        for leg in (hung, stopped, reset):
            await leg.until("call_end", timeout=20_000 * MS)
        await stopped.peer.hangup()
        for leg in (hung, stopped, reset):
            await leg.peer.aclose()
            leg.sub.close()
        return [hung, stopped, reset]

    legs = asyncio.run(scenario())
    assert all(leg.of("call_end") for leg in legs)
    reset = legs[2]
    assert [e["reason"] for e in reset.of("playback_stop")] in (["hangup"], ["call_end"])
    time.sleep(1)
    assert farm_segments(node.pids("ingress")[0]) == []
    log = node.log()
    assert "audio stream ended" in log and "hangup" in log


def test_bad_event_socket_input_ends_that_call_only(node: Node) -> None:
    async def scenario() -> tuple[Leg, list[Leg], Leg]:
        good = await Leg(node).start()
        good.speech = pcm_of("ko_02.wav")
        speaking = asyncio.create_task(good.peer.stream(good.speech))
        garbage = await Leg(node).start()
        await garbage.peer.send_raw(b"\x00\x01garbage without an end\xff" * 100 + b"\n\n" + b"A" * 70_000)
        huge = await Leg(node).start()
        await huge.peer.send_raw(b"Content-Type: api/response\nContent-Length: 999999999\n\n+OK")
        mute = await Leg(node, never_connect_audio=True).start(audio=False)
        for leg in (garbage, huge, mute):
            await leg.until("error", timeout=20_000 * MS)
        for leg in (garbage, huge):
            await leg.until("call_end", timeout=20_000 * MS)  # the ring was opened: ended properly
        await speaking
        await good.until("final")
        await good.close()
        for leg in (garbage, huge, mute):
            await asyncio.sleep(0.2)
            await leg.peer.aclose()
            leg.sub.close()
        return good, [garbage, huge], mute

    good, broken, mute = asyncio.run(scenario())
    assert good.of("final")[0]["text"] and good.of("call_end")
    for leg in broken:
        assert "Event Socket" in leg.of("error")[0]["reason"]
    assert "did not connect to the audio port" in mute.of("error")[0]["reason"]
    hangups = [c for c in mute.peer.commands if c.name == "sendmsg" and c.header("call-command") == "hangup"]
    assert hangups and mute.peer.hung_up
    time.sleep(1)
    assert farm_segments(node.pids("ingress")[0]) == []


def test_barge_in_waits_for_the_configured_amount_of_speech_and_fallback_gives_the_call_back(
    tmp_path: Path,
) -> None:
    n = start_node(
        tmp_path,
        "--barge-in-min-speech-ms",
        "400",
        "--socket-audio-fallback",
        "dialplan",
        "--socket-audio-timeout",
        "1",
        workers=1,
    )
    try:

        async def scenario() -> Leg:
            mute = await Leg(n, never_connect_audio=True).start(audio=False)
            await mute.until("error")
            await asyncio.wait_for(mute.peer.closed.wait(), 10_000 * MS)
            await mute.peer.aclose()
            mute.sub.close()
            lines = [c.line for c in mute.peer.commands]
            assert lines[-2:] == ["resume", "exit"]  # back to the dialplan, not hung up by farm
            assert not [c for c in mute.peer.commands if c.header("call-command") == "hangup"]
            leg = await Leg(n).start()
            async with Commands(n.commands) as farm:
                await farm.play(leg.peer.uuid, prompt(8.0), rate=22050)
                await asyncio.sleep(0.8)
                # A cough: 120 ms of loud noise, then silence.
                cough = (np.random.default_rng(1).normal(0, 6000, 1920)).astype("<i2").tobytes()
                await leg.peer.stream(cough + bytes(16000))
                await asyncio.sleep(0.8)
                assert leg.flush_commands() == []
                await leg.peer.stream(pcm_of("ko_04.wav"))
                await leg.until("barge_in")
            await leg.close()
            return leg

        leg = asyncio.run(scenario())
    finally:
        n.stop()
    assert len(leg.flush_commands()) == 1
    assert leg.of("barge_in")[0]["voiced_ms"] >= 400


def test_a_mod_audio_stream_call_plays_with_stream_audio_and_barges_in_with_uuid_break(tmp_path: Path) -> None:
    async def scenario() -> tuple[AudioStreamPeer, InboundEslServer, list[Event]]:
        switch = await InboundEslServer().start()
        n = start_node(tmp_path, "--esl", f"127.0.0.1:{switch.port}", workers=1)
        try:
            call_id = str(uuid.uuid4())
            events: list[Event] = []
            async with Subscription(n.events, call_id) as sub:
                peer = await AudioStreamPeer("127.0.0.1", n.port, f"/{call_id}?rate=16000").connect()
                await peer.send_text('{"rate": 16000}')
                async with Commands(n.commands) as farm:
                    # Silence until the prompt is out, then speech over it.
                    await peer.send_pcm(bytes(16000), [640] * 25, 0.02)
                    await farm.play(call_id, prompt(5.0, rate=16000), rate=16000, play_id="ivr")
                    await peer.send_pcm(bytes(16000), [640] * 25, 0.02)
                    speech = pcm_of("ko_02.wav")
                    await peer.send_pcm(speech, [640] * (len(speech) // 640), 0.02)
                while not events or events[-1].type != "barge_in":
                    events.append(await sub.next(timeout=30_000 * MS))
                await peer.close()
            await switch.close()
            return peer, switch, events
        finally:
            n.stop()

    peer, switch, events = asyncio.run(scenario())
    stream_audio = [t for t in peer.texts if '"streamAudio"' in t]
    assert len(stream_audio) == 1
    import base64
    import json

    message = json.loads(stream_audio[0])
    data = message["data"]
    assert data["audioDataType"] == "raw" and data["sampleRate"] == 24000 and data["farm_play_id"] == "ivr"
    assert len(base64.b64decode(data["audioData"])) == 5 * 48000
    auth = [c.line for c in switch.commands if c.name == "auth"]
    breaks = [c.line for c in switch.commands if c.name == "api"]
    assert auth == ["auth ClueCon"]
    assert len([b for b in breaks if b.startswith("api uuid_break")]) == 1
    barge = events[-1]
    assert barge["id"] == "ivr" and barge["flush_sent"]


def test_sigterm_hands_socket_audio_calls_back_to_the_dialplan_and_refuses_new_ones(tmp_path: Path) -> None:
    n = start_node(tmp_path, workers=1)
    try:

        async def scenario() -> tuple[Leg, int, bool]:
            leg = await Leg(n).start()
            await leg.until("call_start")
            n.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(leg.peer.closed.wait(), 20_000 * MS)
            await leg.until("call_end", timeout=20_000 * MS)
            # The Event Socket port is closed: FreeSWITCH moves on to its next target.
            try:
                await asyncio.open_connection("127.0.0.1", n.esl_port)
                refused = False
            except OSError:
                refused = True
            code = await asyncio.to_thread(n.proc.wait, 40)
            await leg.peer.aclose()
            leg.sub.close()
            return leg, code, refused

        leg, code, refused = asyncio.run(scenario())
    finally:
        n.stop()
    assert code == 0 and refused
    lines = [c.line for c in leg.peer.commands]
    assert lines[-2:] == ["resume", "exit"]
    ingress = int(re.search(r"started ingress \(pid (\d+)\)", n.log()).group(1))  # type: ignore[union-attr]
    assert not farm_segments(ingress)
