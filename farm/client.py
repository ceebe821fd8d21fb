"""What dialer apps import: the farm's events, and play/flush commands.

    async for event in farm.client.events("tcp://farm-host:5556", call_id=uuid):
        if event.type == "final":
            print(event["text"])

    commands = farm.client.Commands("tcp://farm-host:5557")
    await commands.play_wav(uuid, "prompt.wav")   # cut by barge-in when the caller talks
    await commands.flush(uuid)

Events are published on ZeroMQ (XPUB) with the call id as topic; see
:mod:`farm.protocol.events` for the schema. Commands go to the ingress's command
socket (:mod:`farm.ingress.commands`).

Several nodes behind a balancer (deploy/haproxy): subscribe to every node's events at
once, and give :class:`Commands` every node's command endpoint by node id (``farm up
--node-id``, the ``node`` of each ``call_start``); it sends each call's commands to the
node that holds it, learned from the call_start it is shown::

    nodes = {"farm1": "tcp://10.0.0.11:5557", "farm2": "tcp://10.0.0.12:5557"}
    async with Subscription(["tcp://10.0.0.11:5556", "tcp://10.0.0.12:5556"]) as sub, Commands(nodes) as farm:
        async for event in sub:
            farm.learn(event)
            if event.type == "final":
                await farm.play_wav(event.call_id, "answer.wav")
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from farm.curve import Keys, client_socket
from farm.protocol.events import SUBSCRIBED, Event, EventError, topic_for


__all__ = ["events", "Subscription", "Commands", "CommandError", "DEFAULT_EVENTS", "DEFAULT_COMMANDS", "describe"]

DEFAULT_EVENTS = "tcp://127.0.0.1:5556"
DEFAULT_COMMANDS = "tcp://127.0.0.1:5557"
# How long entering a Subscription waits for the farm to confirm it.
SUBSCRIBE_TIMEOUT_S = 5.0


def describe(e: Event) -> str:
    """One event as `farm events` and `farm transcribe` print it."""
    at = f"{e.offset_ms / 1000:7.2f}s"
    lag = ""
    if "publish" in e.stamps and "recv" in e.stamps:
        lag = f"  (+{(e.stamps['publish'] - e.stamps['recv']) / 1e6:.0f} ms)"
    if e.type in ("partial", "final"):
        words = f"  [{len(e.get('words', []))} words, {e.get('reason')}]" if e.type == "final" else ""
        return f"{at} {e.type:<12} {e.get('text')!r}{words}{lag}"
    if e.type == "speech_end":
        return f"{at} {e.type:<12} {e.get('duration_ms')} ms of speech{lag}"
    extra = {k: v for k, v in e.data.items() if k not in ("metadata",)}
    return f"{at} {e.type:<12} {json.dumps(extra, ensure_ascii=False) if extra else ''}{lag}"


class Subscription:
    """A live subscription to the events of one call (or all calls), of one node or several.

    Open it *before* the call starts (ZeroMQ drops what a subscriber was not yet
    subscribed to), e.g. ``async with Subscription(url, call_id) as sub:``, which
    returns once the farm has confirmed the subscription (:meth:`ready`). ``endpoint``
    may be a list of nodes' event endpoints: their events come merged, each node's in
    its order.
    """

    def __init__(
        self,
        endpoint: str | Sequence[str] = DEFAULT_EVENTS,
        call_id: str | None = None,
        *,
        ctx: zmq.asyncio.Context | None = None,
        keys: Keys | None = None,
    ) -> None:
        self.endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint)
        if not self.endpoints:
            raise ValueError("no event endpoint to subscribe to")
        self.call_id = call_id
        # One context per process (pyzmq's own advice): a context per object made a garbage
        # collected, never-closed Subscription hang the process in Context.term().
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.topic = topic_for(call_id) if call_id else b""
        # A socket per node, not one connected to all: each node confirms its own subscription.
        self.socks: list[zmq.asyncio.Socket] = []
        self.poller = zmq.asyncio.Poller()
        for url in self.endpoints:
            sock = self.ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 100_000)
            if keys is not None:  # a farm with --curve-dir (farm.curve.client_keys)
                client_socket(sock, keys)
            sock.connect(url)
            sock.setsockopt(zmq.SUBSCRIBE, self.topic)
            self.socks.append(sock)
            self.poller.register(sock, zmq.POLLIN)
        self._received: deque[tuple[zmq.asyncio.Socket, bytes, bytes]] = deque()
        self._early: deque[Event] = deque()  # events that came while waiting for the answer
        self._confirmed: set[zmq.asyncio.Socket] = set()

    @property
    def endpoint(self) -> str:
        return self.endpoints[0]

    @property
    def subscribed(self) -> bool:
        """Every node has confirmed the subscription."""
        return len(self._confirmed) == len(self.socks)

    async def __aenter__(self) -> Subscription:
        await self.ready()
        return self

    async def ready(self, timeout: float = SUBSCRIBE_TIMEOUT_S) -> bool:
        """Wait until every node has the subscription: nothing published after this is missed.

        The farm's relay answers each subscription on its own topic. Returns False if
        some node gave no answer within ``timeout`` seconds (a farm too old to answer, or
        not running): the subscription stays open and takes what comes.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.subscribed:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            try:
                sock, topic, raw = await self._receive(left)
            except TimeoutError:
                return False
            if raw == SUBSCRIBED:
                if topic == self.topic:
                    self._confirmed.add(sock)
                continue
            with contextlib.suppress(EventError):
                self._early.append(Event.from_json(raw))
        return True

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def _receive(self, timeout: float | None) -> tuple[zmq.asyncio.Socket, bytes, bytes]:
        """The next message from any node: its socket, topic and body."""
        if len(self.socks) == 1:  # one node (most subscribers): its socket, no poller in between
            sock = self.socks[0]
            topic, raw = await asyncio.wait_for(sock.recv_multipart(), timeout)
            return sock, topic, raw
        while not self._received:
            ready = await self.poller.poll(None if timeout is None else int(timeout * 1000))
            if not ready:
                raise TimeoutError
            for sock, _ in ready:
                # What a node has queued, taken at once: one poll per burst, not per event.
                with contextlib.suppress(zmq.Again):
                    while True:
                        topic, raw = await sock.recv_multipart(zmq.NOBLOCK)
                        self._received.append((sock, topic, raw))
        return self._received.popleft()

    async def next(self, timeout: float | None = None) -> Event:
        """The next event; raises TimeoutError after ``timeout`` seconds."""
        if self._early:
            return self._early.popleft()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - loop.time())
            _sock, _topic, raw = await self._receive(left)
            if raw == SUBSCRIBED:
                continue  # the relay answering this or another subscriber's subscription
            try:
                return Event.from_json(raw)
            except EventError:
                continue  # a producer of another schema version: skip it

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            yield await self.next()

    @property
    def closed(self) -> bool:
        return all(sock.closed for sock in self.socks)

    def close(self) -> None:
        """Close every node's socket (again: nothing)."""
        for sock in self.socks:
            if not sock.closed:
                self.poller.unregister(sock)
                sock.close(0)


async def events(endpoint: str | Sequence[str] = DEFAULT_EVENTS, call_id: str | None = None) -> AsyncIterator[Event]:
    """Iterate over the events of one call (``call_id``) or of every call, of one node or
    of several (a list of their event endpoints)."""
    sub = Subscription(endpoint, call_id)
    try:
        async for event in sub:
            yield event
    finally:
        sub.close()


class CommandError(RuntimeError):
    """The farm refused a command (no such call, bad audio …) or did not answer."""


class _Link:
    """One node's command socket: one request at a time, a new socket after a lost answer."""

    def __init__(self, endpoint: str, ctx: zmq.asyncio.Context, keys: Keys | None, timeout: float) -> None:
        self.endpoint = endpoint
        self.ctx = ctx
        self.keys = keys
        self.timeout = timeout
        self._lock = asyncio.Lock()
        self.sock = self._connect()

    def _connect(self) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.keys is not None:
            client_socket(sock, self.keys)
        sock.connect(self.endpoint)
        return sock

    async def request(self, header: dict[str, Any], payload: bytes) -> dict[str, Any]:
        async with self._lock:
            frames = [b"", json.dumps(header).encode()]
            if payload:
                frames.append(payload)
            await self.sock.send_multipart(frames, copy=len(payload) < 65536)
            try:
                reply_frames = await asyncio.wait_for(self.sock.recv_multipart(), self.timeout)
            except TimeoutError:
                # A late answer must not be taken for the next request's: new socket.
                self.sock.close(0)
                self.sock = self._connect()
                raise CommandError(f"no answer from {self.endpoint} in {self.timeout:.0f} s") from None
        reply: dict[str, Any] = json.loads(reply_frames[-1])
        if not reply.get("ok"):
            raise CommandError(str(reply.get("error", "refused")))
        return reply

    def close(self) -> None:
        self.sock.close(0)


class Commands:
    """Play audio to calls, cut it, ask what plays: the ingresses' command sockets.

    Audio is converted by the farm to what the call's module plays (24 kHz mono for
    mod_socket_audio). One request at a time per node; share it within a task group
    or make one per app.

    ``endpoint`` is one node's command endpoint, or, for several nodes, a mapping of
    their node ids (``farm up --node-id``) to their command endpoints: then each
    call's commands go to the node holding it, which :meth:`learn` takes from the
    ``node`` of the call's ``call_start`` (from any source: the ZeroMQ events, the
    Redis stream, mod_audio_stream::json); a call it was not shown is looked up with
    :meth:`calls` on every node.
    """

    def __init__(
        self,
        endpoint: str | Mapping[str, str] = DEFAULT_COMMANDS,
        *,
        timeout: float = 10.0,
        ctx: zmq.asyncio.Context | None = None,
        keys: Keys | None = None,
    ) -> None:
        ctx = ctx or zmq.asyncio.Context.instance()  # one per process, as for Subscription
        nodes = {"": endpoint} if isinstance(endpoint, str) else dict(endpoint)
        if not nodes:
            raise ValueError("no command endpoint")
        self.links = {node: _Link(url, ctx, keys, timeout) for node, url in nodes.items()}
        self.node_of: dict[str, str] = {}  # call id -> node id, from call_start until call_end

    @property
    def endpoint(self) -> str:
        return next(iter(self.links.values())).endpoint

    def learn(self, event: Event) -> None:
        """Note where a call is (its ``call_start``) and forget it at its ``call_end``;
        other events are ignored, so pass every event."""
        if event.type == "call_start" and event.get("node") in self.links:
            self.node_of[event.call_id] = event["node"]
        elif event.type == "call_end":
            self.node_of.pop(event.call_id, None)

    async def _link_for(self, call_id: str) -> _Link:
        if len(self.links) == 1:
            return next(iter(self.links.values()))
        failures: list[str] = []
        if call_id not in self.node_of:
            _, failures = await self._ask_calls()  # where every live call is
        node = self.node_of.get(call_id)
        if node is None:
            asked = f" ({'; '.join(failures)})" if failures else ""
            raise CommandError(f"no node holds call {call_id!r}{asked}")
        return self.links[node]

    async def request(self, header: dict[str, Any], payload: bytes = b"") -> dict[str, Any]:
        """Send one request to the node holding ``header["call_id"]``; return the reply,
        or raise CommandError."""
        link = await self._link_for(str(header.get("call_id", "")))
        return await link.request(header, payload)

    async def play(
        self, call_id: str, pcm: bytes, rate: int, channels: int = 1, play_id: str | None = None
    ) -> dict[str, Any]:
        """Queue raw int16 LE PCM for the caller; returns its id and duration."""
        header = {"op": "play", "call_id": call_id, "rate": rate, "channels": channels, "id": play_id}
        return await self.request(header, pcm)

    async def play_wav(self, call_id: str, wav: str | Path | bytes, play_id: str | None = None) -> dict[str, Any]:
        """Queue a 16-bit PCM WAV file (any rate, any channel count) for the caller."""
        data = wav if isinstance(wav, bytes) else Path(wav).read_bytes()
        return await self.request({"op": "play", "call_id": call_id, "format": "wav", "id": play_id}, data)

    async def flush(self, call_id: str) -> dict[str, Any]:
        """Cut what plays now and drop what is queued."""
        return await self.request({"op": "flush", "call_id": call_id})

    async def finalize(self, call_id: str) -> dict[str, Any]:
        """End the caller's utterance now (your own endpointer decided): its final follows
        at once on the event stream, reason ``reset``."""
        return await self.request({"op": "finalize", "call_id": call_id})

    async def state(self, call_id: str) -> dict[str, Any]:
        """Whether the call is playing, which clip, what is queued."""
        return await self.request({"op": "state", "call_id": call_id})

    async def amd(self, call_id: str) -> dict[str, Any]:
        """The call was answered now: run answering-machine detection from here (the node's
        settings; once per call, ignored by a call that asked for AMD at its start). One
        ``amd`` event follows, its ``decision_ms`` counted from ``at_ms``."""
        return await self.request({"op": "amd", "call_id": call_id})

    async def stats(self, call_id: str) -> dict[str, Any]:
        """The live call's conversation figures so far (``call_end``'s ``stats``, from its
        events): ``{"ok": True, "at_ms": ..., "stats": {...}}``."""
        return await self.request({"op": "stats", "call_id": call_id})

    async def calls(self) -> list[dict[str, Any]]:
        """Every live call of every node, each with its ``node`` when there are several."""
        found, failures = await self._ask_calls()
        if failures:
            raise CommandError("; ".join(failures))
        return found

    async def _ask_calls(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The live calls of the nodes that answer (learning where each is), and what went
        wrong with the others: a dead node does not hide the calls of the live ones."""
        replies = await asyncio.gather(
            *(link.request({"op": "calls"}, b"") for link in self.links.values()), return_exceptions=True
        )
        found: list[dict[str, Any]] = []
        failures: list[str] = []
        for node, reply in zip(self.links, replies, strict=True):
            if isinstance(reply, BaseException):
                if not isinstance(reply, CommandError):
                    raise reply
                failures.append(f"{node}: {reply}" if node else str(reply))
                continue
            for call in reply["calls"]:
                if node:
                    self.node_of[call["call_id"]] = node
                    call = {**call, "node": node}
                found.append(call)
        return found, failures

    def close(self) -> None:
        for link in self.links.values():
            link.close()

    async def __aenter__(self) -> Commands:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
