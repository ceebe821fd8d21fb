"""What the three call sites share (mod_audio_stream, vosk-server, the Event Socket).

Each serves calls on a listener: audio comes in and goes into the call's ring
(:meth:`CallSite.received`), a new call is refused while the node cannot take it
(:meth:`CallSite.refusal`), and on SIGTERM the site drains (:meth:`CallSite.drain`):
it stops taking calls, lets each caller finish the utterance in flight, then ends the
call as its protocol says (:meth:`Served.end_for_drain`). What differs per site stays
in its module: the handshake, the messages, how a refusal is said on the wire.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, Protocol, TypeVar

from farm.config import Config
from farm.ingress.calls import Call, CallRegistry
from farm.ingress.metrics import Metrics


__all__ = ["CallSite", "Served", "start_optional"]

log = logging.getLogger("farm.ingress")

DRAIN_POLL_S = 0.05


class Listener(Protocol):
    """A websockets ``Server`` or an ``asyncio.Server``: what a site needs of either."""

    @property
    def sockets(self) -> Iterable[socket.socket]: ...

    def close(self) -> None: ...


class Served(Protocol):
    """A connection a site serves, as the drain sees it."""

    call: Call | None

    async def end_for_drain(self) -> None:
        """End the call because farm stops: ``call_end``'s reason is ``drain``."""


S = TypeVar("S", bound=Served)


class CallSite(Generic[S]):
    # The mod_audio_stream and vosk ports keep listening while they drain (new upgrades get
    # 503, /readyz says draining, so a balancer moves calls elsewhere); the Event Socket
    # stops at once, so FreeSWITCH tries the dialplan's next socket target.
    listen_while_draining = True

    def __init__(self, config: Config, registry: CallRegistry, metrics: Metrics) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.live: set[S] = set()
        self.server: Listener | None = None
        self.draining = False

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(list(self.server.sockets)[0].getsockname()[1])

    def refusal(self) -> str:
        """Why a new call is refused now (``""``: it is taken); counted by reason."""
        if self.draining:
            return "farm is draining"
        if len(self.live) >= self.config.max_connections:
            self.metrics.reject("too many calls")
            return "farm is at its call limit"
        why = self.registry.admission()
        return f"farm cannot take the call: {why}" if why else ""

    def received(self, call: Call, pcm: bytes, size: int, recv_ns: int) -> None:
        """``size`` bytes came from the peer in one read or message; ``pcm``, the whole
        samples among them (a site carries an odd byte to the next), go into the ring."""
        if pcm:
            call.write(pcm, recv_ns)
        self.metrics.audio_bytes += size
        self.metrics.frames += 1

    async def drain(self, timeout: float) -> None:
        """Stop taking calls; let utterances in flight finish (until ``timeout``), end the rest."""
        self.draining = True
        if not self.listen_while_draining and self.server is not None:
            self.server.close()
        deadline = time.monotonic() + timeout
        while self.live:
            for conn in list(self.live):
                # A caller in mid-utterance keeps the call until the VAD ends it.
                if time.monotonic() >= deadline or conn.call is None or not conn.call.ring.in_speech:
                    self.live.discard(conn)
                    await conn.end_for_drain()
            await asyncio.sleep(DRAIN_POLL_S)
        if self.server is not None:
            self.server.close()


async def start_optional(start: Callable[[], Awaitable[object]], door: str, where: str) -> bool:
    """Start an extra door (the vosk port, POST /transcribe): a port in use is logged, not
    fatal, so a node whose mod_audio_stream port works starts even when another process (a
    real vosk-server, a second node) holds that one."""
    try:
        await start()
    except OSError as exc:
        log.error("%s off: cannot listen on %s: %s", door, where, exc.strerror)
        return False
    return True
