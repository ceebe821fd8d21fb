"""The LLM fallback for finals no intent rule matched: the client (farm/llm.py) and the
ingress's wiring (farm/ingress/llm_intents.py), end to end through a real node.

Ollama itself is not here: :class:`OllamaStandIn` is a peer standing in for it, an HTTP
server on 127.0.0.1 that follows Ollama's ``POST /api/chat`` (``stream: false``) request
and answer JSON, and answers, hangs or misbehaves as a test says. Everything of farm's is
real: the node, its processes and sockets, the model, committed speech.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from farm.client import Commands, Subscription
from farm.config import Config
from farm.intents import UNKNOWN, IntentMatch, IntentRules
from farm.llm import OllamaClient, build_messages, parse_url
from farm.protocol.events import Event
from farm.sender import metadata_for, read_wav
from workers.analysis import CallAnalysis, Options

from .conftest import DATA, MS, Node, free_port, metric_value, start_node
from .peers import AudioStreamPeer
from .test_intents import RULES


ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_INTENTS = ROOT / "deploy" / "intents" / "ko-example.toml"
# A call's own intents whose phrases none of the recordings used here say: their finals
# match no rule, so each goes to the LLM.
OWN_INTENTS = {
    "callback": {"phrases": ["나중에 전화"], "examples": ["지금은 좀 그렇고 나중에 다시 전화 주세요"]},
    "stop": {"phrases": ["전화하지 마"], "examples": ["앞으로 전화하지 마세요"]},
}
BUDGET_MS = int(8000 * MS * 1000)  # longer than the hang test's second utterance takes
KO_01, _, _ = read_wav(str(DATA / "ko_01.wav"))  # matches none of the example set's rules either


class OllamaStandIn:
    """A peer standing in for Ollama (not farm code): an asyncio HTTP server on 127.0.0.1
    that follows ``POST /api/chat`` with ``"stream": false``: it reads the request JSON
    and answers ``{"model", "created_at", "message": {"role": "assistant", "content"},
    "done": true, ...}`` as Ollama does, with ``Content-Length``.

    ``content`` is the assistant message's content; ``delay`` seconds pass before the
    answer; ``raw`` replaces the whole response; ``hang`` answers nothing until the client
    closes the connection. Requests are kept in ``requests``; ``open`` counts those whose
    connection the client still holds. Serve it on the test's own loop (``async with``) or
    on a thread of its own (:meth:`in_thread`) for a node to use.
    """

    def __init__(self, content: str = '{"intent": "yes"}', delay: float = 0.0, raw: bytes | None = None) -> None:
        self.content, self.delay, self.raw = content, delay, raw
        self.hang = False
        self.requests: list[dict[str, Any]] = []
        self.open = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> OllamaStandIn:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def aclose(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()

    async def __aenter__(self) -> OllamaStandIn:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @contextlib.contextmanager
    def in_thread(self) -> Iterator[OllamaStandIn]:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="ollama-stand-in", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result(10)
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(self.aclose(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self._writers.add(writer)
        try:
            request_line = await reader.readline()
            assert request_line.startswith(b"POST /api/chat HTTP/1."), request_line
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                key, _, value = line.decode().partition(":")
                headers[key.lower()] = value.strip()
            self.requests.append(json.loads(await reader.readexactly(int(headers["content-length"]))))
            if self.hang:
                await reader.read()  # until the client gives up and closes
                return
            await asyncio.sleep(self.delay)
            if self.raw is not None:
                writer.write(self.raw)
            else:
                body = json.dumps(
                    {
                        "model": self.requests[-1].get("model"),
                        "created_at": "2026-01-01T00:00:00Z",
                        "message": {"role": "assistant", "content": self.content},
                        "done_reason": "stop",
                        "done": True,
                    }
                ).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            self._writers.discard(writer)
            writer.close()


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(main())


def client(port: int, **kwargs: Any) -> OllamaClient:
    kwargs.setdefault("budget", 2000 * MS)
    return OllamaClient(f"http://127.0.0.1:{port}", "qwen2.5:3b", **kwargs)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30_000 * MS) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.05)
    return found


# -- the client, against a stand-in on the test's loop -------------------------------------


class TestClient:
    def test_right_answer_names_the_intent(self) -> None:
        async def main() -> tuple[IntentMatch, dict[str, Any]]:
            async with OllamaStandIn('{"intent": "callback"}') as peer:
                found = await client(peer.port).classify("지금은 좀 그렇고요 이따 봐요", RULES)
                return found, peer.requests[0]

        found, request = run(main)
        assert found == IntentMatch("callback", "지금은 좀 그렇고요 이따 봐요", source="llm")
        assert request["model"] == "qwen2.5:3b"
        assert request["stream"] is False and request["format"] == "json"
        assert request["messages"][1] == {"role": "user", "content": "지금은 좀 그렇고요 이따 봐요"}

    def test_prompt_lists_every_intent_with_its_examples(self) -> None:
        system = build_messages("음", RULES)[0]["content"]
        for intent in RULES.intents:
            assert f"- {intent.name}: " in system
        assert "네 맞아요" in system and "(language: ko)" in system

    @pytest.mark.parametrize(
        ("content", "reason"),
        [
            ("yes", "invalid_json"),
            ('{"answer": "yes"}', "invalid_json"),
            ('["yes"]', "invalid_json"),
            ('{"intent": "refund"}', "unknown_intent"),
            ('{"intent": "unknown"}', "no_intent"),
        ],
    )
    def test_answer_that_names_no_known_intent_is_unknown(self, content: str, reason: str) -> None:
        async def main() -> IntentMatch:
            async with OllamaStandIn(content) as peer:
                return await client(peer.port).classify("음 글쎄요", RULES)

        assert run(main) == IntentMatch(UNKNOWN, "음 글쎄요", source="llm", reason=reason)

    @pytest.mark.parametrize(
        ("raw", "reason"),
        [
            (
                b'HTTP/1.1 404 Not Found\r\nContent-Length: 40\r\n\r\n{"error":"model \'qwen2.5:3b\' not found"}',
                "http_status",
            ),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]", "bad_response"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n{}", "bad_response"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n", "bad_response"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "bad_response"),
            (b"SSH-2.0-OpenSSH\r\n", "bad_response"),
            (b'HTTP/1.0 200 OK\r\n\r\n{"message": {"content": "{\\"intent\\": \\"no\\"}"}}', ""),
        ],
    )
    def test_broken_http_answer_is_unknown(self, raw: bytes, reason: str) -> None:
        async def main() -> IntentMatch:
            async with OllamaStandIn(raw=raw) as peer:
                return await client(peer.port).classify("아 네", RULES)

        found = run(main)
        assert (found.name, found.reason) == (("no", "") if not reason else (UNKNOWN, reason))

    def test_a_server_that_hangs_is_unknown_timeout_and_is_hung_up_on(self) -> None:
        async def main() -> tuple[IntentMatch, OllamaStandIn]:
            async with OllamaStandIn() as peer:
                peer.hang = True
                found = await client(peer.port, budget=300 * MS).classify("네", RULES)
                deadline = time.monotonic() + 10_000 * MS
                while peer.open and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                return found, peer

        found, peer = run(main)
        assert (found.name, found.reason) == (UNKNOWN, "timeout")
        assert len(peer.requests) == 1 and peer.open == 0  # the client closed its connection

    def test_dead_port_is_unknown(self) -> None:
        found = run(lambda: client(free_port()).classify("네", RULES))
        assert (found.name, found.reason, found.source) == (UNKNOWN, "unreachable", "llm")

    def test_empty_text_is_unknown_without_asking(self) -> None:
        found = run(lambda: client(free_port()).classify("  ", RULES))
        assert found.reason == "empty"

    def test_calls_past_the_concurrency_cap_are_busy_at_once(self) -> None:
        async def main() -> tuple[list[IntentMatch], int]:
            async with OllamaStandIn(delay=500 * MS) as peer:
                llm = client(peer.port, max_concurrent=2)
                tasks = [asyncio.create_task(llm.classify(f"네 {k}", RULES)) for k in range(5)]
                await asyncio.sleep(0)  # every task has run up to its first wait
                busy = [t.result() for t in tasks if t.done()]
                assert len(busy) == 3 and all(m.reason == "busy" for m in busy)
                results = await asyncio.gather(*tasks)
                return results, len(peer.requests)

        results, asked = run(main)
        assert asked == 2
        assert sorted(m.name for m in results) == ["unknown"] * 3 + ["yes"] * 2

    def test_each_reason_is_logged_once(self, caplog: pytest.LogCaptureFixture) -> None:
        async def main() -> None:
            llm = client(free_port())
            for _ in range(3):
                await llm.classify("네", RULES)

        with caplog.at_level(logging.WARNING, logger="farm.llm"):
            run(main)
        assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["llm fallback answers unknown: unreachable"]

    def test_rules_can_come_from_the_dialer_json(self) -> None:
        rules = IntentRules.from_json('{"intents": {"yes": {"phrases": ["네"]}, "no": {"phrases": ["아니요"]}}}')

        async def main() -> IntentMatch:
            async with OllamaStandIn('{"intent": "no"}') as peer:
                return await client(peer.port).classify("별로요", rules)

        assert run(main).name == "no"

    @pytest.mark.parametrize(
        ("url", "problem"),
        [
            ("http://127.0.0.1:11434", ""),
            ("http://ollama", ""),
            ("https://ollama:11434", "is not http://host[:port]"),
            ("http://ollama:11434/api/chat", "is not http://host[:port]"),
            ("ollama:11434", "is not http://host[:port]"),
            ("http://ollama:99999", "is not a URL"),
        ],
    )
    def test_the_url_knob_takes_plain_http_to_a_host_and_a_port(self, url: str, problem: str) -> None:
        if not problem:
            assert parse_url(url)[1] == 11434
            Config(llm_url=url).check()
            return
        with pytest.raises(ValueError, match=re.escape(problem)):
            Config(llm_url=url).check()
        with pytest.raises(ValueError):
            OllamaClient(url, "m")

    def test_client_refuses_a_budget_that_is_not_positive(self) -> None:
        with pytest.raises(ValueError, match="budget 0 s"):
            OllamaClient("http://127.0.0.1", "m", budget=0)


class TestWhichFinalsAreAsked:
    """The worker's side (workers/analysis.py): which finals it marks ``llm_intent``."""

    def analysis(self, llm: bool = True) -> CallAnalysis:
        return CallAnalysis(16000, Options(tones=False, intents=RULES, llm=llm), 0, False)

    def asked(self, analysis: CallAnalysis, *partials: str, final: str) -> bool:
        for text in partials:
            analysis.on_transcript(0, text, False)
        analysis.on_transcript(0, final, True)
        return analysis.ask_llm(final)

    def test_a_final_no_rule_matched_is_asked(self) -> None:
        assert self.asked(self.analysis(), "음", final="음 글쎄요 생각 좀 해 볼게요")

    def test_a_final_a_rule_matched_is_not(self) -> None:
        assert not self.asked(self.analysis(), final="네 맞아요")

    def test_an_utterance_whose_partials_fired_early_is_not_even_if_its_final_matches_nothing(self) -> None:
        assert not self.asked(self.analysis(), "네", "네 맞아요", final="내 마자 요")

    def test_nothing_is_asked_of_an_empty_final_or_with_the_llm_off_or_without_intents(self) -> None:
        assert not self.asked(self.analysis(), final=" ")
        assert not self.asked(self.analysis(llm=False), final="음 글쎄요")
        bare = CallAnalysis(16000, Options(tones=False, llm=True), 0, False)
        assert not self.asked(bare, final="음 글쎄요")


# -- end to end: a real node whose ingress asks the stand-in --------------------------------


@pytest.fixture(scope="module")
def ollama() -> Iterator[OllamaStandIn]:
    with OllamaStandIn().in_thread() as peer:
        yield peer


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, ollama: OllamaStandIn) -> Iterator[Node]:
    n = start_node(
        tmp_path_factory.mktemp("farm-llm"),
        *("--intents", str(EXAMPLE_INTENTS)),
        *("--llm-url", ollama.url, "--llm-model", "stand-in:1b"),
        *("--llm-budget-ms", str(BUDGET_MS), "--llm-max-concurrent", "1"),
        workers=1,
    )
    yield n
    assert n.stop() == 0


def llm_intents(events: list[Event]) -> list[Event]:
    return [e for e in events if e.type == "intent" and e["source"] == "llm"]


class Line:
    """A mod_audio_stream call that streams 20 ms frames in real time, silence unless it
    has something to say, and collects the call's events."""

    def __init__(self, node: Node, call_id: str) -> None:
        self.node, self.call_id = node, call_id
        self.peer = AudioStreamPeer("127.0.0.1", node.port, f"/{call_id}?rate=16000")
        self.pending = bytearray()
        self.events: list[Event] = []
        self.arrived = asyncio.Event()

    async def start(self, sub: Subscription, metadata: str) -> None:
        await self.peer.connect(timeout=30_000 * MS)
        await self.peer.send_text(metadata)
        self.tasks = [asyncio.create_task(self._stream()), asyncio.create_task(self._collect(sub))]

    def say(self, pcm: bytes) -> None:
        self.pending += pcm

    async def _stream(self) -> None:
        loop = asyncio.get_running_loop()
        t0, k = loop.time(), 0
        while True:
            frame = bytes(self.pending[:640]).ljust(640, b"\0")  # silence when nothing is said
            del self.pending[:640]
            await self.peer.send_binary(frame)
            k += 1
            await asyncio.sleep(max(0.0, t0 + k * 0.02 - loop.time()))

    async def _collect(self, sub: Subscription) -> None:
        while True:
            self.events.append(await sub.next())
            self.arrived.set()

    async def until(self, what: str, check: Callable[[], Any], timeout: float = 60_000 * MS) -> Any:
        try:
            async with asyncio.timeout(timeout):
                while not (found := check()):
                    self.arrived.clear()
                    with contextlib.suppress(TimeoutError):  # the stand-in's state changes without an event
                        await asyncio.wait_for(self.arrived.wait(), 0.05)
        except TimeoutError:
            seen = [(e.type, e.get("text") or e.get("intent"), e.get("reason")) for e in self.events]
            raise AssertionError(f"{what}: not within {timeout:.0f} s; events {seen}") from None
        return found

    def first(self, type: str, **members: Any) -> Event | None:
        return next((e for e in self.events if e.type == type and all(e.get(k) == v for k, v in members.items())), None)

    async def hang_up(self) -> None:
        self.tasks[0].cancel()
        await self.peer.close()
        await self.until("call_end", lambda: self.first("call_end"))
        self.tasks[1].cancel()


def test_a_final_no_rule_matched_is_followed_by_the_llms_intent(node: Node, ollama: OllamaStandIn) -> None:
    ollama.hang, ollama.content = False, '{"intent": "callback"}'
    asked = len(ollama.requests)
    call_id = f"llm-{uuid.uuid4()}"

    async def scenario() -> Line:
        line = Line(node, call_id)
        async with Subscription(node.events, call_id) as sub:
            assert await sub.ready(timeout=30_000 * MS)
            await line.start(sub, metadata_for(call_id, 16000, 1, {"intents": OWN_INTENTS}))
            line.say(KO_01)
            await line.until("the llm's intent", lambda: llm_intents(line.events))
            await line.hang_up()
        return line

    events = asyncio.run(scenario()).events
    final = next(e for e in events if e.type == "final" and e["text"])
    assert final.get("llm_intent") is True, final.data
    [answer] = [e for e in llm_intents(events) if e["final_seq"] == final.seq]
    assert events.index(answer) > events.index(final)  # asked once the final was out
    assert (answer["intent"], answer["matched"], answer["early"]) == ("callback", final["text"], False)
    assert "reason" not in answer.data and events[-1].type == "call_end"
    assert events[-1]["stats"]["intents"] == []  # the worker's figures: its rules' intents (README)
    # The stand-in was asked with the call's own intents and the final's words.
    request = ollama.requests[asked]
    assert request["model"] == "stand-in:1b" and request["stream"] is False
    system, user = request["messages"]
    assert (
        "- callback: 지금은 좀 그렇고 나중에 다시 전화 주세요" in system["content"] and "- stop: " in system["content"]
    )
    assert "wrong_person" not in system["content"]  # not the node's set: the call brought its own
    assert user == {"role": "user", "content": final["text"]}


def test_a_hanging_llm_delays_no_final_and_no_barge_in_and_answers_unknown(node: Node, ollama: OllamaStandIn) -> None:
    """The stand-in takes the first final's question and never answers. Meanwhile a prompt
    plays, the caller talks over it and says a second sentence: the barge-in and that
    final come while the first question is still open; the second question finds the one
    slot taken (--llm-max-concurrent 1): busy, at once; the first times out."""
    ollama.hang = True
    call_id = f"llm-hang-{uuid.uuid4()}"
    second_words, _, _ = read_wav(str(DATA / "ko_10.wav"))
    prompt = bytes(60 * 16000 * 2)  # a minute: it still plays whenever the caller speaks

    async def scenario() -> Line:
        line = Line(node, call_id)
        async with Subscription(node.events, call_id) as sub, Commands(node.commands) as farm:
            assert await sub.ready(timeout=30_000 * MS)
            await line.start(sub, metadata_for(call_id, 16000, 1, {"intents": OWN_INTENTS}))
            line.say(KO_01)
            first = await line.until("first final", lambda: line.first("final", llm_intent=True))
            await line.until("the stand-in holds its question", lambda: ollama.open)
            await farm.play(call_id, prompt, rate=16000, play_id="prompt")
            deadline = time.monotonic() + 10_000 * MS
            while not (await farm.state(call_id))["playing"]:
                assert time.monotonic() < deadline, "the prompt never played"
                await asyncio.sleep(0.05)
            line.say(second_words)
            await line.until("barge-in", lambda: line.first("barge_in"))
            assert ollama.open == 1 and not llm_intents(line.events)  # the question is still open
            second = await line.until("second final", lambda: [e for e in line.events if e.get("llm_intent")][1:])
            assert ollama.open == 1 and not line.first("intent", final_seq=first.seq)  # still open
            await line.until("busy", lambda: line.first("intent", final_seq=second[0].seq))
            await line.until("timeout", lambda: line.first("intent", final_seq=first.seq))
            await line.until("the client hung up on the stand-in", lambda: not ollama.open)
            await line.hang_up()
        return line

    line = asyncio.run(scenario())
    events = line.events
    finals = [e for e in events if e.get("llm_intent")]
    first, second = finals[0], finals[1]
    [barge] = [e for e in events if e.type == "barge_in"]
    busy, timed_out = line.first("intent", final_seq=second.seq), line.first("intent", final_seq=first.seq)
    assert busy is not None and timed_out is not None
    assert (busy["intent"], busy["reason"], busy["source"]) == (UNKNOWN, "busy", "llm")
    assert (timed_out["intent"], timed_out["reason"], timed_out["matched"]) == (UNKNOWN, "timeout", first["text"])
    order = [events.index(e) for e in (first, barge, second, busy)]
    assert order == sorted(order) and events.index(timed_out) > events.index(second)
    assert events[-1].type == "call_end"


def test_a_question_open_when_its_call_ends_is_dropped_and_call_end_stays_last(
    node: Node, ollama: OllamaStandIn
) -> None:
    """A call that names no intents gets the node's set (--intents): the prompt lists it."""
    ollama.hang = True
    asked = len(ollama.requests)
    call_id = f"llm-end-{uuid.uuid4()}"

    async def scenario() -> Line:
        line = Line(node, call_id)
        async with Subscription(node.events, call_id) as sub:
            assert await sub.ready(timeout=30_000 * MS)
            await line.start(sub, metadata_for(call_id, 16000, 1))
            line.say(KO_01)
            await line.until("final", lambda: line.first("final", llm_intent=True))
            await line.until("the stand-in holds its question", lambda: ollama.open)
            await line.hang_up()
            await line.until("the question was dropped", lambda: not ollama.open)
        return line

    line = asyncio.run(scenario())
    assert line.events[-1].type == "call_end" and not llm_intents(line.events)
    assert "- wrong_person: 잘못 거셨어요" in ollama.requests[asked]["messages"][0]["content"]


def test_the_node_counts_the_questions_by_outcome_and_times_them(node: Node) -> None:
    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.port}/metrics", timeout=10) as r:
            return str(r.read().decode())

    def count(outcome: str) -> float:
        return metric_value(scrape(), "farm_llm_requests_total", outcome=outcome) or 0

    for outcome in ("intent", "busy", "timeout", "call_ended"):
        wait_for(f"{outcome} counted", lambda: count(outcome) >= 1)  # noqa: B023
    assert count("unreachable") == 0
    timed = metric_value(scrape(), "farm_llm_latency_seconds_count") or 0
    assert timed >= count("intent") + count("timeout")
