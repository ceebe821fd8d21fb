#!/usr/bin/env python3
"""Example dialer controller: start a farm stream on a FreeSWITCH call, print the farm's events.

esl mode (standard library only): log in to FreeSWITCH's inbound Event Socket, subscribe to
mod_audio_stream's events, start the stream (``uuid_audio_stream``) and print the farm's events as
FreeSWITCH relays them (``mod_audio_stream::json``) until the call hangs up; without --uuid, print
every call's events. zmq mode (needs farm installed): read the farm's own event stream, which also
has what follows the stream's close (the last ``final``, ``call_end``)::

    python3 esl_start_stream.py esl --uuid <channel-uuid> --farm ws://farm.example.net:8080
    python3 esl_start_stream.py zmq --events tcp://farm.example.net:5556 [--uuid <uuid> --start]

ESL defaults to 127.0.0.1:8021, password ClueCon; the stream to ``--rate 16000 --mix mono`` (for
sptmru builds give the codec's rate: 8000 for PCMU/PCMA). To stop: hang up, or
``uuid_audio_stream <uuid> stop``. See --help and README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
from collections.abc import Iterator
from typing import Any


SUBSCRIBE = ("event json CHANNEL_HANGUP_COMPLETE CUSTOM mod_audio_stream::json mod_audio_stream::connect "
             "mod_audio_stream::disconnect mod_audio_stream::error")
_COMMON = ("v", "type", "call_id", "seq", "offset_ms", "channel", "t", "metadata")


class ESL:
    """A blocking inbound Event Socket client (PROTOCOLS.md §3.1-3.3), one message at a time."""

    def __init__(self, host: str, port: int, password: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=5)
        self.sock.settimeout(None)  # events may be minutes apart
        self.rfile = self.sock.makefile("rb")
        self.pending: list[tuple[dict[str, str], bytes]] = []  # events read while awaiting a reply
        headers, _ = self.read()
        if headers.get("Content-Type") != "auth/request":  # e.g. text/rude-rejection (ACL)
            raise ConnectionError(f"expected auth/request, got {headers.get('Content-Type')}")
        reply = self.command(f"auth {password}")
        if not reply.startswith("+OK"):
            raise ConnectionError(f"authentication refused: {reply}")

    def read(self) -> tuple[dict[str, str], bytes]:
        """One message: header lines up to an empty line, then Content-Length bytes of body."""
        headers: dict[str, str] = {}
        while True:
            line = self.rfile.readline()
            if not line:
                raise ConnectionError("FreeSWITCH closed the Event Socket")
            line = line.rstrip(b"\r\n")
            if not line:
                if headers:
                    break
                continue  # blank lines between messages
            name, _, value = line.decode("utf-8", "replace").partition(": ")
            headers[name] = value
        length = int(headers.get("Content-Length", "0"))
        body = self.rfile.read(length)  # bytes, not characters
        if len(body) < length:
            raise ConnectionError("FreeSWITCH closed the Event Socket inside a message")
        return headers, body

    def command(self, line: str) -> str:
        """Send a command; return its Reply-Text or api body. Replies come in command order."""
        self.sock.sendall(line.encode() + b"\n\n")  # a newline ends the command: none inside
        while True:
            headers, body = self.read()
            kind = headers.get("Content-Type")
            if kind == "command/reply":
                return headers.get("Reply-Text", "")
            if kind == "api/response":
                return body.decode("utf-8", "replace").strip()
            if kind == "text/disconnect-notice":
                raise ConnectionError("FreeSWITCH disconnected: " + body.decode(errors="replace").strip())
            self.pending.append((headers, body))  # an event that came first: keep it

    def events(self) -> Iterator[dict[str, Any]]:
        """The subscribed events (text/event-json) as dicts, until FreeSWITCH disconnects."""
        while True:
            headers, body = self.pending.pop(0) if self.pending else self.read()
            kind = headers.get("Content-Type")
            if kind == "text/event-json":
                yield json.loads(body)
            elif kind == "text/disconnect-notice":
                return


def start_command(args: argparse.Namespace) -> str:
    """``api uuid_audio_stream <uuid> start <url> <mix> <rate> <metadata>`` (PROTOCOLS.md §1.2).

    Call id and rate go in the URL, which farm trusts over metadata (late, repeated or garbled in
    some builds). Metadata is the 6th token: spaces are fine, single quotes and backslashes not.
    """
    url = f"{args.farm.rstrip('/')}/{args.uuid}?rate={args.rate}"
    url += "&channels=2" if args.mix == "stereo" else ""
    meta = json.dumps(json.loads(args.metadata), ensure_ascii=False, separators=(",", ":"))
    if "'" in meta or "\\" in meta:  # ensure_ascii=False keeps non-ASCII free of \u escapes
        raise SystemExit(f"metadata {meta} would be altered by FreeSWITCH: no ' or \\ (nor \" inside strings)")
    return f"api uuid_audio_stream {args.uuid} start {url} {args.mix} {args.rate} {meta}"


def describe(event: dict[str, Any]) -> str:
    """One line for one farm event (schema: farm/protocol/events.py)."""
    kind, rest = event.get("type", "?"), {k: v for k, v in event.items() if k not in _COMMON}
    detail = repr(event.get("text", "")) if kind in ("partial", "final") else json.dumps(rest, ensure_ascii=False)
    at = event.get("offset_ms", 0) / 1000
    return f"{str(event.get('call_id', '?'))[:8]} {at:7.2f}s ch{event.get('channel', 0)} {kind:<12} {detail}"


def run_esl(args: argparse.Namespace) -> int:
    esl = ESL(args.esl_host, args.esl_port, args.password)
    print("subscribe:", esl.command(SUBSCRIBE), file=sys.stderr)
    if args.uuid:
        esl.command(f"filter Unique-ID {args.uuid}")  # only this call (its events carry its Unique-ID)
        reply = esl.command(start_command(args))  # +OK before the WebSocket is even open
        print("uuid_audio_stream start:", reply, file=sys.stderr)
        if not reply.startswith("+OK"):
            return 1
    try:
        for event in esl.events():
            uuid, subclass, body = event.get("Unique-ID", "?"), event.get("Event-Subclass", ""), event.get("_body", "")
            if subclass == "mod_audio_stream::json":
                try:
                    print(describe(json.loads(body)), flush=True)  # the farm's event, verbatim
                except ValueError:
                    print(f"{uuid[:8]} server text {body!r}", flush=True)
            elif event.get("Event-Name") == "CHANNEL_HANGUP_COMPLETE":
                print(f"{uuid[:8]} hung up ({event.get('Hangup-Cause')})", flush=True)
                if args.uuid:
                    return 0
            else:  # ::connect, ::disconnect, ::error (terminal: the stream is over)
                print(f"{uuid[:8]} {subclass.rpartition(':')[2]:<12} {body}", flush=True)
    finally:
        esl.sock.close()
    return 0


def run_zmq(args: argparse.Namespace) -> int:
    from farm.client import Subscription  # the zmq mode needs farm (and pyzmq) installed

    def start() -> str:
        esl = ESL(args.esl_host, args.esl_port, args.password)
        try:
            return esl.command(start_command(args))
        finally:
            esl.sock.close()

    async def follow() -> int:
        async with Subscription(args.events, args.uuid or None) as sub:  # before start: ZeroMQ drops the past
            if args.start:
                reply = await asyncio.to_thread(start)
                print("uuid_audio_stream start:", reply, file=sys.stderr)
                if not reply.startswith("+OK"):
                    return 1
            async for event in sub:
                print(describe(event.to_dict()), flush=True)
                if args.uuid and event.type == "call_end":
                    return 0
        return 0

    return asyncio.run(follow())


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--esl-host", default="127.0.0.1", help="FreeSWITCH Event Socket (default %(default)s)")
    common.add_argument("--esl-port", type=int, default=8021, help="(default %(default)s)")
    common.add_argument("--password", default="ClueCon", help="Event Socket password (default %(default)s)")
    common.add_argument("--uuid", default="", help="the channel: start its stream, follow only its events")
    common.add_argument("--farm", default="ws://farm:8080", help="farm base URL; host: letters, digits, - and .")
    common.add_argument("--rate", type=int, default=16000, help="a multiple of 8000 (default %(default)s)")
    common.add_argument("--mix", choices=("mono", "mixed", "stereo"), default="mono")
    common.add_argument("--metadata", default='{"dialer":"esl_start_stream"}', help="JSON sent as metadata")
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("esl", parents=[common], help="start the stream and read the farm's events from ESL")
    z = sub.add_parser("zmq", parents=[common], help="read the farm's events from its ZeroMQ publisher")
    z.add_argument("--events", default="tcp://farm:5556", help="farm event endpoint (default %(default)s)")
    z.add_argument("--start", action="store_true", help="also start the stream through ESL (needs --uuid)")
    args = parser.parse_args(argv)
    if getattr(args, "start", False) and not args.uuid:
        parser.error("--start needs --uuid")
    try:
        return run_esl(args) if args.mode == "esl" else run_zmq(args)
    except OSError as exc:  # refused, timed out, closed, wrong password
        print(f"{args.esl_host}:{args.esl_port}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
