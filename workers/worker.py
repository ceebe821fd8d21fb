"""The worker process: its loop reads rings, runs VAD, publishes events, heartbeats.

Forked by the supervisor after the model is loaded, so every worker shares the one
copy of the model in memory (copy-on-write). The loop proves progress twice: a
``W_HEARTBEAT`` to the broker and a timestamp in the supervisor's heartbeat table,
both written from the loop itself, never from a side thread.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from typing import Any

import zmq

from farm.broker import wire
from farm.config import Config
from farm.heartbeats import HeartbeatTable
from farm.intents import IntentLibrary
from farm.lifeline import die_with_parent, obey_supervisor_only, orphaned
from farm.limits import raise_open_files_limit
from farm.logs import call_logger
from farm.proctitle import name_process
from farm.protocol.events import ERROR_ENDS, Event, end_reason_code, end_reason_of, is_canary
from farm.ring import Ring, RingError
from workers.analysis import node_amd_config, options_for
from workers.asr import ResultQueue
from workers.call import FLUSH, CallSession, Draft
from workers.cost import CallCost
from workers.engines.vosk import RecognizerPool, limit_malloc_arenas, rss_bytes, warmup_audio
from workers.scheduler import AsrScheduler


__all__ = ["Worker", "HeartbeatTable"]

TICK_S = 0.01  # ring poll period: a frame is 20 ms, so speech is seen within half a frame
RELAY_WAIT_S = 10.0  # at start, for the broker's relay to subscribe to this worker's events
# A call asked to move waits this long for a moment with nothing left to recognize; then it
# moves at the next pause anyway (an overloaded worker is never idle, and the move is the cure).
RELEASE_PATIENCE_S = 3.0
# A loop turn longer than this is logged (at most once per STALL_LOG_EVERY_S): the broker
# moves the calls of a worker silent for long (farm/broker/wire.py, Liveness).
STALL_S = 1.0
STALL_LOG_EVERY_S = 10.0


class Worker:
    def __init__(
        self, index: int, config: Config, model: Any, model_rate: int, heartbeats: HeartbeatTable, parent: int
    ) -> None:
        self.index = index
        self.config = config
        self.heartbeats = heartbeats
        self.log = logging.LoggerAdapter(logging.getLogger(__name__), {"worker": index})
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        # XPUB, not PUB: it hears the relay's subscription, so the worker knows when its
        # events reach the relay (a PUB drops what it sends before that).
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 1000)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)
        self.pub.connect(config.endpoint("events_in"))
        self.dealer: zmq.Socket[bytes] | None = None
        self.pool = RecognizerPool(
            model,
            model_rate,
            max_audio_s=config.recognizer_max_audio_s,
            keep=config.recognizer_pool,
            memory_mb=config.recognizer_memory_mb,
            reuse=config.recognizer_reuse,
        )
        self.scheduler = AsrScheduler(config.asr_threads, name=f"asr{index}")
        self.results = ResultQueue()
        self.sessions: dict[str, CallSession] = {}
        # Checked by `farm up` before any worker starts: these do not raise here.
        self.intents = IntentLibrary(config.intents)
        self.node_amd = node_amd_config(config)
        self.cost = CallCost(config.call_cpu_ms_prior())
        self.published = 0  # events published (the metrics' counter)
        self.partials_dropped = 0  # partials not published, of the calls no longer served
        self.running = True
        self.parent = parent  # the supervisor: exit when it is gone
        self.broker_expiry = 0.0
        self.last_sent = 0.0
        self.stalls: list[float] = []  # loop turns over STALL_S since the last warning
        self.stall_logged = 0.0

    # -- broker link -------------------------------------------------------------

    def connect(self) -> None:
        """(Re)create the DEALER and register: the MDP way to reconnect."""
        if self.dealer is not None:
            self.poller.unregister(self.dealer)
            self.dealer.close(0)
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(self.config.endpoint("workers"))
        self.poller.register(self.dealer, zmq.POLLIN)
        held = [(call_id, s.ring.name, wire.encode_info(s.info)) for call_id, s in self.sessions.items()]
        self.send(wire.W_READY, str(self.index), str(os.getpid()), *([wire.encode_held(held)] if held else []))
        self.broker_expiry = time.monotonic() + self.broker_patience

    @property
    def beat_interval(self) -> float:
        return wire.beat_interval(bool(self.sessions), self.config.worker_timeout)

    @property
    def broker_patience(self) -> float:
        # The broker beats an idle worker at the idle interval: the longer one, whatever we serve.
        return wire.beat_interval(False, self.config.worker_timeout) * wire.HEARTBEAT_LIVENESS

    def send(self, command: bytes, *body: str) -> None:
        assert self.dealer is not None
        self.dealer.send_multipart(wire.message(command, *body))
        self.last_sent = time.monotonic()

    def on_broker(self, frames: list[bytes]) -> None:
        try:
            command, body = wire.parse(frames)
        except wire.WireError as exc:
            self.log.warning("dropped a broker message: %s", exc)
            return
        self.broker_expiry = time.monotonic() + self.broker_patience
        if command == wire.B_ASSIGN:
            self.assign(*body)
        elif command == wire.B_RELEASE:
            session = self.sessions.get(body[0])
            if session is not None:
                session.release_asked = time.monotonic()
        elif command == wire.B_DISCONNECT:
            # Declared dead, or a new broker: it decides which of our calls are still ours.
            self.log.warning("broker does not know this worker: registering again, %d calls", len(self.sessions))
            self.connect()
        elif command == wire.B_DROP:
            session = self.sessions.pop(body[0], None)
            if session is not None:
                call_logger(self.log.logger, body[0]).info("dropped: another worker serves it, or it has ended")
                self.close_session(session)

    def assign(self, call_id: str, ring_name: str, raw_info: str) -> None:
        old = self.sessions.pop(call_id, None)
        if old is not None:
            self.close_session(old)
        try:
            info = wire.decode_info(raw_info)
            ring = Ring.attach(ring_name)
        except (wire.WireError, RingError) as exc:
            call_logger(self.log.logger, call_id).warning("cannot serve it: %s", exc)
            reason = f"worker could not attach: {exc}"
            self.publish(Event("error", call_id, 0, 0, {"reason": reason}))
            self.send(wire.W_DONE, call_id, reason)
            return
        options, errors = options_for(info, self.config, self.intents, self.node_amd)
        session = CallSession(
            call_id,
            ring,
            info,
            self.config,
            options=options,
            pool=self.pool,
            scheduler=self.scheduler,
            results=self.results,
        )
        self.sessions[call_id] = session
        for reason in errors if not session.resumed else ():  # the call goes on without that part
            call_logger(self.log.logger, call_id).warning("%s", reason)
            self.publish(session.event_for("error", 0, {"reason": reason}))
        call_logger(self.log.logger, call_id).info(
            "serving ring %s (%d Hz, %d ch)%s",
            ring_name,
            ring.rate,
            ring.channels,
            f", resuming at byte {session.base}" if session.resumed else "",
        )

    # -- events ----------------------------------------------------------------

    def await_relay(self, timeout: float) -> bool:
        """Wait until the broker's relay subscribes to this worker's events (sent at connect)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.pub.poll(int(left * 1000)) and self.pub.recv()[:1] == b"\x01":
                return True
        return False

    def publish(self, event: Event) -> None:
        self.pub.send_multipart(event.stamped("publish", time.monotonic_ns()).to_frames())
        self.published += 1

    def emit(self, call_id: str, session: CallSession, drafts: list[Draft]) -> None:
        """Publish a call's new events; a barge-in goes to the ingress as a command."""
        for draft in drafts:
            if draft.type == FLUSH:
                self.send(wire.W_FLUSH, call_id, session.flush_request(draft).encode())
            else:
                self.publish(session.event(draft))

    def close_session(self, session: CallSession) -> None:
        """Stop serving a call (it is out of ``sessions`` already); its counts stay in the worker's."""
        self.partials_dropped += session.partials_skipped
        session.close()

    def pump(self) -> None:
        for call_id, session in list(self.sessions.items()):
            now = time.monotonic()
            if now - self.last_sent >= self.beat_interval:  # many calls far behind: beat between them
                self.beat(now)
            if session.taken_over:  # as B_DROP says, which the broker sends when it hears from us again
                del self.sessions[call_id]
                call_logger(self.log.logger, call_id).warning("another worker took it over: dropped")
                self.close_session(session)
                continue
            try:
                drafts = session.pump()
            except Exception as exc:  # a bug of ours, or the process out of a resource
                # One call's failure ends that call, not the worker and every call it serves.
                # As when a call cannot be attached: the error, then W_DONE; the ingress says
                # its call_end when its connection ends (a live call the worker gave up).
                call_logger(self.log.logger, call_id).exception("failed: giving the call up")
                reason = f"worker failed on this call: {exc}"
                self.publish(session.event_for("error", 0, {"reason": reason}))
                if session.ring.closed:  # its connection has ended: its call_end is ours to say
                    self.end(call_id, session)
                else:
                    del self.sessions[call_id]
                    self.close_session(session)
                    self.send(wire.W_DONE, call_id, reason)
                continue
            self.emit(call_id, session, drafts)
            if session.idle:
                self.end(call_id, session)
                continue
            session.commit()
            asked = session.release_asked
            if asked and session.releasable(patient=time.monotonic() - asked < RELEASE_PATIENCE_S):
                # Rebalancing: another worker resumes from the committed cursor just written.
                del self.sessions[call_id]
                self.close_session(session)
                self.send(wire.W_RELEASED, call_id)
                call_logger(self.log.logger, call_id).info("released to another worker")

    def load(self) -> wire.Load:
        """The heartbeat's body: for the broker's balance and admission, and for the node's
        metrics (the broker passes it on to the ingress, which exports it)."""
        return wire.Load(
            calls=sum(not is_canary(call_id) for call_id in self.sessions),  # the canary's probe is nobody's call
            # Files wait behind live calls on purpose: their backlog is no sign of overload.
            lag_ms=max((s.backlog_ms for s in self.sessions.values() if not s.background), default=0),
            utterances=sum(s.in_speech for s in self.sessions.values()),
            call_cpu_ms=self.cost.figure,
            queued=self.scheduler.waiting,
            cpu_ms=int(time.process_time() * 1000),
            rss_bytes=rss_bytes(),
            recognizers_idle=self.pool.idle,
            recognizers_busy=max(0, self.pool.leased),
            recognizers_created=self.pool.created,
            recognizers_retired=self.pool.retired,
            events_published=self.published,
            partials_dropped=self.partials_dropped + sum(s.partials_skipped for s in self.sessions.values()),
        )

    def on_results(self) -> None:
        for out in self.results.drain():
            call_id = out.stream.tag[0]
            session = self.sessions.get(call_id)
            if session is None or out.stream.closed:
                continue  # the call was dropped or reassigned meanwhile
            self.emit(call_id, session, session.on_asr(out))

    def end(self, call_id: str, session: CallSession, unfinished: bool = False) -> None:
        # The call's last final may sit in the result queue (its recognition finished after
        # the loop last looked): publish it first, so call_end is the call's last event.
        self.on_results()
        ring = session.ring
        duration_ms = session.offset_ms_of_cursor(ring.write_cursor)
        code, detail = ring.end  # why the ingress closed the ring
        if unfinished:  # the worker is stopping with this call's recognition not done
            code, detail = end_reason_code("drain"), "farm stopped before this call's recognition finished"
        elif session.writer_lost and not ring.closed:
            code, detail = end_reason_code("lost"), f"the ingress (pid {ring.writer_pid}) holding its connection died"
        data = {
            "reason": end_reason_of(code),
            "detail": detail,
            "duration_ms": duration_ms,
            "overrun_bytes": ring.overrun_bytes,
            "frames": ring.frames,
            "stats": session.stats.summary(duration_ms),
        }
        if data["reason"] in ERROR_ENDS:
            # The ingress's complaint about this call: said here, so that it comes before call_end.
            self.publish(session.event_for("error", duration_ms, {"reason": detail or data["reason"]}))
        self.publish(session.event_for("call_end", duration_ms, data))
        ring.committed = ring.write_cursor
        ring.owed = ring.owed_end = 0
        del self.sessions[call_id]
        self.close_session(session)
        self.send(wire.W_DONE, call_id)
        call_logger(self.log.logger, call_id).info("done, %d ms of audio (%s)", duration_ms, data["reason"])

    # -- the loop ----------------------------------------------------------------

    def run(self) -> int:
        self.poller = zmq.Poller()
        self.poller.register(self.results.fd, zmq.POLLIN)
        warmup = warmup_audio(self.pool.rate) if self.config.recognizer_reuse else b""
        if warmup and self.config.recognizer_warm:
            # Before W_READY: the broker sends calls only to a worker that is warm.
            t0 = time.monotonic()
            first = warmup[: int(self.config.recognizer_warm_s * self.pool.rate) * 2]
            # Beating as it goes: a busy machine may take longer than --worker-timeout.
            self.pool.warm(self.config.recognizer_warm, first, progress=lambda: self.heartbeats.beat(self.index))
            self.log.info(
                "worker %d: %d recognizers warmed in %.1f s", self.index, self.pool.idle, time.monotonic() - t0
            )
        self.heartbeats.beat(self.index)
        if not self.await_relay(RELAY_WAIT_S):
            self.log.warning("the event relay did not subscribe within %.0f s: events may be lost", RELAY_WAIT_S)
        self.connect()
        if warmup and self.config.recognizer_warm_later:
            self.pool.warm_in_background(self.config.recognizer_warm_later, warmup)
        next_tick = next_beat = time.monotonic()
        stop_by = 0.0
        # On the supervisor's stop signal, calls whose ring the ingress has closed (a node
        # stopping drains the ingress first) are finished, within --drain-timeout, so that
        # each gets its last final and its call_end; calls still streaming (one worker
        # fewer, TTOU) are left to the broker, which moves them to another worker.
        while True:
            if not self.running:
                stop_by = stop_by or time.monotonic() + self.config.drain_timeout
                if not self.finishing() or time.monotonic() >= stop_by:
                    break
            # With calls, look at their rings every tick; without, sleep until the next
            # heartbeat (an idle worker wakes once a second, not 100 times). Rounded up: a
            # wait cut to whole ms below the due time would spin in 0 ms polls up to it
            # (measured: 4 of an idle worker's 5.5 ms CPU per second).
            due = min(next_tick, next_beat) if self.sessions else next_beat
            ready = dict(self.poller.poll(max(0, math.ceil((due - time.monotonic()) * 1000))))
            woke = time.monotonic()
            if self.dealer is not None and self.dealer in ready:
                while self.dealer is not None:
                    try:
                        frames = self.dealer.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.on_broker(frames)
            if self.results.fd in ready:
                self.on_results()
            now = time.monotonic()
            if self.sessions and now >= next_tick:
                self.pump()
                next_tick = now + TICK_S
            if now >= next_beat:
                if not self.housekeeping(now):
                    return 1
                next_beat = now + self.beat_interval
            self.note_stall(time.monotonic() - woke)
        for call_id in self.finishing():
            self.end(call_id, self.sessions[call_id], unfinished=True)  # its subscribers still get a call_end
        if self.dealer is not None:
            self.send(wire.W_DISCONNECT)
        self.log.info(
            "worker %d stopping: %d recognizers created, %d retired, %d idle",
            self.index,
            self.pool.created,
            self.pool.retired,
            self.pool.idle,
        )
        return 0

    def finishing(self) -> list[str]:
        """The calls whose audio is over (the ingress closed their ring) and not yet ended."""
        return [call_id for call_id, session in self.sessions.items() if session.ring.closed]

    def beat(self, now: float) -> None:
        """Prove progress to the supervisor and to the broker, from the loop itself."""
        self.heartbeats.beat(self.index)
        # Never early (the loop's wait is rounded up), so each due beat reaches the broker.
        if now - self.last_sent >= self.beat_interval:
            self.send(wire.W_HEARTBEAT, self.load().encode())

    def note_stall(self, took: float) -> None:
        """Log loop turns long enough to worry the broker, at most once per STALL_LOG_EVERY_S."""
        if took >= STALL_S:
            self.stalls.append(took)
        now = time.monotonic()
        if self.stalls and now - self.stall_logged >= STALL_LOG_EVERY_S:
            self.log.warning(
                "worker %d: %d loop turns over %.0f s (longest %.1f s) with %d calls: this CPU is short",
                self.index,
                len(self.stalls),
                STALL_S,
                max(self.stalls),
                len(self.sessions),
            )
            self.stalls.clear()
            self.stall_logged = now

    def housekeeping(self, now: float) -> bool:
        """Liveness both ways, from the loop itself; False when the worker must exit."""
        self.beat(now)
        self.cost.sample(len(self.sessions))
        self.notice_lost_writers()
        while self.pub.poll(0):  # a restarted relay subscribes again: drop its notices
            self.pub.recv()
        if now > self.broker_expiry:
            self.log.warning("broker silent for %.1f s: reconnecting", now - self.broker_expiry + self.broker_patience)
            self.connect()
        if orphaned(self.parent):
            self.log.warning("supervisor (pid %d) is gone: exiting (pid %d)", self.parent, os.getpid())
            return False
        return True

    def notice_lost_writers(self) -> None:
        """Calls whose ingress died: its connections are gone, and the supervisor unlinks
        their rings; finish what came and end them, so their mappings go too."""
        for call_id, session in self.sessions.items():
            if session.writer_lost or session.ring.closed or not session.ring.writer_gone:
                continue
            session.writer_lost = True
            call_logger(self.log.logger, call_id).warning(
                "its ingress (pid %d) died: ending it with what came", session.ring.writer_pid
            )

    def close(self) -> None:
        for session in self.sessions.values():
            self.close_session(session)
        # Slices stop at their next frame once their stream is closed; wait for them so
        # no Vosk call is still running while the interpreter tears down.
        self.scheduler.shutdown()
        self.ctx.destroy(linger=500)


def worker_main(
    index: int, cpu: int | None, config: Config, model: Any, model_rate: int, heartbeats: HeartbeatTable, parent: int
) -> int:
    """Entry point in the forked child of supervisor ``parent``; returns the exit code."""
    from farm.logs import setup_logging

    if not die_with_parent(parent):
        return 1  # the supervisor died while forking us
    setup_logging(config.log_level, f"worker{index}")
    name_process(f"worker {index}")
    stop_signal = obey_supervisor_only(parent)
    limit_malloc_arenas()
    if cpu is not None and config.pin_workers:
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:
            pass
    else:
        cpu = None
    worker = Worker(index, config, model, model_rate, heartbeats, parent)

    def stop(signum: int, frame: object) -> None:
        worker.running = False

    signal.signal(stop_signal, stop)
    files = raise_open_files_limit()  # inherited from the supervisor; a worker started alone raises its own
    worker.log.info(
        "worker %d (pid %d) started on cpu %s; open files limit %d (a call's ring takes one)",
        index,
        os.getpid(),
        cpu,
        files,
    )
    try:
        return worker.run()
    finally:
        worker.close()
