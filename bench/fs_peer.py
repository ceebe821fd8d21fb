"""A peer that stands in for FreeSWITCH in tests: Event Socket + mod_socket_audio, byte for byte.

This is **not FreeSWITCH**. It is a test double that writes the bytes FreeSWITCH 1.10.12
writes and answers the way it answers, following PROTOCOLS.md §2 (mod_socket_audio), §3
(Event Socket) and §7 (what a live FreeSWITCH did), with mes.c, switch_event.c and
mod_socket_audio.c (10d9959) read for the details the document leaves open.

:class:`SocketAudioCall` is one channel that ran ``socket <host>:<port> async full`` against
farm's outbound Event Socket server (§3.6, TV-ESL-7): it runs ``sendmsg`` applications
(``socket_audio``, ``answer``, ``hangup`` …) from a park loop and hangs up as FreeSWITCH does.
It is made of one part per concern, each in its own module:

* bench/fs_peer_channel.py: the channel's state and event data (:class:`Channel`);
* bench/fs_peer_outbound.py: its Event Socket connection (``connect``, ``getvar``, ``myevents``),
  on bench/fs_peer_esl.py's listener (commands, ``api``/``bgapi``, event delivery), with
  bench/fs_peer_subscription.py (which events a connection hears) and bench/fs_peer_wire.py
  (the bytes: command parsing, replies, event serialization);
* bench/fs_peer_socket_audio.py: mod_socket_audio's start/stop/flush and the paced 16 kHz mic
  stream out; bench/fs_peer_playback.py: the 24 kHz reply in, queued and played at real time
  with ``playback_start``/``playback_stop``, flush and its discard window.

bench/fs_peer_inbound.py is FreeSWITCH's inbound Event Socket (port 8021 style, §3.3,
TV-ESL-1) on an ephemeral port; calls attached to it are reachable by uuid there: a
controller hangs them up (``uuid_kill``), transfers them (``uuid_transfer``), plays files to
them (``uuid_broadcast``, cut by ``uuid_break``) and starts mod_audio_stream on them
(``uuid_audio_stream``, bench/fs_peer_audio_stream.py). A channel the dialplan answered and
parked (:meth:`SocketAudioCall.park`, no ``socket`` application) is driven that way only.

Everything observable is recorded with ``time.monotonic_ns()`` so tests can assert on
timing (commands received, mic bytes sent, playback received and played, events fired).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid as uuidlib
import wave
from collections.abc import Iterable, Mapping
from pathlib import Path

from bench.fs_peer_audio_stream import RAW_EXT, AudioStreamBug
from bench.fs_peer_channel import Channel
from bench.fs_peer_inbound import InboundEslServer
from bench.fs_peer_outbound import OutboundListener
from bench.fs_peer_socket_audio import SocketAudio
from bench.fs_peer_wire import Command, FiredEvent, linger_notice


__all__ = ["SocketAudioCall"]

log = logging.getLogger("bench.fs_peer")


class SocketAudioCall:
    """One FreeSWITCH channel under outbound Event Socket control, with mod_socket_audio.

    Not FreeSWITCH: a peer standing in for it, following PROTOCOLS.md §2, §3.6 and §7.
    Connect with :meth:`connect`; the peer then answers every command in order (§3.2) and
    runs ``sendmsg`` applications from a park loop (async mode: ``+OK`` first).

    Args:
        uuid: the channel's Unique-ID (default: a random uuid4).
        rate: the session codec rate (8000: PCMU; others: L16); mod_socket_audio's rates
            do not change (16 kHz out, 24 kHz in).
        variables: extra channel variables (``variable_<name>`` headers).
        answered: start answered (else ringing until an ``answer`` application).
        never_connect_audio: ``socket_audio`` answers as usual but never connects.
        idle_silence: send 640 B of zeros every 20 ms when no speech is queued, as a
            real channel sends its (silent) caller audio.
        linger_scale: multiply the ``linger`` time (tests wait less than 5 s).
        read_ahead: bytes of farm's playback held before TCP backpressure (see playback_recv).
        hangup_on_esl_close: the channel hangs up when the client closes or sends ``exit``
            (without ``resume``): the dialplan ends after the ``socket`` application.
        first_command_timeout: how long to wait for ``connect`` (FreeSWITCH: 25 s).
        peers: other calls that ``api`` commands on this connection can reach by uuid.

    Records (all times ``time.monotonic_ns()``), read from the parts that keep them:
        commands: every :class:`~bench.fs_peer_wire.Command` received, in order.
        events: every :class:`~bench.fs_peer_wire.FiredEvent`, delivered or not.
        errors: what the real module would only log (failed connect, bad arguments …).
        mic_sent, mic_due, speech_sent, mic_dropped: the mic stream
            (:class:`~bench.fs_peer_socket_audio.MicStream`).
        playback_recv, module_recv, played, discarded, flushes, violations: the reply's
            reception and playback (:class:`~bench.fs_peer_playback.Playback`).
    """

    def __init__(
        self,
        uuid: str | None = None,
        *,
        rate: int = 8000,
        variables: Mapping[str, str] | None = None,
        answered: bool = False,
        never_connect_audio: bool = False,
        idle_silence: bool = True,
        linger_scale: float = 1.0,
        audio_connect_timeout: float = 5.0,
        rcvbuf: int | None = None,
        read_ahead: int = 256 * 1024,
        hangup_on_esl_close: bool = True,
        first_command_timeout: float = 25.0,
        peers: Mapping[str, SocketAudioCall] | None = None,
    ) -> None:
        self.uuid = uuid or str(uuidlib.uuid4())
        self.linger_scale = linger_scale
        self.hangup_on_esl_close = hangup_on_esl_close
        self.channel = Channel(self.uuid, rate=rate, variables=variables, answered=answered)
        self.esl = OutboundListener(
            self, self.channel, peers=peers if peers is not None else {}, first_command_timeout=first_command_timeout
        )
        self.audio = SocketAudio(
            self.channel,
            self.esl.errors,
            self.fire_channel,
            never_connect=never_connect_audio,
            idle_silence=idle_silence,
            connect_timeout=audio_connect_timeout,
            rcvbuf=rcvbuf,
            read_ahead=read_ahead,
        )
        self.audio_stream = AudioStreamBug(self.channel, self.fire_channel, self.esl.errors)
        self._apps: asyncio.Queue[Command] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._hangup_task: asyncio.Task[None] | None = None
        self.linger_ran_out = False
        # What controllers did to the channel (uuid_broadcast's files as the playback
        # application ran them, uuid_transfer's destinations), with time.monotonic_ns().
        self.playbacks: list[tuple[int, str, str]] = []  # (t_ns, file, "FILE PLAYED" | "break" | ...)
        self.transfers: list[tuple[int, str, str, str]] = []  # (t_ns, extension, dialplan, context)
        self._break = asyncio.Event()

    # -- the Event Socket -------------------------------------------------------------

    async def connect(self, host: str, port: int, timeout: float = 10.0) -> SocketAudioCall:
        """Connect as ``socket host:port async full`` does; send nothing; answer ``connect``.

        Returns once the first command was answered (or, if it was not ``connect``,
        swallowed without a reply as mes.c does); the session keeps serving commands.
        """
        await self.esl.connect(host, port, timeout)
        self._tasks.append(asyncio.create_task(self.esl.serve()))
        self._tasks.append(asyncio.create_task(self._park_loop()))
        return self

    def park(self) -> SocketAudioCall:
        """The dialplan answered the channel and parked it, with no ``socket`` application: a
        controller on the inbound Event Socket drives it (``sendmsg <uuid>``, ``uuid_*`` APIs)."""
        if self.channel.answer():
            self.fire_channel("CHANNEL_ANSWER")
        self.channel.set_variable("current_application", "park")
        self._tasks.append(asyncio.create_task(self._park_loop()))
        return self

    async def send_raw(self, data: bytes) -> None:
        """Write arbitrary bytes on the Event Socket (misbehaviour for bad-input tests)."""
        await self.esl.send_raw(data)

    def fire_channel(
        self,
        name: str,
        extra: Iterable[tuple[str, str]] = (),
        *,
        subclass: str | None = None,
        calling: str | None = None,
        pre: Iterable[tuple[str, str]] = (),
        body: str | None = None,
    ) -> FiredEvent:
        """Fire an event with this channel's data, where subscribed (events are switch-wide)."""
        return self.esl.fire(
            name, extra, channel=self.channel.data(), subclass=subclass, calling=calling, pre=pre, body=body
        )

    def client_gone(self) -> None:
        """The Event Socket client is gone: the listener ends -> CF_CONTROLLED cleared -> park
        returns -> the dialplan ends -> hang-up (unless ``resume``)."""
        if self.hangup_on_esl_close and not self.hung_up and not self.esl.resume:
            self._hangup_task = asyncio.create_task(self._hangup("NORMAL_CLEARING"))

    # -- the park loop (async mode, §3.6) ---------------------------------------------

    def queue_message(self, cmd: Command) -> None:
        """switch_core_session_queue_private_event: the park loop runs it (async mode)."""
        self._apps.put_nowait(cmd)

    async def _park_loop(self) -> None:
        while not self.hung_up:
            msg = await self._apps.get()
            try:
                await self._run_message(msg)
            except Exception as exc:  # a peer bug must show up in the test, not kill the call silently
                self.errors.append(f"park loop: {exc!r}")
                log.exception("fs_peer park loop")

    async def _run_message(self, msg: Command) -> None:
        """switch_ivr_parse_event: execute / hangup call commands (§3.6)."""
        call_command = (msg.header("call-command") or "").lower()
        if call_command == "hangup":
            await self._hangup(msg.header("hangup-cause") or "NORMAL_CLEARING")
            return
        if call_command != "execute":
            return
        app = msg.header("execute-app-name") or ""
        arg = msg.header("execute-app-arg")
        if arg is None and msg.body is not None:
            arg = msg.body
        arg = arg or ""
        loops = int(msg.header("loops") or "1")
        for _ in range(max(loops, 1)):
            if self.hung_up:
                return
            await self._execute(app, arg, msg.header("Event-UUID"))

    async def _execute(self, app: str, arg: str, app_uuid: str | None) -> None:
        """switch_core_session_exec: CHANNEL_EXECUTE, the application, CHANNEL_EXECUTE_COMPLETE."""
        tail = [("Application-UUID", app_uuid)] if app_uuid else []
        self.channel.set_variable("current_application_data", arg)
        self.channel.set_variable("current_application", app)
        self.fire_channel("CHANNEL_EXECUTE", [("Application", app), ("Application-Data", arg), *tail])
        if app == "socket_audio":
            tasks = await self.audio.start(arg)
            self._tasks += tasks
        elif app == "answer":
            if self.channel.answer():
                self.fire_channel("CHANNEL_ANSWER")
        elif app == "hangup":
            await self._hangup(arg or "NORMAL_CLEARING", after=(app, arg, tail))
            return
        elif app == "sleep":
            await asyncio.sleep(int(arg or "0") / 1000)
        response = await self._playback(arg) if app == "playback" else "_none_"
        done = [("Application", app), ("Application-Data", arg), ("Application-Response", response), *tail]
        self.fire_channel("CHANNEL_EXECUTE_COMPLETE", done)

    async def _playback(self, path: str) -> str:
        """mod_dptools' playback: PLAYBACK_START, the file at real time (``uuid_break`` cuts it),
        PLAYBACK_STOP with ``Playback-Status`` done or break; the application's response."""
        duration = _duration_s(Path(path))
        if duration is None:
            self.playbacks.append((time.monotonic_ns(), path, "FILE NOT FOUND"))
            return "FILE NOT FOUND"  # no PLAYBACK_* events: the file never opened
        self._break.clear()
        self.fire_channel("PLAYBACK_START", [("Playback-File-Path", path)])
        try:
            await asyncio.wait_for(self._break.wait(), duration)
            status = "break"
        except TimeoutError:
            status = "done"
        self.playbacks.append((time.monotonic_ns(), path, status))
        self.fire_channel("PLAYBACK_STOP", [("Playback-File-Path", path), ("Playback-Status", status)])
        return "FILE PLAYED"  # a break is FILE PLAYED too (mod_dptools playback_function)

    # -- what the inbound Event Socket's APIs do to the channel (mod_commands) ------------

    def kill(self, cause: str) -> None:
        """uuid_kill: switch_channel_hangup with the cause, from the API's thread."""
        if not self.hung_up:
            self._hangup_task = asyncio.create_task(self._hangup(cause or "NORMAL_CLEARING"))

    def transfer(self, extension: str, dialplan: str, context: str) -> None:
        """uuid_transfer: switch_ivr_session_transfer marks the transfer and routes the channel
        again, which ends the application running (``socket`` or ``park``). Where the dialplan
        then takes it (an agent queue) is not modelled: the channel stays up until hung up."""
        dialplan, context = dialplan or "XML", context or "default"
        self.transfers.append((time.monotonic_ns(), extension, dialplan, context))
        source = f"{int(time.time())}:{self.uuid}:bl_xfer:{extension}/{context}/{dialplan}"
        self.channel.set_variable("transfer_history", source)
        self.channel.set_variable("transfer_source", source)
        app = self.channel.variables.get("current_application", "")
        arg = self.channel.variables.get("current_application_data", "")
        done = [("Application", app), ("Application-Data", arg), ("Application-Response", "_none_")]
        self.fire_channel("CHANNEL_EXECUTE_COMPLETE", done)

    def break_media(self) -> None:
        """uuid_break: the file playing stops."""
        self._break.set()

    def audio_stream_api(self, arg: str) -> str:
        """uuid_audio_stream on this channel (bench/fs_peer_audio_stream.py)."""
        return self.audio_stream.api(arg)

    async def say(self, pcm16k: bytes, timeout: float = 10.0) -> None:
        """The caller speaks (16 kHz int16 mono), into whichever module streams the channel."""
        waits = [asyncio.ensure_future(e.wait()) for e in (self.audio_stream.connected, self.audio.connected)]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self.audio_stream.connected.is_set():
            await self.audio_stream.speak(pcm16k, timeout)
        else:
            await self.stream(pcm16k, timeout=timeout)

    # -- mod_socket_audio (§2) ----------------------------------------------------------

    async def stream(self, pcm16k: bytes, odd_splits: bool = False, timeout: float = 10.0) -> list[tuple[int, int]]:
        """Send the caller's speech (16 kHz int16 LE mono) on the next mic frames.

        Waits for the audio socket first; returns the ``(t_ns, nbytes)`` of the writes that
        carried this speech. With ``odd_splits`` some frames go out as 641 + 639 bytes, as a
        TCP split could deliver them.
        """
        return await self.audio.stream(pcm16k, odd_splits, timeout)

    def request_flush(self) -> None:
        """uuid_socket_audio_flush: only sets the flag (§2.5)."""
        self.audio.request_flush()

    def stop_audio_now(self) -> None:
        """Media bug removed (uuid_socket_audio_stop, hang-up): shutdown(RDWR) + close, no event."""
        self.audio.stop_now()

    async def stop_audio(self) -> None:
        """As ``uuid_socket_audio_stop`` run by someone else: immediate EOF at the sidecar, no events."""
        self.stop_audio_now()
        await asyncio.sleep(0)

    # -- hang-up (§3.6, §2.6) -----------------------------------------------------------

    async def hangup(self, cause: str = "NORMAL_CLEARING") -> None:
        """Hang the channel up as FreeSWITCH does, and return when the Event Socket is closed.

        CHANNEL_HANGUP, the ``socket`` application's EXECUTE_COMPLETE, audio socket
        shutdown+close; with ``linger``: the linger notice, CHANNEL_HANGUP_COMPLETE, then the
        final notice after the linger time (scaled by ``linger_scale``) or when the client
        sends ``exit``/closes; without: the final notice and close at once.
        """
        await self._hangup(cause)
        await self.closed.wait()

    async def _hangup(self, cause: str, after: tuple[str, str, list[tuple[str, str]]] | None = None) -> None:
        if self.hung_up:
            return
        self.channel.hang_up(cause)
        self.fire_channel("CHANNEL_HANGUP")
        self.channel.set_variable("hangup_cause", cause)
        if after is not None:
            app, arg, tail = after
            done = [("Application", app), ("Application-Data", arg), ("Application-Response", "_none_"), *tail]
            self.fire_channel("CHANNEL_EXECUTE_COMPLETE", done)
        socket_arg = self.esl.socket_arg
        if socket_arg:
            self.channel.set_variable("current_application_data", socket_arg)
            self.channel.set_variable("current_application", "socket")
            done = [("Application", "socket"), ("Application-Data", socket_arg), ("Application-Response", "_none_")]
            self.fire_channel("CHANNEL_EXECUTE_COMPLETE", done)
        self.channel.state = "CS_HANGUP"
        self.stop_audio_now()  # media bug CLOSE: shutdown + close, no event
        if self.audio_stream.active:
            self.audio_stream.stop()  # Close 1000, no event (§7)
        self._break.set()  # a file playing stops with the channel
        self.channel.state = "CS_REPORTING"
        linger = self.esl.linger
        if linger is not None and not self.closed.is_set():
            self.esl.send(linger_notice(self.uuid, self.channel.name, linger))
            self.fire_channel("CHANNEL_HANGUP_COMPLETE", pre=[("Hangup-Cause", cause)])
            wait = None if linger == -1 else linger * self.linger_scale
            try:
                await asyncio.wait_for(self.closed.wait(), wait)
            except TimeoutError:
                self.linger_ran_out = True  # the client held the channel for the whole linger
            self.esl.close_esl()
        else:
            # Without linger the listener closes as soon as it sees the channel down;
            # HANGUP_COMPLETE comes later and is lost for this connection (§3.6).
            self.esl.close_esl()
            self.fire_channel("CHANNEL_HANGUP_COMPLETE", pre=[("Hangup-Cause", cause)])
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    def abort(self) -> None:
        """Reset both sockets at once (SO_LINGER 0 + close): a crashed or killed FreeSWITCH."""
        for task in self._tasks:
            task.cancel()
        self.audio.reset()
        self.esl.reset()
        self.channel.hung_up = True
        self.closed.set()

    async def aclose(self) -> None:
        """Tear everything down without protocol (test cleanup); idempotent."""
        self.abort()
        await self.audio_stream.aclose()
        tasks = [t for t in self._tasks + [self._hangup_task] if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- what the parts know and record -------------------------------------------------

    @property
    def hung_up(self) -> bool:
        return self.channel.hung_up

    @property
    def hangup_cause(self) -> str | None:
        return self.channel.hangup_cause

    @property
    def idle_silence(self) -> bool:
        """Whether the mic sends zeros when no speech is queued (False: it goes quiet)."""
        return self.audio.mic.idle_silence

    @idle_silence.setter
    def idle_silence(self, value: bool) -> None:
        self.audio.mic.idle_silence = value

    @property
    def switch(self) -> InboundEslServer | None:
        """The inbound server this call is attached to (:meth:`InboundEslServer.attach`)."""
        return self.esl.switch

    @switch.setter
    def switch(self, server: InboundEslServer | None) -> None:
        self.esl.switch = server

    @property
    def closed(self) -> asyncio.Event:
        """Set when the Event Socket connection is closed."""
        return self.esl.closed

    @property
    def commands(self) -> list[Command]:
        return self.esl.commands

    @property
    def events(self) -> list[FiredEvent]:
        return self.esl.events

    @property
    def errors(self) -> list[str]:
        return self.esl.errors

    @property
    def socket_audio_active(self) -> bool:
        return self.audio.active

    @property
    def audio_sock(self) -> socket.socket | None:
        return self.audio.sock

    @property
    def audio_connected(self) -> asyncio.Event:
        return self.audio.connected

    @property
    def audio_connected_ns(self) -> int | None:
        return self.audio.connected_ns

    @property
    def audio_eof_ns(self) -> int | None:
        return self.audio.playback.eof_ns

    @property
    def flush_flag(self) -> bool:
        return self.audio.playback.flush_flag

    @property
    def mic_sent(self) -> list[tuple[int, int, bool]]:
        return self.audio.mic.mic_sent

    @property
    def mic_due(self) -> list[int]:
        return self.audio.mic.mic_due

    @property
    def speech_sent(self) -> list[tuple[int, int]]:
        return self.audio.mic.speech_sent

    @property
    def mic_dropped(self) -> int:
        return self.audio.mic.mic_dropped

    @property
    def first_speech_ns(self) -> int | None:
        return self.audio.mic.first_speech_ns

    @property
    def playback_recv(self) -> list[tuple[int, int]]:
        return self.audio.playback.playback_recv

    @property
    def module_recv(self) -> list[tuple[int, int]]:
        return self.audio.playback.module_recv

    @property
    def played(self) -> list[tuple[int, bytes]]:
        return self.audio.playback.played

    @property
    def discarded(self) -> list[tuple[int, int]]:
        return self.audio.playback.discarded

    @property
    def flushes(self) -> list[tuple[int, str, int, bool]]:
        return self.audio.playback.flushes

    @property
    def violations(self) -> list[str]:
        return self.audio.playback.violations


def _duration_s(path: Path) -> float | None:
    """How long a file plays: a WAV by its header, mod_audio_stream's raw ``.r<k>`` files
    (int16 mono at k kHz) by their size; None when it does not open."""
    try:
        if path.suffix == ".wav":
            with wave.open(str(path)) as w:
                return float(w.getnframes() / w.getframerate())
        rates = {ext: rate for rate, ext in RAW_EXT.items()}
        return path.stat().st_size / 2 / rates[path.suffix.lstrip(".")]
    except (OSError, EOFError, KeyError, wave.Error):
        return None
