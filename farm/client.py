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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import AsyncIterator
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
    """A live subscription to the events of one call (or all calls).

    Open it *before* the call starts (ZeroMQ drops what a subscriber was not yet
    subscribed to), e.g. ``async with Subscription(url, call_id) as sub:``, which
    returns once the farm has confirmed the subscription (:meth:`ready`).
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_EVENTS,
        call_id: str | None = None,
        *,
        ctx: zmq.asyncio.Context | None = None,
        keys: Keys | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.call_id = call_id
        # One context per process (pyzmq's own advice): a context per object made a garbage
        # collected, never-closed Subscription hang the process in Context.term().
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        if keys is not None:  # a farm with --curve-dir (farm.curve.client_keys)
            client_socket(self.sock, keys)
        self.sock.connect(endpoint)
        self.topic = topic_for(call_id) if call_id else b""
        self.sock.setsockopt(zmq.SUBSCRIBE, self.topic)
        self._early: deque[Event] = deque()  # events that came while waiting for the answer
        self.subscribed = False

    async def __aenter__(self) -> Subscription:
        await self.ready()
        return self

    async def ready(self, timeout: float = SUBSCRIBE_TIMEOUT_S) -> bool:
        """Wait until the farm has the subscription: nothing published after this is missed.

        The farm's relay answers each subscription on its own topic. Returns False if
        no answer came within ``timeout`` seconds (a farm too old to answer, or not
        running): the subscription stays open and takes what comes.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.subscribed:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            try:
                topic, raw = await asyncio.wait_for(self.sock.recv_multipart(), left)
            except TimeoutError:
                return False
            if raw == SUBSCRIBED:
                self.subscribed = self.subscribed or topic == self.topic
                continue
            with contextlib.suppress(EventError):
                self._early.append(Event.from_json(raw))
        return True

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def next(self, timeout: float | None = None) -> Event:
        """The next event; raises TimeoutError after ``timeout`` seconds."""
        if self._early:
            return self._early.popleft()
        while True:
            _topic, raw = await asyncio.wait_for(self.sock.recv_multipart(), timeout)
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

    def close(self) -> None:
        self.sock.close(0)


async def events(endpoint: str = DEFAULT_EVENTS, call_id: str | None = None) -> AsyncIterator[Event]:
    """Iterate over the events of one call (``call_id``) or of every call."""
    sub = Subscription(endpoint, call_id)
    try:
        async for event in sub:
            yield event
    finally:
        sub.close()


class CommandError(RuntimeError):
    """The farm refused a command (no such call, bad audio …) or did not answer."""


class Commands:
    """Play audio to calls, cut it, ask what plays: the ingress's command socket.

    Audio is converted by the farm to what the call's module plays (24 kHz mono for
    mod_socket_audio). One request at a time per instance; share it within a task
    group or make one per app.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_COMMANDS,
        *,
        timeout: float = 10.0,
        ctx: zmq.asyncio.Context | None = None,
        keys: Keys | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.keys = keys
        self.timeout = timeout
        self.ctx = ctx or zmq.asyncio.Context.instance()  # one per process, as for Subscription
        self._lock = asyncio.Lock()
        self.sock = self._connect()

    def _connect(self) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.keys is not None:
            client_socket(sock, self.keys)
        sock.connect(self.endpoint)
        return sock

    async def request(self, header: dict[str, Any], payload: bytes = b"") -> dict[str, Any]:
        """Send one request; return the reply, or raise CommandError."""
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
        reply = await self.request({"op": "calls"})
        return list(reply["calls"])

    def close(self) -> None:
        self.sock.close(0)

    async def __aenter__(self) -> Commands:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
