"""The LLM fallback client (farm/llm.py) against a stand-in for Ollama on loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from farm.intents import UNKNOWN, IntentMatch, IntentRules
from farm.llm import OllamaClient, build_messages

from .conftest import MS, free_port
from .test_intents import RULES


class OllamaStandIn:
    """A peer standing in for Ollama: an asyncio HTTP/1.1 server that follows
    ``POST /api/chat`` (not streamed) on 127.0.0.1 and answers what the test sets.

    ``content`` is the assistant message's content; ``delay`` seconds pass before the
    answer; ``raw`` replaces the whole response. Requests are kept in ``requests``.
    """

    def __init__(self, content: str = '{"intent": "yes"}', delay: float = 0.0, raw: bytes | None = None) -> None:
        self.content, self.delay, self.raw = content, delay, raw
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> OllamaStandIn:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.in_flight += 1
        try:
            request_line = await reader.readline()
            assert request_line.startswith(b"POST /api/chat HTTP/1.1")
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                key, _, value = line.decode().partition(":")
                headers[key.lower()] = value.strip()
            self.requests.append(json.loads(await reader.readexactly(int(headers["content-length"]))))
            await asyncio.sleep(self.delay)
            if self.raw is not None:
                writer.write(self.raw)
            else:
                body = json.dumps(
                    {"model": "stand-in", "message": {"role": "assistant", "content": self.content}, "done": True}
                ).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.in_flight -= 1
            writer.close()


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(main())


def client(port: int, **kwargs: Any) -> OllamaClient:
    kwargs.setdefault("budget", 2000 * MS)
    return OllamaClient("qwen2.5:3b", "127.0.0.1", port, **kwargs)


def test_right_answer_names_the_intent() -> None:
    async def main() -> tuple[IntentMatch, dict[str, Any]]:
        async with OllamaStandIn('{"intent": "callback"}') as peer:
            found = await client(peer.port).classify("지금은 좀 그렇고요 이따 봐요", RULES)
            return found, peer.requests[0]

    found, request = run(main)
    assert found == IntentMatch("callback", "지금은 좀 그렇고요 이따 봐요", source="llm")
    assert request["model"] == "qwen2.5:3b"
    assert request["stream"] is False and request["format"] == "json"
    assert request["messages"][1] == {"role": "user", "content": "지금은 좀 그렇고요 이따 봐요"}


def test_prompt_lists_every_intent_with_its_examples() -> None:
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
def test_answer_that_names_no_known_intent_is_unknown(content: str, reason: str) -> None:
    async def main() -> IntentMatch:
        async with OllamaStandIn(content) as peer:
            return await client(peer.port).classify("음 글쎄요", RULES)

    assert run(main) == IntentMatch(UNKNOWN, "음 글쎄요", source="llm", reason=reason)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", "http_status"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]", "bad_response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n{}", "bad_response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n", "bad_response"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "bad_response"),
        (b"SSH-2.0-OpenSSH\r\n", "bad_response"),
        (b'HTTP/1.1 200 OK\r\n\r\n{"message": {"content": "{\\"intent\\": \\"no\\"}"}}', ""),
    ],
)
def test_broken_http_answer_is_unknown(raw: bytes, reason: str) -> None:
    async def main() -> IntentMatch:
        async with OllamaStandIn(raw=raw) as peer:
            return await client(peer.port).classify("아 네", RULES)

    found = run(main)
    assert (found.name, found.reason) == (("no", "") if not reason else (UNKNOWN, reason))


def test_slow_server_is_unknown_within_the_budget() -> None:
    budget = 300 * MS

    async def main() -> tuple[IntentMatch, float]:
        async with OllamaStandIn(delay=5000 * MS) as peer:
            start = time.monotonic()
            found = await client(peer.port, budget=budget).classify("네", RULES)
            return found, time.monotonic() - start

    found, elapsed = run(main)
    assert (found.name, found.reason) == (UNKNOWN, "timeout")
    assert elapsed < budget + 1000 * MS


def test_dead_port_is_unknown() -> None:
    found = run(lambda: client(free_port()).classify("네", RULES))
    assert (found.name, found.reason, found.source) == (UNKNOWN, "unreachable", "llm")


def test_empty_text_is_unknown_without_asking() -> None:
    found = run(lambda: client(free_port()).classify("  ", RULES))
    assert found.reason == "empty"


def test_calls_past_the_concurrency_cap_are_busy_at_once() -> None:
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


def test_each_reason_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> OllamaClient:
        llm = client(free_port())
        for _ in range(3):
            await llm.classify("네", RULES)
        return llm

    with caplog.at_level(logging.WARNING, logger="farm.llm"):
        llm = run(main)
    assert llm.unknowns["unreachable"] == 3
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["llm fallback answers unknown: unreachable"]


def test_client_refuses_a_budget_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="budget 0 s"):
        OllamaClient("m", budget=0)


def test_rules_can_come_from_the_dialer_json() -> None:
    rules = IntentRules.from_json('{"intents": {"yes": {"phrases": ["네"]}, "no": {"phrases": ["아니요"]}}}')

    async def main() -> IntentMatch:
        async with OllamaStandIn('{"intent": "no"}') as peer:
            return await client(peer.port).classify("별로요", rules)

    assert run(main).name == "no"
