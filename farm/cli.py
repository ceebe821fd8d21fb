"""The ``farm`` command: ``up`` runs a node, ``call`` streams a WAV file into it the way
mod_audio_stream would and prints what the farm says, ``transcribe`` runs recorded files
through it (farm/transcribe.py), ``events`` prints the event stream, ``play`` / ``flush`` /
``calls`` drive playback on live calls, ``graph`` compiles a model's decoding graph
(farm/graph.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from typing import Any

from farm.knobs import add_arguments, from_args


__all__ = ["main"]


def _up_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "up",
        help="run a farm node: broker, ingress and N workers",
        description="Run a farm node. Every knob is a flag and a FARM_* environment variable (README: 'All knobs').",
    )
    add_arguments(p)


def cmd_up(args: argparse.Namespace, argv: list[str]) -> int:
    from farm.ingress.canary import canary_utterance
    from farm.intents import IntentLibrary
    from farm.logs import setup_logging
    from farm.native import node_environ
    from farm.supervisor import run
    from farm.tls import server_context
    from workers.analysis import node_amd_config
    from workers.call import vad_config_for

    config = from_args(args)
    try:
        config.check()
        vad_config_for(config)
        node_amd_config(config)
        IntentLibrary(config.intents)
        server_context(config.tls_cert, config.tls_key)
        canary_utterance(config)
        env = node_environ(config.blas_core, config.malloc, os.environ)
    except (OSError, ValueError) as exc:
        # Refused here, not by every worker on every call.
        print(f"farm up: {exc}", file=sys.stderr)
        return 2
    if env is not None:
        # OpenBLAS's kernels and a preloaded malloc are chosen when a process starts: start
        # again with them (the same pid, so a service manager sees one process).
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "farm.cli", *argv], env)
    setup_logging(args.log_level, "supervisor")
    return run(config)


async def _call(args: argparse.Namespace) -> int:
    from farm.client import Subscription, describe
    from farm.sender import metadata_for, read_wav, send_pcm

    pcm, rate, channels = read_wav(args.file)
    call_id = args.call_id or str(uuid.uuid4())
    url = f"{args.url.rstrip('/')}/{call_id}"
    meta = metadata_for(call_id, rate, channels, json.loads(args.metadata) if args.metadata else None)
    print(
        f"streaming {args.file} ({rate} Hz, {channels} ch, {len(pcm) / (2 * channels * rate):.1f} s) to {url}",
        file=sys.stderr,
    )
    async with Subscription(args.events, call_id) as sub:
        sending = asyncio.create_task(
            send_pcm(
                url, pcm, rate=rate, channels=channels, chunk_ms=args.chunk_ms, realtime=not args.fast, metadata=meta
            )
        )
        while True:
            try:
                event = await sub.next(timeout=args.timeout)
            except TimeoutError:
                print(f"no event for {args.timeout:.0f} s: is the farm up at {args.events}?", file=sys.stderr)
                return 1
            print(event.to_json().decode() if args.json else describe(event), flush=True)
            if event.type == "call_end":
                break
        result = await sending
    if result.close_code not in (1000, None):
        print(f"the farm closed the stream: {result.close_code} {result.close_reason}", file=sys.stderr)
        return 1
    return 0


async def _events(args: argparse.Namespace) -> int:
    from farm.client import Subscription, describe

    async with Subscription(args.events.split(","), args.call_id, keys=_client_keys(args)) as sub:
        async for event in sub:
            print(event.to_json().decode() if args.json else f"{event.call_id[:12]:<12} {describe(event)}", flush=True)
    return 0


async def _control(args: argparse.Namespace) -> int:
    from farm.client import CommandError, Commands

    commands = Commands(args.commands, keys=_client_keys(args))
    try:
        if args.command == "play":
            reply = await commands.play_wav(args.call_id, args.file)
        elif args.command == "flush":
            reply = await commands.flush(args.call_id)
        elif args.command == "stats":
            reply = await commands.stats(args.call_id)
        elif args.command == "amd":
            reply = await commands.amd(args.call_id)
        else:
            reply = {"calls": await commands.calls()}
    except CommandError as exc:
        print(f"farm {args.command}: {exc}", file=sys.stderr)
        return 1
    finally:
        commands.close()
    print(json.dumps(reply, ensure_ascii=False))
    return 0


def _client_keys(args: argparse.Namespace) -> Any:
    """``--keys DIR NAME``: the client keypair ``farm keys DIR NAME`` made, for a node with --curve-dir."""
    from farm.curve import client_keys

    return client_keys(*args.keys) if args.keys else None


def _keys(args: argparse.Namespace) -> int:
    from farm.curve import make_keys

    for path in make_keys(args.dir, args.names):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        # The bench package has its own parser (and optional matplotlib): hand it the rest.
        from bench.cli import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="farm", description="real-time speech farm for FreeSWITCH")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="load the farm with emulated calls: latency per stage, capacity (farm bench -h)")
    try:
        _up_parser(sub)
    except ValueError as exc:  # a FARM_* variable that is not of its knob's type
        print(f"farm: {exc}", file=sys.stderr)
        return 2
    c = sub.add_parser("call", help="stream a WAV file into the farm like mod_audio_stream and print the events")
    c.add_argument("file")
    c.add_argument("--url", default="ws://127.0.0.1:8080", help="farm WebSocket base URL (default %(default)s)")
    c.add_argument("--events", default="tcp://127.0.0.1:5556", help="farm event endpoint (default %(default)s)")
    c.add_argument("--call-id", default="")
    c.add_argument("--metadata", default="", help="extra JSON members for the metadata frame")
    c.add_argument("--chunk-ms", type=int, default=20)
    c.add_argument("--fast", action="store_true", help="send as fast as possible instead of real time")
    c.add_argument("--json", action="store_true", help="print events as JSON lines")
    c.add_argument("--timeout", type=float, default=30.0)
    from farm.transcribe import add_parser as add_transcribe_parser

    add_transcribe_parser(sub)
    from farm.graph import add_parser as add_graph_parser

    add_graph_parser(sub)
    e = sub.add_parser("events", help="print the farm's events (all calls, or one)")
    e.add_argument("--events", default="tcp://127.0.0.1:5556", help="event endpoint, or several nodes' comma-separated")
    e.add_argument("--call-id", default=None)
    e.add_argument("--json", action="store_true")
    k = sub.add_parser("keys", help="make CURVE keys for --curve-dir: the node's, and one pair per client NAME")
    k.add_argument("dir")
    k.add_argument("names", nargs="*", metavar="NAME")
    keys_help = "client keypair made by 'farm keys DIR NAME' (a node with --curve-dir)"
    e.add_argument("--keys", nargs=2, metavar=("DIR", "NAME"), help=keys_help)
    for name, what in (
        ("play", "play a WAV file to a live call (cut by barge-in)"),
        ("flush", "cut what a call is playing"),
        ("stats", "a live call's conversation figures so far"),
        ("amd", "a call was answered now: detect an answering machine from here"),
        ("calls", "list live calls and whether they play"),
    ):
        q = sub.add_parser(name, help=what)
        if name != "calls":
            q.add_argument("call_id")
        if name == "play":
            q.add_argument("file")
        q.add_argument("--commands", default="tcp://127.0.0.1:5557", help="farm command endpoint (default %(default)s)")
        q.add_argument("--keys", nargs=2, metavar=("DIR", "NAME"), help=keys_help)
    args = parser.parse_args(argv)
    if args.command == "up":
        return cmd_up(args, argv)
    try:
        if args.command == "transcribe":
            from farm.transcribe import run as transcribe

            return transcribe(args)
        if args.command == "graph":
            from farm.config import default_model_dir
            from farm.graph import run as compile_graph

            args.model = args.model or default_model_dir()
            return compile_graph(args)
        if args.command == "keys":
            return _keys(args)
        if args.command in ("play", "flush", "stats", "amd", "calls"):
            return asyncio.run(_control(args))
        return asyncio.run(_call(args) if args.command == "call" else _events(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
