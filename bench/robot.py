"""A reference call-flow robot: the loop a dialer runs, as an example to copy (deploy/robot/).

For each call it runs a scenario (bench/robot_scenario.py: play a prompt, wait for AMD,
listen for an intent, wait for the beep, transfer, hang up) and drives two things:

* **FreeSWITCH, through its inbound Event Socket** (PROTOCOLS.md §3.3): ``api
  uuid_audio_stream <uuid> start ws://farm/<uuid>?...`` for a mod_audio_stream call,
  ``uuid_broadcast`` of the files farm's prompts become on such a call
  (``mod_audio_stream::play``, §1.8), ``uuid_transfer`` and ``uuid_kill``. A
  mod_socket_audio call needs none of that to start: the dialplan's ``socket
  farm:8084 async full`` gives it to farm, and the robot learns of it from its
  ``call_start``.
* **farm, through farm.client**: one :class:`~farm.client.Subscription` to every call's
  events, dispatched to the call's run by call id (the channel's uuid for both modules),
  and :class:`~farm.client.Commands` to play prompts (farm converts and paces them for
  either module, and cuts them when the caller talks over them) and to start AMD.

Each run logs and keeps the path the call took: ``[(step, outcome), ...]``.

    python -m bench.robot deploy/robot/confirm_appointment.yaml --esl 127.0.0.1:8021 \\
        --farm ws://farm:8080 --call <uuid>       # a parked, answered channel: mod_audio_stream
    python -m bench.robot deploy/robot/confirm_appointment.yaml --esl 127.0.0.1:8021
        # serves every mod_socket_audio call farm takes, until Ctrl-C
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.robot_scenario import Scenario, Step, load
from farm.client import DEFAULT_COMMANDS, DEFAULT_EVENTS, CommandError, Commands, Subscription
from farm.ingress.esl_link import EslClosed, EslLink
from farm.protocol import esl
from farm.protocol.events import Event


__all__ = ["CallRun", "Robot", "main"]

log = logging.getLogger("bench.robot")

ESL_TIMEOUT_S = 10.0
# A final with no intent: the rules' intent, when there is one, is published right after
# it; wait this long for it before calling the answer no_match.
INTENT_AFTER_FINAL_S = 1.0
# A final's offset is where the audio it heard begins, up to the VAD's preroll (300 ms)
# before the speech: one that begins this long before the prompt did is an older utterance.
STALE_MARGIN_MS = 500
# How long past a listen's timeout to wait for the words of an answer under way.
FINAL_WAIT_S = 30.0
# After the beep, how long to wait for the line to be quiet (farm's speech_end) at most.
BEEP_QUIET_S = 2.0
MAX_STEPS = 50  # a scenario that loops for ever still ends


@dataclass
class CallRun:
    """One call going through the scenario: its events, what it heard, the path it took."""

    uuid: str
    module: str  # "audio_stream" | "socket_audio"
    queue: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    path: list[tuple[str, str]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)  # every event of the call, for the record
    heard: list[Event] = field(default_factory=list)  # events since the last prompt began
    amd: Event | None = None
    beep: Event | None = None
    ended: Event | None = None  # call_end
    done: asyncio.Event = field(default_factory=asyncio.Event)
    plays: int = 0
    since_ms: int = 0  # the call's audio offset where the last prompt began: answers come after it
    in_speech: bool = False  # between farm's speech_start and speech_end

    def note(self, event: Event) -> Event:
        if event.type == "amd":
            self.amd = event
        elif event.type == "beep":
            self.beep = event
        elif event.type == "call_end":
            self.ended = event
        elif event.type in ("speech_start", "speech_end"):
            self.in_speech = event.type == "speech_start"
        self.events.append(event)
        self.heard.append(event)
        return event

    async def next(self, deadline: float) -> Event | None:
        """The call's next event, or None at ``deadline`` (loop time) or after its call_end."""
        if self.ended is not None and self.queue.empty():
            return None
        left = deadline - asyncio.get_running_loop().time()
        try:
            return self.note(await asyncio.wait_for(self.queue.get(), max(0.0, left)))
        except TimeoutError:
            return None


class Robot:
    """Runs ``scenario`` on calls: mod_audio_stream ones it starts (:meth:`run_audio_stream`),
    mod_socket_audio ones as farm takes them. Use as ``async with Robot(...) as robot``."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        esl_address: str,
        esl_password: str = "ClueCon",
        farm_ws: str = "ws://127.0.0.1:8080",
        events: str = DEFAULT_EVENTS,
        commands: str = DEFAULT_COMMANDS,
    ) -> None:
        self.scenario = scenario
        host, _, port = esl_address.rpartition(":")
        self.esl_host, self.esl_port, self.esl_password = host or "127.0.0.1", int(port), esl_password
        self.farm_ws = farm_ws.rstrip("/")
        self.sub = Subscription(events)
        self.farm = Commands(commands)
        self.link: EslLink | None = None
        self.calls: dict[str, CallRun] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- connections -----------------------------------------------------------------

    async def __aenter__(self) -> Robot:
        if not await self.sub.ready():
            raise ConnectionError(f"farm at {self.sub.endpoint} did not confirm the subscription")
        reader, writer = await asyncio.open_connection(self.esl_host, self.esl_port)
        greeted: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_message(message: esl.Message) -> None:
            if isinstance(message, esl.AuthRequest) and not greeted.done():
                greeted.set_result(None)
            elif isinstance(message, esl.EslEvent) and message.subclass == "mod_audio_stream::play":
                self._play_file(message)

        self.link = EslLink(reader, writer, on_message, f"Event Socket {self.esl_host}:{self.esl_port}")
        self.link.start()
        await asyncio.wait_for(greeted, ESL_TIMEOUT_S)
        for line in (("auth", self.esl_password), ("event", "json", "CUSTOM", "mod_audio_stream::play")):
            reply = await self.link.request(esl.command(*line), ESL_TIMEOUT_S)
            if not (isinstance(reply, esl.Reply) and reply.ok):
                raise ConnectionError(f"Event Socket refused {line[0]!r}: {getattr(reply, 'reply_text', reply)!r}")
        self._spawn(self._dispatch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.link is not None:
            self.link.close("robot done")
        self.sub.close()
        self.farm.close()

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def api(self, *args: str) -> str:
        """One ``api`` command on FreeSWITCH's Event Socket; its output (§3.3)."""
        assert self.link is not None
        reply = await self.link.request(esl.command("api", *args), ESL_TIMEOUT_S)
        body = reply.body if isinstance(reply, esl.ApiResponse) else repr(reply)
        log.info("api %s -> %s", " ".join(args), body.strip())
        return body

    def _play_file(self, event: esl.EslEvent) -> None:
        """mod_audio_stream wrote a prompt farm sent to a file: play it to the caller (§1.8)."""
        uuid = event.unique_id or ""
        if uuid not in self.calls or self.link is None:
            return
        with contextlib.suppress(ValueError, KeyError, TypeError, EslClosed):
            path = json.loads(event.body or "")["file"]
            future, _ = self.link.send(esl.command("api", "uuid_broadcast", uuid, path, "aleg"))
            future.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _dispatch(self) -> None:
        """Every event of every call to its run; a new mod_socket_audio call gets a run."""
        async for event in self.sub:
            self.farm.learn(event)
            run = self.calls.get(event.call_id)
            if run is None and event.type == "call_start" and event.get("protocol") == "socket_audio":
                run = self.calls[event.call_id] = CallRun(event.call_id, "socket_audio")
                self._spawn(self._run(run))
            if run is not None:
                run.queue.put_nowait(event)

    # -- calls -------------------------------------------------------------------------

    async def run_audio_stream(self, uuid: str) -> CallRun:
        """Start mod_audio_stream on an answered channel and run the scenario on it; returns
        the finished run."""
        run = self.calls[uuid] = CallRun(uuid, "audio_stream")
        query = "?rate=16000" + ("&amd=1" if self.scenario.amd else "")
        metadata = json.dumps({"call_id": uuid, "robot": self.scenario.name})
        reply = await self.api(
            "uuid_audio_stream", uuid, "start", f"{self.farm_ws}/{uuid}{query}", "mono", "16k", metadata
        )
        if not reply.startswith("+OK"):
            run.path.append(("start", "failed"))
            run.done.set()
            return run
        await self._run(run)
        return run

    async def wait_call(self, uuid: str, timeout: float) -> CallRun:
        """The run of a call the robot took by itself (mod_socket_audio), once it is done."""
        deadline = asyncio.get_running_loop().time() + timeout
        while uuid not in self.calls:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"no call_start for {uuid} in {timeout:.0f} s")
            await asyncio.sleep(0.05)
        run = self.calls[uuid]
        await asyncio.wait_for(run.done.wait(), max(0.0, deadline - asyncio.get_running_loop().time()))
        return run

    async def _run(self, run: CallRun) -> None:
        try:
            await self._start(run)
            name: str | None = self.scenario.start
            while name is not None and len(run.path) < MAX_STEPS:
                step = self.scenario.steps[name]
                outcome = await self._step(run, step)
                run.path.append((name, outcome))
                name = step.after(outcome)
                log.info("call %s: %s -> %s%s", run.uuid, step.name, outcome, f" -> {name}" if name else "")
        except (CommandError, EslClosed, ConnectionError) as exc:
            log.warning("call %s: stopped: %s", run.uuid, exc)
            run.path.append(("error", str(exc)))
        finally:
            run.done.set()

    async def _start(self, run: CallRun) -> None:
        """Wait for the call's call_start (the stream is up); ask for AMD from now if the
        scenario wants it and the stream did not (mod_socket_audio: "answered now")."""
        deadline = asyncio.get_running_loop().time() + ESL_TIMEOUT_S
        while not any(e.type == "call_start" for e in run.heard):
            if await run.next(deadline) is None:
                raise ConnectionError("no call_start from farm")
        if self.scenario.amd and run.module == "socket_audio":
            await self.farm.amd(run.uuid)

    async def _step(self, run: CallRun, step: Step) -> str:
        loop = asyncio.get_running_loop()
        played = ""
        if step.play is not None:
            played = await self._play(run, step)
            if played == "hangup":
                return played
        deadline = loop.time() + step.timeout_s
        if step.action == "amd":
            while run.amd is None and await run.next(deadline) is not None:
                pass
            return str(run.amd["result"]) if run.amd else "hangup" if run.ended else "timeout"
        if step.action == "wait_beep":
            while run.beep is None and await run.next(deadline) is not None:
                pass
            # The VAD hears a beep as speech: wait for its speech_end too, or the message
            # would start "over the caller" and be cut as a barge-in at once.
            quiet = loop.time() + BEEP_QUIET_S
            while run.beep is not None and run.in_speech and await run.next(quiet) is not None:
                pass
            return "beep" if run.beep else "hangup" if run.ended else "timeout"
        if step.action == "listen":
            return await self._listen(run, step)
        if step.action == "transfer":
            reply = await self.api("uuid_transfer", run.uuid, step.extension, step.dialplan, step.context)
            return "ok" if reply.startswith("+OK") else "failed"
        if step.action == "hangup":
            reply = await self.api("uuid_kill", run.uuid, step.cause)
            if reply.startswith("+OK"):
                while await run.next(loop.time() + ESL_TIMEOUT_S) is not None:
                    pass  # until farm's call_end: the call's last event
            return "ok" if reply.startswith("+OK") else "failed"
        return played or "done"

    async def _play(self, run: CallRun, step: Step) -> str:
        """Play the step's prompt through farm; return when it ends: played, barge_in, hangup."""
        assert step.play is not None
        run.plays += 1
        play_id = f"{step.name}-{run.plays}"
        run.heard = []  # what the caller says from here is an answer to this prompt
        reply = await self.farm.play_wav(run.uuid, step.play, play_id=play_id)
        # Generous: the prompt's length, plus the time a loaded node takes to start it.
        deadline = asyncio.get_running_loop().time() + reply.get("duration_ms", 0) / 1000 + 30
        while (event := await run.next(deadline)) is not None:
            if event.type == "playback_start" and event.get("id") == play_id:
                run.since_ms = event.offset_ms
            if event.type == "playback_stop" and event.get("id") == play_id:
                return "barge_in" if event.get("reason") == "barge_in" else "played"
        return "hangup" if run.ended else "played"

    async def _listen(self, run: CallRun, step: Step) -> str:
        """The caller's answer: the first intent since the prompt began, else what happened."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        spoke = False
        awaiting_final = False  # an utterance ended and its final is not in yet
        final_at: float | None = None
        backlog, run.heard = run.heard, []
        pending = list(backlog)
        while True:
            if pending:
                event: Event | None = pending.pop(0)
            else:
                deadline = start + (step.timeout_s if spoke else step.no_speech_s)
                if final_at is not None:
                    deadline = min(deadline, final_at + INTENT_AFTER_FINAL_S)
                elif run.in_speech or awaiting_final:
                    # Never cut a caller off mid-answer, nor give up on words still being
                    # recognized (a loaded node is late): wait for them, within a bound.
                    deadline = max(deadline, start + step.timeout_s + FINAL_WAIT_S)
                event = await run.next(deadline)
            if event is None:
                if run.ended is not None:
                    return "hangup"
                if final_at is not None:
                    return "no_match"
                return "timeout" if spoke else "no_speech"
            if event.type in ("final", "intent") and event.offset_ms + STALE_MARGIN_MS < run.since_ms:
                continue  # what the caller said before the question (recognition may lag behind)
            if event.type == "intent" and event.get("intent") not in (None, "unknown"):
                run.heard = []
                return str(event["intent"])
            if event.type == "speech_start":
                spoke = True
            elif event.type == "speech_end" and event.offset_ms >= run.since_ms:
                awaiting_final = True
            elif event.type == "final":
                awaiting_final = False
            if event.type == "final" and event.get("text"):
                spoke = True
                # The LLM fallback answers later (farm.ingress.llm_intents): wait for it.
                final_at = None if event.get("llm_intent") else loop.time()
            elif event.type == "call_end":
                return "hangup"


async def _main(args: argparse.Namespace) -> int:
    scenario = load(args.scenario)
    robot = Robot(
        scenario,
        esl_address=args.esl,
        esl_password=args.password,
        farm_ws=args.farm,
        events=args.events,
        commands=args.commands,
    )
    async with robot:
        if args.call:
            runs = await asyncio.gather(*(robot.run_audio_stream(uuid) for uuid in args.call))
            for run in runs:
                print(run.uuid, " -> ".join(f"{step}:{outcome}" for step, outcome in run.path))
            return 0
        while True:  # mod_socket_audio calls, as farm takes them
            await asyncio.sleep(3600)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.robot", description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", help="a scenario YAML file (deploy/robot/)")
    parser.add_argument("--esl", default="127.0.0.1:8021", help="FreeSWITCH's inbound Event Socket host:port")
    parser.add_argument("--password", default="ClueCon", help="its password")
    parser.add_argument(
        "--farm", default="ws://127.0.0.1:8080", help="farm's mod_audio_stream URL, as FreeSWITCH reaches it"
    )
    parser.add_argument("--events", default=DEFAULT_EVENTS, help="farm's event endpoint")
    parser.add_argument("--commands", default=DEFAULT_COMMANDS, help="farm's command endpoint")
    parser.add_argument(
        "--call", action="append", default=[], help="run a parked, answered channel over mod_audio_stream"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_main(args))
    return 130


if __name__ == "__main__":
    raise SystemExit(main())
