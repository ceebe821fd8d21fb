"""The command socket: dialer apps ask the ingress to play, flush, or report playback.

A ZeroMQ ROUTER (``--commands``, default tcp://127.0.0.1:5557); :class:`farm.client.Commands`
wraps it. A request is ``[b"", header-json, *payload]`` from a DEALER (or REQ);
the reply is ``[b"", reply-json]``. Requests (``op``):

* ``play``: ``call_id``, and either ``format: "wav"`` with a WAV file as payload, or
  ``rate`` (and ``channels``) with raw int16 LE PCM as payload; optional ``id``. The
  audio is converted to 24 kHz mono off the loop and queued behind what plays.
  Reply ``{"ok": true, "id", "duration_ms", "starts_in_ms"}``. Refused, with the
  limit in the error, past ``--playback-max-queued-s`` of queued audio or MAX_QUEUED_CLIPS clips.
* ``flush``: ``call_id``. Cuts what plays; ``{"ok": true, "flushed": bool, ...}``.
* ``state``: ``call_id``. ``{"ok": true, "playing", "id", "queued", "queued_ms", ...}``.
* ``finalize``: ``call_id``. An explicit end of utterance (a dialer with its own
  endpointer): the utterance in progress ends where the audio received so far ends and
  its ``final`` (reason ``reset``; an empty one if none was in progress) follows at once
  on the event stream. ``{"ok": true, "at_ms": offset}``. Any protocol.
* ``calls``: every live call with its protocol and whether it plays.

Failures answer ``{"ok": false, "error": "..."}``; the socket never dies of a bad request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import zmq
import zmq.asyncio

from farm.config import Config
from farm.curve import node_keys, server_socket
from farm.ingress.calls import CallRegistry
from farm.ingress.playback import Clip, PlaybackError, to_pcm24k, wav_duration_ms, wav_to_pcm24k


__all__ = ["CommandServer"]

log = logging.getLogger("farm.ingress.commands")

MAX_REQUEST_BYTES = 64 * 1024 * 1024
CALL_WAIT_S = 2.0


class CommandServer:
    def __init__(self, config: Config, registry: CallRegistry) -> None:
        self.registry = registry
        self.sock = registry.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        if config.curve_dir:  # only admitted keys may command (farm/curve.py)
            server_socket(self.sock, node_keys(config.curve_dir))
        self.sock.bind(config.commands)
        self.endpoint = config.commands
        self._tasks: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._serve(), name="commands")

    async def _serve(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            # Each request on its own task: a long conversion must not hold up a flush.
            task = asyncio.create_task(self._answer(frames))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, frames: list[bytes]) -> None:
        envelope, rest = _split_envelope(frames)
        try:
            reply = await self.handle(rest)
        except PlaybackError as exc:
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug must answer the client, not kill the socket
            log.exception("command failed")
            reply = {"ok": False, "error": f"internal error: {exc}"}
        await self.sock.send_multipart([*envelope, json.dumps(reply).encode()])

    async def handle(self, frames: list[bytes]) -> dict[str, Any]:
        if not frames:
            raise PlaybackError("empty request")
        try:
            header = json.loads(frames[0])
        except ValueError as exc:
            raise PlaybackError(f"request header is not JSON: {exc}") from None
        if not isinstance(header, dict):
            raise PlaybackError("request header is not a JSON object")
        op = header.get("op")
        if op == "calls":
            return {"ok": True, "calls": self._calls()}
        call_id = str(header.get("call_id", ""))
        call = self.registry.calls.get(call_id)
        # An app may ask as soon as FreeSWITCH reports the stream started, a moment
        # before the call is ours: give it that moment.
        deadline = time.monotonic() + CALL_WAIT_S
        while call is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            call = self.registry.calls.get(call_id)
        if call is None or call.closed_at or call.canary:
            raise PlaybackError(f"no live call {call_id!r}")
        if op == "finalize":
            return {"ok": True, "at_ms": call.offset_ms(call.ring.request_finalize())}
        if op == "amd":
            # "Answered now": the worker runs AMD from here (once per call; node settings).
            return {"ok": True, "at_ms": call.offset_ms(call.ring.request_amd())}
        if op == "stats":
            at_ms = call.offset_ms(call.ring.write_cursor)
            return {"ok": True, "at_ms": at_ms, "stats": call.stats.summary(at_ms)}
        if call.player is None:
            raise PlaybackError(f"call {call_id} ({call.protocol}) cannot play audio")
        if op == "play":
            payload = b"".join(frames[1:])
            if header.get("format") == "wav":
                # Refused before the conversion if it cannot be queued: no work, no memory for it.
                call.player.admit(wav_duration_ms(payload))
                pcm = await asyncio.to_thread(wav_to_pcm24k, payload)
            else:
                try:
                    rate, channels = int(header["rate"]), int(header.get("channels", 1))
                except (KeyError, TypeError, ValueError):
                    raise PlaybackError("play needs 'rate' (and 'channels') for raw PCM, or format 'wav'") from None
                if rate > 0 and channels > 0:
                    call.player.admit(len(payload) // (2 * channels) * 1000 // rate)
                pcm = await asyncio.to_thread(to_pcm24k, payload, rate, channels)
            if not pcm:
                raise PlaybackError("no audio to play")
            return {"ok": True, **call.player.play(Clip(pcm, str(header.get("id") or "")))}
        if op == "flush":
            return {"ok": True, **call.player.flush()}
        if op == "state":
            return {"ok": True, **call.player.state()}
        raise PlaybackError(f"unknown op {op!r}: expected play, flush, state, finalize, stats, amd or calls")

    def _calls(self) -> list[dict[str, Any]]:
        return [
            {
                "call_id": c.call_id,
                "protocol": c.protocol,
                "playing": c.player.state()["playing"] if c.player else False,
            }
            for c in self.registry.served
            if not c.closed_at
        ]

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for task in self._tasks:
            task.cancel()
        self.sock.close(0)


def _split_envelope(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """ROUTER frames -> (routing envelope up to the empty delimiter, request frames)."""
    for i, frame in enumerate(frames):
        if not frame:
            return frames[: i + 1], frames[i + 1 :]
    return frames[:1] + [b""], frames[1:]
