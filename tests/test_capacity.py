"""What the capacity work guarantees, as behaviour on real nodes (speed is the bench's):

* a sentence with 150-300 ms pauses inside is one utterance and one final, prepared at the
  pause (pieces) and still exactly what Vosk gives for the audio it heard;
* an explicit end of utterance (the ``finalize`` command) ends the utterance at once;
* a node whose recognition falls behind refuses new calls with the reason, says so on
  /readyz, in its metrics and its log, finishes the calls it has, and takes calls again;
* a node whose CPUs are full at what a call costs refuses the next call before the upgrade,
  says so on /readyz and in its metrics, and takes calls again when one ends;
* calls that all landed on one worker spread to another when it comes back.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import websockets

from farm.client import Commands, Subscription
from farm.config import default_workers
from farm.sender import metadata_for, send_pcm

from .conftest import (
    DATA,
    MS,
    CallRun,
    Node,
    decode_heard,
    decode_heard_each,
    http_get,
    metric_value,
    run_call,
    start_node,
)


PAUSES = json.loads((DATA / "pauses.json").read_text())


def padded(name: str, tmp_path: Path, lead_ms: int = 600, tail_ms: int = 900) -> Path:
    """A pause fixture between stretches of line noise (the fixtures carry only 100 ms)."""
    with wave.open(str(DATA / name), "rb") as w:
        rate = w.getframerate()
        audio = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    x = np.concatenate([np.zeros(rate * lead_ms // 1000), audio, np.zeros(rate * tail_ms // 1000)]).astype(np.int32)
    x += np.random.default_rng(3).integers(-65, 66, len(x))
    out = tmp_path / name
    with wave.open(str(out), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.clip(x, -32768, 32767).astype("<i2").tobytes())
    return out


def wait_until(condition: object, timeout: float = 60_000 * MS, what: str = "state") -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} never came"
        time.sleep(0.05)


# -- pauses inside sentences, finalize ---------------------------------------------------------


@pytest.mark.parametrize("name", ["pause_04.wav", "pause_08_8k.wav", "pause_10.wav"])
def test_a_sentence_with_pauses_inside_is_one_final_exactly_as_vosk_hears_its_pieces(
    node: Node, tmp_path: Path, name: str
) -> None:
    wav = padded(name, tmp_path)
    run = asyncio.run(run_call(node, wav))
    finals = [e for e in run.of("final") if e["text"]]
    assert len(run.of("speech_start")) == len(run.of("speech_end")) == 1, run.events
    assert len(finals) == 1 and finals[0]["reason"] == "vad"
    assert run.finals == decode_heard(wav, run)
    # The final was prepared at a pause: what the recognizer heard stops 160 ms into the
    # quiet after the last word, not at the end of the 320 ms hangover.
    end = run.of("speech_end")[0].offset_ms
    assert finals[0]["audio_ms"][1] - end <= 160 + 20
    if any(ms >= 200 for ms in PAUSES[name]["pauses_ms"]):
        assert len(finals[0]["pieces_ms"]) >= 2  # cut at the long pause, resumed, joined


def test_the_finalize_command_ends_the_utterance_in_progress_at_once(node: Node, tmp_path: Path) -> None:
    wav = DATA / "ko_dialog_16k.wav"
    with wave.open(str(wav), "rb") as w:
        pcm, rate = w.readframes(w.getnframes()), w.getframerate()
    call_id = "finalize-me"

    async def scenario() -> list:
        events = []
        live: dict = {}
        async with Subscription(node.events, call_id) as sub, Commands(node.commands) as farm:
            sending = asyncio.create_task(
                send_pcm(f"{node.url}/{call_id}", pcm, rate=rate, metadata=metadata_for(call_id, rate, 1))
            )
            while (e := await sub.next(timeout=30_000 * MS)).type != "speech_start":
                events.append(e)
            events.append(e)
            await asyncio.sleep(0.6)  # mid-sentence
            reply = await farm.finalize(call_id)
            while not events or events[-1].type != "call_end":
                events.append(await sub.next(timeout=60_000 * MS))
                if events[-1].type == "speech_end" and not live:
                    live = await farm.stats(call_id)  # the live call's figures so far
            await sending
            return [reply, live, *events]

    reply, live, *events = asyncio.run(scenario())
    # The stats command counted what the events had said by then: the first utterance.
    first_start = next(e for e in events if e.type == "speech_start")
    assert live["ok"] and live["at_ms"] >= first_start.offset_ms
    assert live["stats"]["first_speech_ms"] == first_start.offset_ms and live["stats"]["utterances"] >= 1
    assert 0 < live["stats"]["talk_ms"] <= events[-1]["stats"]["talk_ms"]
    run = CallRun(call_id, events, None)
    resets = [e for e in run.of("final") if e["reason"] == "reset"]
    assert reply["ok"] and len(resets) == 1
    first_end = run.of("speech_end")[0]
    # the utterance ended where the audio received when asked ended, well before the
    # sentence's own end (the dialog's first sentence is ~2 s)
    assert first_end.offset_ms <= reply["at_ms"] + 20 < 2500
    assert resets[0]["audio_ms"][1] <= reply["at_ms"] + 20
    # the rest of the sentence and the other two are utterances of their own, all closed
    assert len(run.of("speech_start")) == len(run.of("speech_end")) >= 3
    assert run.finals == decode_heard(wav, run)


# -- admission ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One worker, one recognition thread, refusing calls at 400 ms behind."""
    n = start_node(tmp_path_factory.mktemp("small"), "--asr-threads", "1", "--admission-lag-ms", "400", workers=1)
    yield n
    assert n.stop() == 0


def test_a_node_behind_refuses_new_calls_with_the_reason_and_finishes_the_ones_it_has(
    small_node: Node,
) -> None:
    wav = DATA / "ko_dialog_16k.wav"
    with wave.open(str(wav), "rb") as w:
        pcm = w.readframes(w.getnframes())
    # Three calls sending 21 s of speech each as fast as the socket takes it: recognition is
    # then seconds behind on any machine (Vosk decodes speech at a few times real time).
    burst = pcm * 2

    async def scenario() -> tuple[list[CallRun], int, str]:
        calls = [
            asyncio.create_task(run_call(small_node, wav, realtime=False, timeout=300_000 * MS, pcm=burst))
            for _ in range(3)
        ]
        await asyncio.to_thread(
            wait_until, lambda: http_get(small_node, "/readyz")[0] == 503, what="/readyz saying at capacity"
        )
        readyz = http_get(small_node, "/readyz")[1]
        body = ""
        try:
            async with websockets.connect(f"{small_node.url}/refused", open_timeout=30):
                status = 101
        except websockets.InvalidStatus as exc:
            status, body = exc.response.status_code, exc.response.body.decode()
        runs = await asyncio.gather(*calls)
        return runs, status, readyz + "|" + body

    runs, status, text = asyncio.run(scenario())
    readyz, body = text.split("|")
    assert status == 503 and "farm cannot take the call: at capacity (recognition" in body
    assert readyz.startswith("at capacity: recognition") and "ms behind" in readyz
    for run in runs:  # the calls it had were finished, every utterance finalised
        assert run.of("call_end") and len(run.of("speech_start")) == len(run.of("speech_end"))
        assert len([e for e in run.of("final") if e["reason"] != "endpoint"]) == len(run.of("speech_end"))
    metrics = http_get(small_node, "/metrics")[1]
    assert (metric_value(metrics, "farm_connections_refused_total", reason="at capacity") or 0) >= 1, metrics
    log = small_node.log()
    assert "at capacity: recognition is" in log and "refusing new calls" in log
    # caught up: ready again, and a new call is taken
    wait_until(lambda: http_get(small_node, "/readyz")[0] == 200, what="/readyz ready again")
    assert "below capacity again" in small_node.log()
    run = asyncio.run(run_call(small_node, DATA / "ko_02.wav", realtime=False))
    assert run.of("call_start") and run.finals


def test_a_node_whose_cpus_are_full_refuses_the_next_call_and_takes_one_when_a_call_ends(
    tmp_path: Path,
) -> None:
    # A fixed cost per call (not this machine's measure) makes the capacity exactly 2 calls:
    # half of the CPUs over a quarter of a CPU per call.
    cost_ms = default_workers() * 250
    n = start_node(tmp_path, "--admission-cpu", "0.5", "--admission-call-cpu-ms", str(cost_ms), workers=1)
    silence = bytes(640)  # 20 ms at 16 kHz

    async def connect(call_id: str) -> tuple[int, str, websockets.ClientConnection | None]:
        try:
            ws = await websockets.connect(f"{n.url}/{call_id}", open_timeout=30)
        except websockets.InvalidStatus as exc:
            return exc.response.status_code, exc.response.body.decode(), None
        await ws.send(metadata_for(call_id, 16000, 1))
        await ws.send(silence)
        return 101, "", ws

    def active() -> int:
        found = metric_value(http_get(n, "/metrics")[1], "farm_calls_active")
        return -1 if found is None else int(found)

    async def scenario() -> tuple[tuple[int, str], str, str, int]:
        held = []
        for call_id in ("cap-a", "cap-b"):
            status, _, ws = await connect(call_id)
            assert status == 101 and ws is not None
            held.append(ws)
        await asyncio.to_thread(wait_until, lambda: active() == 2, what="two active calls")
        status, body, _ = await connect("cap-c")
        readyz = http_get(n, "/readyz")
        metrics = http_get(n, "/metrics")[1]
        await held[0].close()  # a call ends: its slot is free again
        await asyncio.to_thread(wait_until, lambda: active() == 1, what="one active call")
        again, _, ws = await connect("cap-d")
        for w in (held[1], ws):
            if w is not None:
                await w.close()
        return (status, body), f"{readyz[0]} {readyz[1]}", metrics, again

    try:
        (status, body), readyz, metrics, again = asyncio.run(scenario())
        why = f"at capacity (2 calls of 2, {cost_ms} ms CPU per call-second)"
        assert status == 503 and body == f"farm cannot take the call: {why}\n"
        assert readyz == f"503 at capacity: 2 calls of 2, {cost_ms} ms CPU per call-second\n"
        assert metric_value(metrics, "farm_capacity_calls") == 2
        assert metric_value(metrics, "farm_call_cpu_ms") == cost_ms
        assert metric_value(metrics, "farm_connections_refused_total", reason="at capacity") == 1, metrics
        assert again == 101
    finally:
        assert n.stop() == 0


# -- balance ------------------------------------------------------------------------------------


@pytest.mark.timeout(900)  # a busy machine: 4 x 20 s of calls, a respawn, then their reference decode
def test_calls_moved_off_a_killed_worker_spread_back_when_it_returns(tmp_path: Path) -> None:
    """Four calls on two workers; one hangs and is killed: all four land on the survivor; the
    replacement registers and the broker moves calls back at their pauses, losing no words."""
    # No warm-up: the replacement registers within a second or two even on a loaded machine
    # (a warm-up there took 30 s, and the calls' audio was over before it could take any).
    n = start_node(tmp_path, "--recognizer-warm", "0", "--recognizer-warm-later", "0", workers=2)
    try:
        wav = DATA / "ko_dialog_16k.wav"
        with wave.open(str(wav), "rb") as w:
            pcm = w.readframes(w.getnframes())
        long_pcm = pcm * 2  # 20 s: time for the hang, the kill, the respawn and the moves

        async def scenario() -> list[CallRun]:
            async with Subscription(n.events) as watch:
                calls = [
                    asyncio.create_task(run_call(n, wav, call_id=f"spread-{i}", pcm=long_pcm, timeout=300_000 * MS))
                    for i in range(4)
                ]
                starts = set()
                while len(starts) < 4:
                    e = await watch.next(timeout=60_000 * MS)
                    if e.type == "speech_start":
                        starts.add(e.call_id)
                # Hung first, so the broker moves its calls to the survivor; killed only then,
                # so its replacement registers after the move (a replacement that registers
                # sooner takes the calls itself: tests/test_broker.py).
                victim = n.pids("worker")[0]
                os.kill(victim, signal.SIGSTOP)
                try:
                    await asyncio.to_thread(
                        wait_until, lambda: "missed its heartbeats" in n.log(), what="the hung worker's calls moved"
                    )
                finally:
                    os.kill(victim, signal.SIGKILL)
                return await asyncio.gather(*calls)

        runs = asyncio.run(scenario())
        log = n.log()
        assert "released to another worker" in log, log[-3000:]
        assert re.search(r"moving it off worker \d \(\d calls\) to balance", log)
        for run in runs:
            assert len(run.of("call_end")) == 1
            assert len(run.of("speech_start")) == len(run.of("speech_end")) >= 6
        long_wav = repeated(wav, 2, tmp_path)
        for run, reference in zip(runs, decode_heard_each([(long_wav, run) for run in runs])):
            assert run.finals == reference
    finally:
        assert n.stop() == 0


def repeated(wav: Path, times: int, where: Path) -> Path:
    """``wav`` played ``times`` times over (what a call streamed), written into ``where``."""
    out_path = where / f"{wav.stem}-x{times}.wav"
    with wave.open(str(wav), "rb") as w:
        params, pcm = w.getparams(), w.readframes(w.getnframes())
    with wave.open(str(out_path), "wb") as out:
        out.setparams(params)
        out.writeframes(pcm * times)
    return out_path
