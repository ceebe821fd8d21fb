"""``farm transcribe``: recorded files through a running farm, after live calls.

The ordering rule is tested where it lives, on the recognition threads' queue
(workers/scheduler.py: a file's work, finals included, runs only when no live call has
work queued). The command is run as a subprocess against a real node with the real
model: words come back, files run in parallel, bad input is refused, AMD answers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest

from farm.protocol.audio_stream import is_background
from farm.transcribe import parse_audio
from workers.scheduler import AsrScheduler

from .conftest import DATA, MS, Node, start_node
from .test_scheduler import wait_for


class Stream:
    """A stand-in for an AsrStream: ``slices`` turns, queued again after each one as
    AsrStream does (workers/asr.py), live or background."""

    def __init__(
        self, name: str, log: list[str], scheduler: AsrScheduler, slices: int = 1, background: bool = False
    ) -> None:
        self.name, self.log, self.scheduler, self.left, self.background = name, log, scheduler, slices, background
        self.gate: threading.Event | None = None

    def run_slice(self) -> None:
        if self.gate is not None:
            self.gate.wait()
        self.log.append(self.name)
        self.left -= 1
        if self.left:
            self.scheduler.submit(self, False, self.background)


def test_a_files_work_waits_for_every_live_calls_work_its_final_too() -> None:
    log: list[str] = []
    gate = threading.Event()
    scheduler = AsrScheduler(1)
    try:
        # The one thread is busy with a slice of the file's backlog (a file may be running).
        file = Stream("file", log, scheduler, slices=3, background=True)
        file.gate = gate
        scheduler.submit(file, urgent=False, background=True)
        wait_for(lambda: scheduler.waiting == 0)
        file_final = Stream("file-final", log, scheduler, background=True)
        scheduler.submit(file_final, urgent=True, background=True)
        # Live calls come meanwhile: audio of two calls (one with a backlog), and a final awaited.
        scheduler.submit(Stream("live-a", log, scheduler, slices=2), urgent=False)
        scheduler.submit(Stream("live-b", log, scheduler), urgent=False)
        scheduler.submit(Stream("live-final", log, scheduler), urgent=True)
        gate.set()
        wait_for(lambda: len(log) == 8)
    finally:
        scheduler.shutdown()
    # The file's slice in progress ends; then every live slice, live-a's second one included
    # (queued after the file's), before any of the file's; among the file's, its final first.
    assert log == ["file", "live-final", "live-a", "live-b", "live-a", "file-final", "file", "file"]
    assert scheduler.turns == [1, 3, 1, 3]


def test_a_files_final_promoted_stays_behind_live_audio() -> None:
    log: list[str] = []
    gate = threading.Event()
    scheduler = AsrScheduler(1)
    try:
        blocker = Stream("blocker", log, scheduler)
        blocker.gate = gate
        scheduler.submit(blocker, urgent=False)
        wait_for(lambda: scheduler.waiting == 0)
        file = Stream("file", log, scheduler, background=True)
        scheduler.submit(file, urgent=False, background=True)
        scheduler.submit(Stream("file-2", log, scheduler, background=True), urgent=False, background=True)
        scheduler.submit(Stream("live", log, scheduler), urgent=False)
        scheduler.promote(file)  # its utterance ended: ahead of the other file, not of live audio
        gate.set()
        wait_for(lambda: len(log) == 4)
    finally:
        scheduler.shutdown()
    assert log == ["blocker", "live", "file", "file-2"]


def test_a_call_is_a_file_when_its_metadata_or_channel_variable_says_so() -> None:
    assert is_background({"source": "file"}) and is_background({"farm_source": " FILE "})
    assert not is_background({"source": "live"}) and not is_background({}) and not is_background(None)


def test_audio_is_a_16_bit_wav_or_raw_pcm_with_its_rate(tmp_path: Path) -> None:
    pcm, rate, channels = parse_audio((DATA / "ko_02_8k.wav").read_bytes())
    assert (rate, channels) == (8000, 1) and len(pcm) > 8000
    assert parse_audio(b"\x01\x00" * 800 + b"\x07", rate=16000) == (b"\x01\x00" * 800, 16000, 1)
    eight_bit = tmp_path / "u8.wav"
    with wave.open(str(eight_bit), "wb") as w:
        w.setnchannels(1), w.setsampwidth(1), w.setframerate(8000), w.writeframes(b"\x80" * 800)
    for data, why in (
        (b"hello, not audio", "not a WAV file"),
        (eight_bit.read_bytes(), "8-bit samples"),
        (b"RIFF\x00\x00\x00\x00WAVEjunk", "not a WAV file farm reads"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_audio(data)
    with pytest.raises(ValueError, match="4000 Hz"):
        parse_audio(b"\x00" * 100, rate=4000)


# -- the command against a real node ------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    from .conftest import free_port

    n = start_node(tmp_path_factory.mktemp("farm-transcribe"), "--http-port", str(free_port()), workers=1)
    yield n
    assert n.stop() == 0


def transcribe(node: Node | None, *args: str, events: str = "") -> subprocess.CompletedProcess[str]:
    target = ["--target", node.url, "--events", node.events] if node is not None else []
    return subprocess.run(
        [sys.executable, "-m", "farm.cli", "transcribe", *target, *(["--events", events] if events else []), *args],
        capture_output=True,
        text=True,
        timeout=120_000 * MS,
    )


def lines(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_a_file_gives_its_final_with_words_and_its_call_end(node: Node) -> None:
    run = transcribe(node, str(DATA / "ko_02.wav"), "--json")
    assert run.returncode == 0, run.stderr
    events = lines(run.stdout)
    finals = [e for e in events if e["type"] == "final"]
    assert finals and any(f["words"] for f in finals), events
    assert {e["type"] for e in events} <= {"final", "intent", "call_end"}, events  # no partials, no overrun
    end = events[-1]
    assert end["type"] == "call_end" and end["reason"] == "hangup" and end["overrun_bytes"] == 0
    assert all(e["call_id"] == end["call_id"] for e in events)
    [start] = [line for line in run.stderr.splitlines() if "as call" in line]
    assert str(end["call_id"]) in start


def test_two_files_in_parallel_each_get_their_finals(node: Node) -> None:
    run = transcribe(node, str(DATA / "ko_01_8k.wav"), str(DATA / "ko_02.wav"), "--json", "--parallel", "2")
    assert run.returncode == 0, run.stderr
    events = lines(run.stdout)
    ends = [e for e in events if e["type"] == "call_end"]
    assert len(ends) == 2 and all(e["overrun_bytes"] == 0 for e in ends)
    for end in ends:
        assert any(e["type"] == "final" and e["words"] and e["call_id"] == end["call_id"] for e in events)


def test_a_file_that_is_not_audio_is_refused_and_the_others_still_run(node: Node, tmp_path: Path) -> None:
    junk = tmp_path / "notes.wav"
    junk.write_text("not audio at all\n")
    good = str(DATA / "ko_02_8k.wav")
    run = transcribe(node, str(junk), good)
    assert run.returncode == 1
    assert f"farm transcribe: {junk}: not a WAV file" in run.stderr
    # The good one went through; plain text (the default) says which file each line is about.
    out = run.stdout.splitlines()
    assert any(line.startswith(good + ": ") and " final " in line for line in out), out
    assert out[-1].startswith(good + ": ") and "call_end" in out[-1]


def test_no_farm_is_a_clear_error(tmp_path: Path) -> None:
    from .conftest import free_port

    run = transcribe(
        None,
        str(DATA / "ko_02_8k.wav"),
        "--target",
        f"ws://127.0.0.1:{free_port()}",
        events=f"tcp://127.0.0.1:{free_port()}",
    )
    assert run.returncode == 1
    assert "is the farm up?" in run.stderr


@pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("sox")), reason="espeak-ng and sox make it")
def test_amd_on_a_recorded_voicemail_answer_gives_machine_and_its_beep(
    node: Node, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from bench.amd_corpus import generate

    out = tmp_path_factory.mktemp("voicemail")
    [case] = generate(out, count=1, seed=1, kinds=["machine_beep"])
    run = transcribe(node, str(out / case.file), "--amd", "--json")
    assert run.returncode == 0, run.stderr
    events = lines(run.stdout)
    [amd] = [e for e in events if e["type"] == "amd"]
    assert amd["result"] == "machine", amd
    beeps = [e for e in events if e["type"] == "beep"]
    assert beeps, events
    assert events[-1]["type"] == "call_end"


# -- POST /transcribe ------------------------------------------------------------------


def post(node: Node, body: bytes, query: str = "", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    import http.client

    port = int(node.args[node.args.index("--http-port") + 1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120_000 * MS)
    try:
        conn.request("POST", f"/transcribe{query}", body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_post_transcribe_answers_the_events_of_a_wav_and_of_raw_pcm(node: Node) -> None:
    wav = (DATA / "ko_02.wav").read_bytes()
    status, body = post(node, wav)
    assert status == 200, body
    events = lines(body.decode())
    assert any(e["type"] == "final" and e["words"] for e in events), events
    assert events[-1]["type"] == "call_end" and events[-1]["overrun_bytes"] == 0
    pcm, rate, _ = parse_audio((DATA / "ko_02_8k.wav").read_bytes())
    status, body = post(node, pcm, f"?rate={rate}&channels=1")
    assert status == 200, body
    assert lines(body.decode())[-1]["type"] == "call_end"


def test_post_transcribe_refuses_bad_input_with_a_reason(node: Node) -> None:
    status, body = post(node, b"not audio")
    assert status == 400 and b"not a WAV file" in body
    status, body = post(node, b"\0" * 100, "", {"Content-Length": "60000000"})
    assert status == 413 and b"more than 50000000" in body
