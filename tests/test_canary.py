"""The canary: /readyz proves recognition. A committed utterance goes through a worker like a
call every --canary-interval-s; the node is ready only while its transcript is right and its
final in time, and the probe is nobody's call: not on the event stream, not in the metrics."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from farm.client import Subscription
from farm.ingress.canary import SHIPPED_TEXT, same_words
from farm.protocol.events import CANARY_PREFIX, Event
from farm.sender import metadata_for, send_pcm

from .conftest import MS, Node, free_port, http_get, metric_value, start_node


def _wait_for(n: Node, path: str, condition: object, what: str, timeout: float = 90_000 * MS) -> str:
    """Poll ``path`` until ``condition(status, body)`` holds; its body."""
    deadline = time.monotonic() + timeout
    status, body = 0, ""
    while time.monotonic() < deadline:
        status, body = http_get(n, path)
        if condition(status, body):  # type: ignore[operator]
            return body
        time.sleep(0.2)
    raise AssertionError(f"{what}: never (last {status} {body[-500:]!r})\n{n.log()[-2000:]}")


def test_the_shipped_utterance_proves_recognition_and_is_nobodys_call(tmp_path: Path) -> None:
    # Ready only once a first probe passed: start_node waits for /readyz 200.
    # Probing on while idle (0), so that another probe comes while the events are watched.
    n = start_node(tmp_path, "--canary-interval-s", "0.5", "--canary-idle-interval-s", "0", workers=1)
    try:

        async def watch_all_events() -> list[Event]:
            seen: list[Event] = []
            async with Subscription(n.events) as everything:
                before = metric_value(http_get(n, "/metrics")[1], "farm_canary_probes_total", result="ok") or 0
                # Another probe passes while every event of the node is watched.
                await asyncio.to_thread(
                    _wait_for,
                    n,
                    "/metrics",
                    lambda s, b: (metric_value(b, "farm_canary_probes_total", result="ok") or 0) >= before + 1,
                    "another probe passing",
                )
                while True:
                    try:
                        seen.append(await everything.next(timeout=200 * MS))
                    except TimeoutError:
                        return seen

        assert asyncio.run(watch_all_events()) == []
        metrics = http_get(n, "/metrics")[1]
        assert metric_value(metrics, "farm_canary_passing") == 1
        assert (metric_value(metrics, "farm_canary_end_of_speech_to_final_seconds") or 0) > 0
        assert metric_value(metrics, "farm_canary_probes_total", result="wrong") == 0
        for name in ("farm_calls_total", "farm_calls_active", "farm_calls_assigned"):
            assert metric_value(metrics, name) == 0, name
        assert metric_value(metrics, "farm_events_total", type="final") == 0
        assert http_get(n, "/readyz") == (200, "ready: 1 workers\n")

        # The canary's call ids are the node's own.
        url = f"{n.url}/{CANARY_PREFIX}7"
        sent = asyncio.run(send_pcm(url, bytes(3200), rate=16000, realtime=False, linger_s=30))
        assert sent.close_code == 1008 and "canary" in sent.close_reason, sent
        assert "canary passes: recognition proven" in n.log()
    finally:
        assert n.stop() == 0


def test_wrong_words_or_a_late_final_make_the_node_not_ready_and_say_why(tmp_path: Path) -> None:
    # Two nodes at once (each is mostly waiting for its workers and its probe).
    wrong = start_node(
        tmp_path, "--canary-interval-s", "0.5", "--canary-text", "전혀 다른 문장입니다", workers=1, wait=False
    )
    late = start_node(tmp_path, "--canary-interval-s", "0.5", "--canary-max-ms", "1", workers=1, wait=False)
    try:
        body = _wait_for(wrong, "/readyz", lambda s, b: s == 503 and "heard" in b, "a probe of wrong words")
        assert body.startswith("canary: heard '") and "expected '전혀 다른 문장입니다'" in body, body
        metrics = http_get(wrong, "/metrics")[1]
        assert metric_value(metrics, "farm_canary_passing") == 0
        assert (metric_value(metrics, "farm_canary_probes_total", result="wrong") or 0) >= 1

        body = _wait_for(late, "/readyz", lambda s, b: s == 503 and "bound" in b, "a late probe")
        assert body.startswith("canary: ") and body.endswith(" ms (bound 1 ms)\n"), body
        assert (metric_value(http_get(late, "/metrics")[1], "farm_canary_probes_total", result="late") or 0) >= 1
    finally:
        assert wrong.stop() == 0
        assert late.stop() == 0


def _passed(n: Node) -> int:
    return int(metric_value(http_get(n, "/metrics")[1], "farm_canary_probes_total", result="ok") or 0)


def _settled(n: Node) -> int:
    """The count of passing probes once it stays put for 6 s (12 intervals, a probe takes
    ~4 s): a probe begun while a call was live proves nothing about the node idle after it,
    so one more may follow it."""
    last = _passed(n)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(6.0)
        now = _passed(n)
        if now == last:
            return now
        last = now
    raise AssertionError(f"an idle node kept probing: {last} probes passed\n{n.log()[-2000:]}")


def test_an_idle_node_probes_again_only_after_a_call_or_a_replaced_worker(tmp_path: Path) -> None:
    """While no call came and the same broker and workers serve, the last passing probe
    stands for --canary-idle-interval-s; a call, or a worker replaced, brings the next probe
    at --canary-interval-s."""
    n = start_node(tmp_path, "--canary-interval-s", "0.5", "--canary-idle-interval-s", "3600", workers=1)
    try:
        _wait_for(n, "/metrics", lambda s, b: _passed(n) >= 1, "the first probe passing")
        first = _settled(n)
        assert http_get(n, "/readyz")[0] == 200  # the last probe still stands

        pcm, metadata = bytes(3200), metadata_for("idle-1", 16000, 1)
        asyncio.run(send_pcm(f"{n.url}/idle-1", pcm, rate=16000, realtime=False, metadata=metadata))  # a call came
        assert metric_value(http_get(n, "/metrics")[1], "farm_calls_total") == 1
        _wait_for(n, "/metrics", lambda s, b: _passed(n) > first, "a probe after the call")
        after_call = _settled(n)  # idle again

        [worker] = n.pids("worker")
        os.kill(worker, signal.SIGKILL)  # the supervisor starts another one
        _wait_for(n, "/metrics", lambda s, b: _passed(n) > after_call, "a probe through the new worker")
        assert n.pids("worker") != [worker]
    finally:
        assert n.stop() == 0


def test_farm_up_refuses_a_canary_utterance_it_cannot_play(tmp_path: Path) -> None:
    bad = tmp_path / "canary.wav"
    bad.write_bytes(b"RIFF....WAVEnot really")
    proc = subprocess.run(
        [sys.executable, "-m", "farm.cli", "up", "--port", str(free_port()), "--canary-wav", str(bad)]
        + ["--canary-text", "네"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"--canary-wav {bad}: not a WAV file farm reads" in proc.stderr


def test_transcripts_compare_by_their_characters_not_their_spacing() -> None:
    assert same_words(SHIPPED_TEXT, SHIPPED_TEXT.replace(" ", "")) == 1.0
    assert same_words("네 맞 습니다", "네 맞습니다") == 1.0
    assert same_words(SHIPPED_TEXT, "전혀 다른 문장입니다") < 0.5
    assert same_words("", SHIPPED_TEXT) == 0.0
