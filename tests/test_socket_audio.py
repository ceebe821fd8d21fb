"""mod_socket_audio calls end to end: outbound Event Socket, audio port, playback, barge-in.

FreeSWITCH here is a **peer** (bench/fs_peer.py), not FreeSWITCH: it follows PROTOCOLS.md
§2, §3 and §7 byte for byte, connects to a real farm node's Event Socket port as
``socket … async full`` would, streams the caller at 16 kHz in 640-byte writes paced at
20 ms, plays farm's 24 kHz playback at real time and honours flush with its 50 ms
discard window. The farm, its workers and the model are real.
"""

from __future__ import annotations

import asyncio
import functools
import random
import re
import signal
import time
import uuid
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.fs_peer import SocketAudioCall
from bench.fs_peer_inbound import InboundEslServer
from bench.fs_peer_playback import DISCARD_NS
from farm.client import CommandError, Commands, Subscription
from farm.config import Config
from farm.protocol.events import Event
from tests.conftest import (
    DATA,
    MS,
    CallRun,
    Node,
    decode_heard,
    farm_segments,
    metric_value,
    run_call,
    start_node,
)
from tests.peers import AudioStreamPeer


LEAD_MS = Config().playback_lead_ms  # farm writes playback at most this far ahead of real time
CHUNK_MS = 20  # ... plus the one 960-byte chunk that crosses it
BYTES_PER_MS = 48  # 24 kHz int16 mono
STREAM_AUDIO_PROMPT_S = 30  # sent whole as one streamAudio message


def commands(node: Node) -> Commands:
    """The node's command socket, with a generous deadline for its answers."""
    return Commands(node.commands, timeout=60_000 * MS)


def pcm_of(name: str) -> bytes:
    with wave.open(str(DATA / name)) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1
        return w.readframes(w.getnframes())


@functools.cache
def prompt(seconds: float, rate: int = 22050) -> bytes:
    """A tone at a rate FreeSWITCH does not play, so farm has to convert it."""
    t = np.arange(int(rate * seconds)) / rate
    return (6000 * np.sin(2 * np.pi * 330 * t)).astype("<i2").tobytes()


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30_000 * MS) -> None:
    """Wait for a state with a generous deadline (a busy machine is slow, not wrong)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.01)


def settled(condition: Callable[[], bool], what: str, timeout: float = 30_000 * MS) -> None:
    """``wait_until`` outside an event loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def no_rings_left(node: Node) -> None:
    """Every call's ring is unlinked once the calls ended (the ingress does it as they end)."""
    ingress = node.pids("ingress")[0]
    settled(lambda: farm_segments(ingress) == [], f"the rings of ingress {ingress} unlinked")


async def farm_state(farm: Commands, call_id: str, want: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    """Ask the farm for a call's playback state until it is the wanted one."""
    deadline = time.monotonic() + 30_000 * MS
    while True:
        state = await farm.state(call_id)
        if want(state):
            return state
        assert time.monotonic() < deadline, f"never happened: {what} (state {state})"
        await asyncio.sleep(0.02)


def remote_playing(state: dict[str, Any]) -> bool:
    """FreeSWITCH's playback_start has reached the farm: the module is playing the prompt."""
    return bool(state["remote_playing"])


def ahead_of_the_lead(peer: SocketAudioCall, t_play: int, cut: int | None = None) -> list[tuple[int, int]]:
    """Receipts that show farm writing more than the lead ahead of real time (must be none).

    The clip cannot start before ``t_play`` (taken just before ``play()``) and farm writes a
    chunk only while less than the lead is unplayed on its clock, so whatever had reached the
    peer by ``t`` is at most ``t - t_play`` + lead + one chunk long, on any machine (a late
    write or a late read only makes it shorter). After a cut farm writes nothing: the bound
    stays where it was at ``cut``.
    """
    out = []
    total = 0
    for t, n in peer.playback_recv:
        total += n
        until = t if cut is None else min(t, cut)
        if total > BYTES_PER_MS * ((until - t_play) / 1e6 + LEAD_MS + CHUNK_MS):
            out.append((t, total))
    return out


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = start_node(tmp_path_factory.mktemp("farm"))
    yield n
    n.stop()


_LEGS: list[Leg] = []


@pytest.fixture(autouse=True)
def _close_subscriptions() -> Iterator[None]:
    """Close every leg's subscription, also when a test fails: a zmq context left to the
    garbage collector with its socket can hang the whole run in ``Context.term()``."""
    yield
    while _LEGS:
        _LEGS.pop().close_subscription()


class Leg:
    """One peer call plus its event subscription."""

    def __init__(self, node: Node, **peer: Any) -> None:
        self.node = node
        self.peer = SocketAudioCall(**peer)
        self.sub = Subscription(node.events, self.peer.uuid)
        _LEGS.append(self)
        self.events: list[Event] = []
        self.speech = b""  # what the caller said, for the reference decode
        self.barge: Event | None = None

    async def start(self, audio: bool = True) -> Leg:
        assert await self.sub.ready(timeout=30_000 * MS), "the farm did not confirm the subscription"
        await self.peer.connect("127.0.0.1", self.node.esl_port, timeout=30_000 * MS)
        if audio:
            await asyncio.wait_for(self.peer.audio_connected.wait(), 30_000 * MS)
        return self

    def close_subscription(self) -> None:
        self.sub.close()

    async def until(self, type: str, timeout: float = 60_000 * MS, **match: Any) -> Event:
        for e in self.events:
            if e.type == type and all(e.get(k) == v for k, v in match.items()):
                return e
        deadline = time.monotonic() + timeout
        while True:
            try:
                e = await self.sub.next(timeout=max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                raise AssertionError(f"no {type} event in {timeout:.0f} s: {self.story()}") from None
            self.events.append(e)
            if e.type == type and all(e.get(k) == v for k, v in match.items()):
                return e

    async def spoken(self, speaking: asyncio.Task[list[tuple[int, int]]]) -> list[tuple[int, int]]:
        """The writes that carried the caller's speech, once it is all out."""
        try:
            return await asyncio.wait_for(speaking, 60_000 * MS)
        except (TimeoutError, ConnectionError) as exc:
            raise AssertionError(f"the speech did not go out ({exc!r}): {self.story()}") from None

    def story(self) -> str:
        """What happened to this call so far, for a failure message."""
        peer = self.peer
        return (
            f"call {peer.uuid}: events {[e.type for e in self.events]}, "
            f"module events {[(e.subclass or e.name) for e in peer.events if e.delivered]}, "
            f"flush commands {len(self.flush_commands())}, flushes consumed {peer.flushes}, "
            f"speech bytes sent {sum(n for _, n in peer.speech_sent)}, playback bytes {sum(n for _, n in peer.playback_recv)}"
            "; the node's log of it:\n" + "\n".join(line for line in self.node.log().splitlines() if peer.uuid in line)
        )

    def of(self, type: str) -> list[Event]:
        return [e for e in self.events if e.type == type]

    def flush_commands(self) -> list[Any]:
        return [c for c in self.peer.commands if c.name == "api" and c.args.startswith("uuid_socket_audio_flush")]

    async def close(self) -> None:
        if not self.peer.hung_up:
            await self.peer.hangup()
        await self.until("call_end")
        await self.peer.aclose()
        self.close_subscription()

    def silence_after_speech(self) -> int:
        """Bytes of (idle) silence the peer sent after the last speech write."""
        last = max(i for i, (_, _, is_speech) in enumerate(self.peer.mic_sent) if is_speech)
        return sum(n for _, n, _ in self.peer.mic_sent[last + 1 :])

    def played_after(self, t: int) -> list[int]:
        """Times of the frames the peer played after ``t``."""
        return [tp for tp, _ in self.peer.played if tp > t]


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
        # 0.8 s of the caller's silence after the speech (stream time, not this machine's)
        await wait_until(lambda: leg.silence_after_speech() >= 800 * 32, "0.8 s of silence sent")
        await leg.close()
        ws = await run_call(node, DATA / "ko_02.wav")
        return leg, ws

    leg, ws = asyncio.run(scenario())
    finals = [e["text"] for e in leg.of("final") if e["text"]]
    assert finals and finals == heard_reference(leg, tmp_path)
    # The same recognition whichever module carried the audio: each call's words are Vosk's
    # on what it heard. (Not one call's words against the other's: the silence the peer
    # streams before the speech, 641 and 639 byte writes at its pace, sets where the speech
    # falls in 20 ms frames, and Vosk's words can move with that alignment.)
    assert ws.finals and ws.finals == decode_heard(DATA / "ko_02.wav", ws)
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


def peer_turns(peer: SocketAudioCall) -> list[tuple[str, str | None]]:
    """The module's playback events, delivered to farm: (subclass, stop reason)."""
    return [
        (e.subclass, e.header("Playback-Stop-Reason"))
        for e in peer.events
        if e.subclass in ("socket_audio::playback_start", "socket_audio::playback_stop") and e.delivered
    ]


async def module_played_it_all(peer: SocketAudioCall, nbytes: int) -> None:
    """Wait until the module took ``nbytes`` of playback and said it stopped, complete."""
    await wait_until(
        lambda: (
            sum(n for _, n in peer.module_recv) == nbytes
            and peer_turns(peer)[-1:] == [("socket_audio::playback_stop", "complete")]
        ),
        "the module played it all",
    )


def test_playback_is_24k_even_chunks_a_little_ahead_of_real_time(node: Node) -> None:
    async def scenario() -> tuple[Leg, dict[str, Any], int]:
        leg = await Leg(node).start()
        async with commands(node) as farm:
            t_play = time.monotonic_ns()
            reply = await farm.play(leg.peer.uuid, prompt(1.5), rate=22050, play_id="hello")
            stop = await leg.until("playback_stop")
            assert stop["reason"] == "complete"
            # FreeSWITCH plays behind farm's clock: once it has played it all and said so,
            # farm says nothing plays.
            await module_played_it_all(leg.peer, 1500 * BYTES_PER_MS)
            state = await farm_state(farm, leg.peer.uuid, lambda s: not s["playing"], "not playing")
        await leg.close()
        return leg, {**reply, "state": state}, t_play

    leg, reply, t_play = asyncio.run(scenario())
    assert reply["id"] == "hello" and reply["duration_ms"] == 1500
    assert not reply["state"]["playing"] and not reply["state"]["remote_playing"]
    got = sum(n for _, n in leg.peer.playback_recv)
    assert got == 1500 * 48  # 1.5 s at 24 kHz int16, converted from 22050 Hz
    assert leg.peer.violations == []
    # Paced: never more than the lead plus one chunk ahead of the time play() was called.
    assert ahead_of_the_lead(leg.peer, t_play) == []
    # The module played every byte, padding (< a frame) only where a turn ended. Whether it
    # played in one turn (§7: no start/stop flapping) depends on farm's writes staying
    # ahead of it, i.e. on this machine's speed; its events do alternate, start first.
    turns = peer_turns(leg.peer)
    assert turns[0] == ("socket_audio::playback_start", None) and len(turns) % 2 == 0
    assert turns[1::2] == [("socket_audio::playback_stop", "complete")] * (len(turns) // 2)
    assert [s for s, _ in turns[::2]] == ["socket_audio::playback_start"] * (len(turns) // 2)
    played = len(leg.peer.played) * 960
    assert got <= played < got + 960 * len(turns) // 2
    # farm's own events: one clip, one start, one stop.
    assert [e.type for e in leg.events if e.type.startswith("playback")] == ["playback_start", "playback_stop"]
    assert leg.flush_commands() == []


def test_caller_speech_over_a_prompt_flushes_it_and_publishes_barge_in(node: Node) -> None:
    duration_ms = 60_000  # long enough to still play when the speech is heard, however late

    async def scenario() -> tuple[Leg, int]:
        leg = await Leg(node).start()
        async with commands(node) as farm:
            t_play = time.monotonic_ns()
            await farm.play(leg.peer.uuid, prompt(duration_ms / 1000), rate=22050, play_id="long")
            await farm_state(farm, leg.peer.uuid, remote_playing, "FreeSWITCH plays the prompt")
            await asyncio.sleep(1.0)  # the caller listens a while first (or longer, never shorter)
            leg.speech = pcm_of("ko_01.wav")
            speaking = asyncio.create_task(leg.peer.stream(leg.speech))
            barge = await leg.until("barge_in")
            await leg.spoken(speaking)
            await leg.until("final")
            await farm_state(farm, leg.peer.uuid, lambda s: not s["playing"], "nothing plays after the barge-in")
        await leg.close()
        leg.barge = barge
        return leg, t_play

    leg, t_play = asyncio.run(scenario())
    peer = leg.peer
    flushes = leg.flush_commands()
    assert len(flushes) == 1 and flushes[0].args == f"uuid_socket_audio_flush {peer.uuid}"
    flushed_at = flushes[0].t_ns  # when the flush reached FreeSWITCH
    [(consumed, _, _, was_playing)] = peer.flushes
    assert was_playing and flushed_at <= consumed  # consumed while the prompt played
    # The caller spoke first: farm cut the prompt and sent the flush after the first speech
    # byte left FreeSWITCH (t.recv is the utterance's first voiced frame, t.flush the write).
    b = leg.barge
    assert b is not None
    first_speech = peer.first_speech_ns
    assert first_speech is not None and first_speech < b.stamps["flush"]
    assert b.stamps["recv"] <= b.stamps["flush"] <= flushed_at
    # farm wrote nothing after the cut: all it wrote fits in the lead ahead of the flush.
    assert ahead_of_the_lead(peer, t_play, cut=flushed_at) == []
    # The prompt stops: no frame of it is played after the flush was consumed, unless its
    # bytes reached the module after the 50 ms discard window (the peer's read was late).
    late_takes = [t for t, _ in peer.module_recv if t >= consumed + DISCARD_NS]
    assert all(late_takes and late_takes[0] <= t for t in leg.played_after(consumed)), leg.played_after(consumed)
    # What farm says was played and dropped, from the recorded times and bytes: the clip
    # started between play() and its first byte's arrival, and was cut between the first
    # speech byte and the flush's arrival; what was dropped is what it had not written,
    # plus what it had written ahead (at most the lead and a chunk).
    assert b["id"] == "long" and b["flush_sent"] and b["dropped"] == []
    first_byte = peer.playback_recv[0][0]
    assert (first_speech - first_byte) // 1_000_000 <= b["played_ms"] <= (flushed_at - t_play) // 1_000_000
    written_ms = sum(n for _, n in peer.playback_recv) / BYTES_PER_MS
    assert duration_ms - written_ms <= b["flushed_ms"] <= duration_ms - written_ms + LEAD_MS + CHUNK_MS
    # Nothing of the clip is unaccounted for (rounding: a ms or two; more played_ms only if
    # farm's writer ever fell behind its own clock on a stalled machine).
    assert b["played_ms"] + b["flushed_ms"] >= duration_ms - 2
    assert [e["reason"] for e in leg.of("playback_stop")] == ["barge_in"]
    assert leg.of("final")[0]["text"]
    # /metrics counts it and times it (first voiced frame -> flush written)
    deadline = time.monotonic() + 20_000 * MS
    while (metric_value(node_metrics(node), "farm_barge_ins_total") or 0) < 1:
        assert time.monotonic() < deadline, "farm_barge_ins_total stayed 0"
        time.sleep(0.2)
    timed = metric_value(node_metrics(node), "farm_stage_latency_seconds_count", stage="barge_in")
    assert timed is not None and timed >= 1, timed


def node_metrics(node: Node) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{node.port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def test_no_flush_when_the_caller_speaks_while_nothing_plays(node: Node) -> None:
    async def scenario() -> Leg:
        leg = await Leg(node).start()
        async with commands(node) as farm:
            await farm.play(leg.peer.uuid, prompt(0.4), rate=22050)
            await leg.until("playback_stop")  # the prompt is over on farm's clock ...
            # ... FreeSWITCH has played it and said so, and farm knows nothing plays.
            await module_played_it_all(leg.peer, 400 * BYTES_PER_MS)
            await farm_state(farm, leg.peer.uuid, lambda s: not s["playing"], "the prompt over")
            await leg.peer.stream(pcm_of("ko_03.wav"))
            await leg.until("final")
        await leg.close()
        return leg

    leg = asyncio.run(scenario())
    assert leg.of("speech_start") and leg.of("barge_in") == []
    assert leg.flush_commands() == []  # a pending flush would eat the next prompt's start (§2.5)
    assert [e["reason"] for e in leg.of("playback_stop")] == ["complete"]


def test_app_flush_and_commands_errors(node: Node) -> None:
    async def scenario() -> tuple[Leg, list[dict[str, Any]], list[str]]:
        leg = await Leg(node).start()
        errors = []
        async with commands(node) as farm:
            await farm.play(leg.peer.uuid, prompt(20.0), rate=22050, play_id="one")
            await farm.play(leg.peer.uuid, prompt(1.0), rate=22050, play_id="two")
            # FreeSWITCH plays "one" (its playback_start has reached farm: it cannot come
            # after the cut and make farm think it plays again).
            state = await farm_state(farm, leg.peer.uuid, remote_playing, "FreeSWITCH plays the prompt")
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
    assert state["playing"] and state["id"] == "one" and state["queued"] == ["one", "two"]
    assert cut["flushed"] and cut["id"] == "one" and cut["dropped"] == ["two"]
    assert again == {"ok": True, "flushed": False}
    assert {"call_id": leg.peer.uuid, "protocol": "socket_audio", "playing": False} in calls["calls"]
    assert len(leg.flush_commands()) == 1 and leg.of("barge_in") == []
    assert [e["reason"] for e in leg.of("playback_stop")] == ["flush"]
    assert "no live call" in errors[0]
    assert "whole number" in errors[1] and "out of range" in errors[2]
    assert "not a PCM WAV" in errors[3] and "unknown op" in errors[4]


@pytest.mark.timeout(900)  # a busy machine: 20 calls' speech on 2 shared cores, cold recognizers
def test_twenty_concurrent_bidirectional_calls(node: Node) -> None:
    files = [f"ko_{i:02d}.wav" for i in range(1, 11)]
    # Still playing when a worker hears the speech, however far behind a busy machine puts
    # it (the barge-in needs the prompt playing then); 8 kHz keeps 20 of them small.
    long_prompt = prompt(120.0, rate=8000)

    async def one(i: int) -> tuple[Leg, int]:
        leg = await Leg(node).start()
        async with commands(node) as farm:
            await farm.play(leg.peer.uuid, long_prompt, rate=8000, play_id=f"p{i}")
            await farm_state(farm, leg.peer.uuid, remote_playing, "FreeSWITCH plays the prompt")
            await asyncio.sleep(random.uniform(0.5, 1.5))
            leg.speech = pcm_of(files[i % len(files)])
            speaking = asyncio.create_task(leg.peer.stream(leg.speech, odd_splits=i % 2 == 1, timeout=60_000 * MS))
            await leg.until("barge_in", timeout=120_000 * MS)
            sent = await leg.spoken(speaking)
            # Under stress-ng and other test runs, 20 utterances at once took over 120 s to
            # recognize: wait for the state, not for this machine's speed.
            await leg.until("final", timeout=600_000 * MS)
        await leg.close()
        return leg, sent[0][0]

    async def scenario() -> list[tuple[Leg, int]]:
        return await asyncio.gather(*(one(i) for i in range(20)))

    legs = asyncio.run(scenario())
    for i, (leg, first_speech) in enumerate(legs):
        flushes = leg.flush_commands()
        assert len(flushes) == 1 and flushes[0].t_ns > first_speech, leg.peer.uuid
        assert [(b["id"], b["flush_sent"]) for b in leg.of("barge_in")] == [(f"p{i}", True)]
        assert any(e["text"] for e in leg.of("final"))
        assert leg.of("call_end") and leg.peer.violations == []
    no_rings_left(node)


# ---- ends and bad input ----------------------------------------------------------------------


def test_hangup_stop_and_reset_each_end_the_call_cleanly(node: Node) -> None:
    async def scenario() -> list[Leg]:
        # A linger of 60 s: a farm that waited for it, not closing at the hang-up, would show.
        hung, stopped = [await Leg(node, linger_scale=12).start() for _ in range(2)]
        reset = await Leg(node).start()
        async with commands(node) as farm:
            await farm.play(reset.peer.uuid, prompt(20.0), rate=22050)
            # mid-playback: FreeSWITCH plays it (20 s: it still does when the sockets go)
            await farm_state(farm, reset.peer.uuid, remote_playing, "FreeSWITCH plays the prompt")
        await hung.peer.hangup()
        await stopped.peer.stop_audio()  # uuid_socket_audio_stop: EOF on the audio socket
        reset.peer.abort()  # mid-playback: both sockets reset
        for leg in (hung, stopped, reset):
            await leg.until("call_end", timeout=60_000 * MS)
        await stopped.peer.hangup()
        for leg in (hung, stopped, reset):
            await leg.peer.aclose()
            leg.close_subscription()
        return [hung, stopped, reset]

    legs = asyncio.run(scenario())
    assert all(leg.of("call_end") for leg in legs)
    # Whichever ended first, the hang-up (hung) or the audio (stopped, hung up after its
    # call_end), farm closed the Event Socket at the hang-up, so FreeSWITCH could destroy
    # the channel at once (it counts against max-sessions until then).
    assert [leg.peer.linger_ran_out for leg in legs[:2]] == [False, False]
    reset = legs[2]
    assert [e["reason"] for e in reset.of("playback_stop")] in (["hangup"], ["call_end"])
    no_rings_left(node)
    # call_end says how each ended. A hang-up closes the audio socket too, and farm may see
    # that before CHANNEL_HANGUP: it is a hang-up all the same, not a stop.
    ends = [(leg.of("call_end")[0]["reason"], leg.of("call_end")[0]["detail"]) for leg in legs]
    assert ends[0] == ("hangup", "NORMAL_CLEARING")
    assert ends[1] == ("stop", "audio stream ended")
    assert ends[2][0] == "hangup"
    for leg, (reason, _) in zip(legs, ends):
        line = re.compile(rf"call {leg.peer.uuid}: ended \({reason}\): ")
        settled(lambda line=line: line.search(node.log()) is not None, f"{leg.peer.uuid}'s end logged")


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
            await leg.until("error", timeout=60_000 * MS)
        for leg in (garbage, huge):
            await leg.until("call_end", timeout=60_000 * MS)  # the ring was opened: ended properly
        await speaking
        await good.until("final")
        await good.close()
        # farm hangs the mute call up after its error (the default fallback)
        await wait_until(lambda: mute.peer.hung_up, "the mute call hung up by farm")
        await mute.until("call_end")
        for leg in (garbage, huge, mute):
            await leg.peer.aclose()
            leg.close_subscription()
        return good, [garbage, huge], mute

    good, broken, mute = asyncio.run(scenario())
    assert good.of("final")[0]["text"] and good.of("call_end")[0]["reason"] == "hangup"
    for leg in broken:
        assert "Event Socket" in leg.of("error")[0]["reason"]
        end = leg.of("call_end")[0]
        assert (end["reason"], end["detail"]) == ("error", leg.of("error")[0]["reason"])
    assert "did not connect to the audio port" in mute.of("error")[0]["reason"]
    # Its audio never came, so no worker had it: the ingress ends it, the same way.
    [end] = mute.of("call_end")
    assert (end["reason"], end["detail"], end.seq) == ("error", mute.of("error")[0]["reason"], 0)
    hangups = [c for c in mute.peer.commands if c.name == "sendmsg" and c.header("call-command") == "hangup"]
    assert hangups and mute.peer.hung_up
    no_rings_left(node)


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

        async def scenario() -> tuple[Leg, int, int]:
            mute = await Leg(n, never_connect_audio=True).start(audio=False)
            await mute.until("error")
            await asyncio.wait_for(mute.peer.closed.wait(), 30_000 * MS)
            await mute.peer.aclose()
            mute.close_subscription()
            lines = [c.line for c in mute.peer.commands]
            assert lines[-2:] == ["resume", "exit"]  # back to the dialplan, not hung up by farm
            assert not [c for c in mute.peer.commands if c.header("call-command") == "hangup"]
            leg = await Leg(n).start()
            async with commands(n) as farm:
                await farm.play(leg.peer.uuid, prompt(60.0), rate=22050)
                await farm_state(farm, leg.peer.uuid, remote_playing, "FreeSWITCH plays the prompt")
                # A cough over the prompt: 120 ms of loud noise, then 1.3 s of silence.
                cough = (np.random.default_rng(1).normal(0, 6000, 1920)).astype("<i2").tobytes()
                await leg.peer.stream(cough + bytes(1300 * 32))
                speech_at = sum(n for _, n, _ in leg.peer.mic_sent)  # bytes of the call before the speech
                speaking = asyncio.create_task(leg.peer.stream(pcm_of("ko_04.wav")))
                await leg.until("barge_in")
                sent = await leg.spoken(speaking)
            await leg.close()
            return leg, speech_at // 32, sent[0][0]

        leg, speech_ms, first_speech = asyncio.run(scenario())
    finally:
        n.stop()
    # One cut, for the speech: the cough alone (120 ms voiced) did not make one.
    [flush] = leg.flush_commands()
    [barge] = leg.of("barge_in")
    assert flush.t_ns > first_speech and barge.offset_ms >= speech_ms
    assert barge["voiced_ms"] >= 400


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
                async with commands(n) as farm:
                    # Silence until the prompt is out, then speech over it (a prompt long
                    # enough to still play when the speech is heard, however late).
                    await peer.send_pcm(bytes(16000), [640] * 25, 0.02)
                    await farm.play(call_id, prompt(STREAM_AUDIO_PROMPT_S, rate=16000), rate=16000, play_id="ivr")
                    await peer.send_pcm(bytes(16000), [640] * 25, 0.02)
                    speech = pcm_of("ko_02.wav")
                    await peer.send_pcm(speech, [640] * (len(speech) // 640), 0.02)
                while not events or events[-1].type != "barge_in":
                    events.append(await sub.next(timeout=60_000 * MS))
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
    assert len(base64.b64decode(data["audioData"])) == STREAM_AUDIO_PROMPT_S * 48000
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
            await asyncio.wait_for(leg.peer.closed.wait(), 60_000 * MS)
            await leg.until("call_end", timeout=60_000 * MS)
            # The Event Socket port is closed: FreeSWITCH moves on to its next target.
            try:
                await asyncio.open_connection("127.0.0.1", n.esl_port)
                refused = False
            except OSError:
                refused = True
            code = await asyncio.to_thread(n.proc.wait, 60_000 * MS)
            await leg.peer.aclose()
            leg.close_subscription()
            return leg, code, refused

        leg, code, refused = asyncio.run(scenario())
    finally:
        n.stop()
    assert code == 0 and refused
    lines = [c.line for c in leg.peer.commands]
    assert lines[-2:] == ["resume", "exit"]
    ingress = int(re.search(r"started ingress \(pid (\d+)\)", n.log()).group(1))  # type: ignore[union-attr]
    settled(lambda: not farm_segments(ingress), "the rings unlinked")
