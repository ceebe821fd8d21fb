"""``farm transcribe FILE...``: recorded files through a running farm, the record-mode fallback.

A dialer that cannot stream records the caller's reply with FreeSWITCH and hands the file
to the same farm. Each file becomes one call, streamed like mod_audio_stream with
``{"source": "file"}`` in its metadata (plus the options asked: AMD, intents), which
makes it a *background* call:

- sent as fast as the farm takes it, never faster: the ingress stops reading a file call's
  WebSocket while its ring holds half its capacity unread, and the worker reads a file no
  further ahead of its recognition than a few seconds, so TCP paces the sender and the
  ring never overwrites a byte (an ``overrun`` event would fail the file);
- recognized after every live call's work (workers/scheduler.py), without holding a
  live call's place in admission.

What is printed is what ``farm call`` prints (``--json``: the events as JSON lines),
restricted to the finals (with their words), intents, errors and ``call_end``; with
``--amd`` the ``amd``, ``beep`` and ``tone`` events too.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import uuid
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from farm.client import DEFAULT_EVENTS, Subscription, describe
from farm.protocol.events import Event


__all__ = ["add_parser", "parse_audio", "run", "SHOWN", "AMD_SHOWN"]

CHUNK_MS = 100  # audio per WebSocket message: any size is served; fewer messages, less overhead
SHOWN = frozenset({"final", "intent", "error", "overrun", "call_end"})
AMD_SHOWN = frozenset({"amd", "beep", "tone"})
MIN_RATE, MAX_RATE = 8000, 48000


def parse_audio(data: bytes, rate: int | None = None, channels: int = 1) -> tuple[bytes, int, int]:
    """``(pcm, rate, channels)`` of a 16-bit PCM WAV file, or of raw int16 LE PCM when
    ``rate`` is given and the data is not a WAV file. Raises ValueError saying why not."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        try:
            with wave.open(io.BytesIO(data), "rb") as w:
                width, rate, channels = w.getsampwidth(), w.getframerate(), w.getnchannels()
                pcm = w.readframes(w.getnframes())
        except (wave.Error, EOFError, RuntimeError) as exc:  # RuntimeError: a chunk's size past the end
            raise ValueError(f"not a WAV file farm reads ({exc or type(exc).__name__})") from None
        if width != 2:
            raise ValueError(f"{8 * width}-bit samples: farm takes 16-bit PCM")
    elif rate is None:
        raise ValueError("not a WAV file (for raw 16-bit PCM, say its rate and channels)")
    else:
        pcm = data
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"{rate} Hz: farm takes {MIN_RATE} to {MAX_RATE} Hz")
    if channels not in (1, 2):
        raise ValueError(f"{channels} channels: farm takes mono or stereo (channel 0 = caller)")
    pcm = pcm[: len(pcm) - len(pcm) % (2 * channels)]
    if not pcm:
        raise ValueError("no audio in it")
    return pcm, rate, channels


def metadata(call_id: str, rate: int, channels: int, args: argparse.Namespace) -> dict[str, Any]:
    """The call's metadata: a file, and the options asked for."""
    meta: dict[str, Any] = {"call_id": call_id, "rate": rate, "channels": channels, "source": "file"}
    if args.amd_params:
        meta["amd"] = json.loads(args.amd_params)
    elif args.amd:
        meta["amd"] = True
    if args.intents:
        meta["intents"] = args.intents
    if args.no_tones:
        meta["tones"] = False
    if args.transcribe:
        meta["transcribe"] = args.transcribe
    return meta


class Failed(Exception):
    """A file that could not be transcribed, with the reason to print."""


@dataclass
class _Job:
    path: str
    pcm: bytes
    rate: int
    channels: int


async def _stream(url: str, job: _Job, meta: dict[str, Any]) -> tuple[int | None, str]:
    """Send the file as fast as the farm reads it; the farm's close code and reason."""
    size = job.rate * CHUNK_MS // 1000 * 2 * job.channels
    try:
        # No close timeout: the close frame queues behind the audio the farm has not yet
        # taken (it paces a file by its recognition), and giving up would cut that audio.
        async with connect(url, max_size=None, open_timeout=10, ping_interval=None, close_timeout=None) as ws:

            async def drain() -> None:  # the events also come back on the WebSocket: keep it read
                async for _ in ws:
                    pass

            reader = asyncio.create_task(drain())
            try:
                await ws.send(json.dumps(meta))
                for start in range(0, len(job.pcm), size):
                    await ws.send(job.pcm[start : start + size])
                await ws.close(1000, "Normal closure")
            except ConnectionClosed:
                pass  # the farm closed it: the code says why
            finally:
                reader.cancel()
            return ws.close_code, ws.close_reason or ""
    except InvalidStatus as exc:
        body = exc.response.body.decode(errors="replace").strip() if exc.response.body else ""
        raise Failed(f"the farm refused the call: HTTP {exc.response.status_code} {body}".rstrip()) from None
    except (OSError, TimeoutError, WebSocketException) as exc:
        raise Failed(f"farm not reachable at {url}: {exc or type(exc).__name__}") from None


async def transcribe_one(job: _Job, args: argparse.Namespace, shown: frozenset[str]) -> None:
    """Stream one file as a call and print its events as they come; raises Failed."""

    call_id = f"file-{uuid.uuid4()}"
    url = f"{args.target.rstrip('/')}/{call_id}"
    prefix = f"{job.path}: " if len(args.files) > 1 and not args.json else ""
    print(f"{job.path}: {len(job.pcm) / (2 * job.channels * job.rate):.1f} s as call {call_id}", file=sys.stderr)
    async with Subscription(args.events, call_id) as sub:
        if not sub.subscribed:
            raise Failed(f"no answer from the farm's event stream at {args.events}: is the farm up?")
        sending = asyncio.create_task(_stream(url, job, metadata(call_id, job.rate, job.channels, args)))
        waiting = asyncio.ensure_future(sub.next())
        try:
            while True:
                pending = {waiting} if sending.done() else {waiting, sending}
                # While the file is sent, the farm paces it; after, call_end is due within --timeout.
                timeout = args.timeout if sending.done() else None
                done, _ = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    raise Failed(f"no event for {args.timeout:.0f} s after the file was sent")
                if sending in done:
                    code, reason = sending.result()  # raises Failed
                    if code not in (1000, None):
                        raise Failed(f"the farm closed the stream: {code} {reason}")
                if waiting not in done:
                    continue
                event: Event = waiting.result()
                waiting = asyncio.ensure_future(sub.next())
                if event.type in shown:
                    print(event.to_json().decode() if args.json else prefix + describe(event), flush=True)
                if event.type == "overrun":
                    raise Failed(f"the farm lost {event.get('bytes')} bytes of the file (ring overrun)")
                if event.type == "call_end":
                    if event.get("reason") not in ("hangup", "stop"):
                        raise Failed(f"the call ended with {event.get('reason')}: {event.get('detail')}")
                    return
        finally:
            waiting.cancel()
            sending.cancel()


async def _run(args: argparse.Namespace) -> int:
    jobs: list[_Job] = []
    failed = 0
    for path in args.files:
        try:
            pcm, rate, channels = parse_audio(Path(path).read_bytes(), args.rate, args.channels)
        except (OSError, ValueError) as exc:
            print(f"farm transcribe: {path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        jobs.append(_Job(path, pcm, rate, channels))
    shown = SHOWN | AMD_SHOWN if args.amd or args.amd_params else SHOWN
    gate = asyncio.Semaphore(max(1, args.parallel))

    async def one(job: _Job) -> bool:
        async with gate:
            try:
                await transcribe_one(job, args, shown)
            except Failed as exc:
                print(f"farm transcribe: {job.path}: {exc}", file=sys.stderr)
                return False
            return True

    results = await asyncio.gather(*(one(job) for job in jobs))
    failed += results.count(False)
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    if args.amd_params:
        try:
            if not isinstance(json.loads(args.amd_params), dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            print(f"farm transcribe: --amd-params: {exc}", file=sys.stderr)
            return 2
    return asyncio.run(_run(args))


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    t = sub.add_parser(
        "transcribe",
        help="transcribe recorded files with a running farm (faster than real time, after live calls)",
        description="Stream each file to a running farm as a background call (source: file) and print its "
        "finals; files are paced by the farm (no audio lost) and recognized after live calls' work.",
    )
    t.add_argument("files", nargs="+", metavar="FILE", help="16-bit PCM WAV (8-48 kHz, mono or stereo), or raw PCM")
    t.add_argument(
        "--target", "--url", dest="target", default="ws://127.0.0.1:8080", help="farm WebSocket (default %(default)s)"
    )
    t.add_argument("--events", default=DEFAULT_EVENTS, help="farm event endpoint (default %(default)s)")
    t.add_argument("--rate", type=int, default=None, help="raw PCM: its sample rate (WAV files say their own)")
    t.add_argument("--channels", type=int, default=1, help="raw PCM: its channel count (default %(default)s)")
    t.add_argument("--amd", action="store_true", help="answering-machine detection: print amd, beep, tone events")
    t.add_argument("--amd-params", default="", help="AMD settings for these calls as JSON (implies --amd)")
    t.add_argument("--intents", default="", help="the farm's intent set to match (a name of its --intents DIR)")
    t.add_argument("--no-tones", action="store_true", help="no beep and tone detection")
    t.add_argument("--transcribe", choices=("caller", "both"), default=None, help="stereo: which channels")
    t.add_argument("--parallel", type=int, default=2, help="files in flight at once (default %(default)s)")
    t.add_argument("--json", action="store_true", help="print events as JSON lines, as farm call --json does")
    t.add_argument("--timeout", type=float, default=60.0, help="wait this long for call_end once a file is sent, s")
