"""The broker process: assigns calls to workers, watches their liveness, balances their
load, relays events.

Follows the FARMW03 contract in :mod:`farm.broker.wire`. Everything that changes the
call table or the worker table lives in this file.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import zmq

from farm.broker import wire
from farm.config import Config, default_workers
from farm.curve import Keys, node_keys, server_socket, start_authenticator
from farm.lifeline import die_with_parent, obey_supervisor_only, orphaned, parent_from_env
from farm.proctitle import name_process
from farm.protocol.events import SUBSCRIBED, is_canary, is_canary_topic


__all__ = ["Broker", "node_capacity", "main"]

log = logging.getLogger("farm.broker")


# A release the worker has not answered in this long is given up (the call stays put).
RELEASE_TIMEOUT_S = 30.0


def node_capacity(cpus: float, share: float, call_cpu_ms: int) -> int:
    """Calls a node holds when they may use ``share`` of its ``cpus`` and each costs
    ``call_cpu_ms`` CPU ms per second; at least one; 0 means no limit (``share`` 0)."""
    if share <= 0 or call_cpu_ms <= 0:
        return 0
    return max(1, int(cpus * 1000 * share // call_cpu_ms))


@dataclass
class _Worker:
    identity: bytes
    index: int
    pid: int
    expiry: float
    calls: set[str] = field(default_factory=set)
    pidfd: int = -1  # readable once the process has exited; -1: not watched
    last_sent: float = 0.0
    load: wire.Load = field(default_factory=wire.Load)

    @property
    def busy(self) -> tuple[int, int, int]:
        """Order of preference for a new call: fewest calls, then least behind."""
        return (len(self.calls), self.load.lag_ms, self.index)


@dataclass
class _Call:
    call_id: str
    ring: str
    info: str
    worker: bytes | None = None
    released_by: bytes | None = None  # the worker a release moved it from


def _relay(
    ctx: zmq.Context[zmq.Socket[bytes]],
    events_in: str,
    events_out: str,
    canary_out: str,
    delay_s: float = 0.0,
    keys: Keys | None = None,
) -> None:
    """XSUB -> XPUB relay, on its own thread: events never wait for control traffic.

    Upstream it subscribes to everything once, so a new subscriber's filter lives only
    here and not in every producer's PUB as well (one hop, not two). Each subscription
    is answered on its own topic with ``[topic, SUBSCRIBED]``: the subscriber then
    knows nothing published afterwards can miss it (``farm.client.Subscription``).
    After a restart it reads upstream ``delay_s`` late: the producers' events of the gap
    arrive at once, and the subscribers must have reconnected before they go out.
    The canary's events (farm/ingress/canary.py) go out on ``canary_out``, an internal
    endpoint only the ingress reads: the node's self-test is nobody's call.
    """
    xsub = ctx.socket(zmq.XSUB)
    xpub = ctx.socket(zmq.XPUB)
    canary = ctx.socket(zmq.XPUB)
    for s in (xsub, xpub, canary):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
    for s in (xpub, canary):
        s.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, repeated ones too, gets its answer
    if keys is not None:
        server_socket(xpub, keys)  # subscribers need an admitted key (farm/curve.py)
    xsub.bind(events_in)
    xpub.bind(events_out)
    canary.bind(canary_out)
    xsub.send(b"\x01")  # subscribe upstream to every topic
    poller = zmq.Poller()
    poller.register(xpub, zmq.POLLIN)
    poller.register(canary, zmq.POLLIN)
    # The producers' queued events (see the contract's Restarts) wait in xsub until then.
    read_from = time.monotonic() + delay_s
    reading = False
    try:
        while True:
            if not reading and time.monotonic() >= read_from:
                poller.register(xsub, zmq.POLLIN)
                reading = True
            wait_ms = None if reading else max(1, int((read_from - time.monotonic()) * 1000))
            for sock, _ in poller.poll(wait_ms):
                if sock is xsub:
                    frames = xsub.recv_multipart(copy=False)
                    out = canary if is_canary_topic(frames[0].bytes) else xpub
                    out.send_multipart(frames, copy=False)
                    continue
                message = sock.recv()
                if message[:1] == b"\x01":  # a subscription (0 is an unsubscription)
                    sock.send_multipart([message[1:], SUBSCRIBED])
    except zmq.ContextTerminated:
        pass
    finally:
        xsub.close()
        xpub.close()
        canary.close()


class Broker:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.workers_sock = self.ctx.socket(zmq.ROUTER)
        self.ingress_sock = self.ctx.socket(zmq.ROUTER)
        for s in (self.workers_sock, self.ingress_sock):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.workers_sock.bind(config.endpoint("workers"))
        self.ingress_sock.bind(config.endpoint("ingress"))
        # Restarted by the supervisor: its peers come back with calls (see the contract's Restarts).
        restarted = bool(os.environ.get(wire.RESTART_ENV))
        self.grace_until = time.monotonic() + wire.RESTART_GRACE_S if restarted else 0.0
        keys, self.authenticator = None, None
        if config.curve_dir:
            keys = node_keys(config.curve_dir)
            self.authenticator = start_authenticator(self.ctx, config.curve_dir)
        self.relay = threading.Thread(
            target=_relay,
            args=(
                self.ctx,
                config.endpoint("events_in"),
                config.events,
                config.endpoint("canary_events"),
                wire.RESTART_GRACE_S / 2 if restarted else 0.0,
                keys,
            ),
            name="event-relay",
            daemon=True,
        )
        self.workers: dict[bytes, _Worker] = {}
        self.calls: dict[str, _Call] = {}
        self.pending: deque[str] = deque()
        self.ingress_identity: bytes | None = None
        self.for_ingress: deque[list[bytes]] = deque(maxlen=100_000)  # I_GAVE_UPs before it first spoke
        self.running = True
        self.parent = parent_from_env()  # the supervisor: exit when it is gone
        self.releasing: tuple[str, bytes, float] | None = None  # (call, from worker, since): one move at a time
        cpus = default_workers()
        self.cpus = min(cpus, config.workers) if config.pin_workers else cpus  # what calls' decoding may use
        self.call_cpu_ms = 0  # last figure the workers measured, kept while no call runs
        self.poller = zmq.Poller()
        self.poller.register(self.workers_sock, zmq.POLLIN)
        self.poller.register(self.ingress_sock, zmq.POLLIN)
        self.prior_ms = config.call_cpu_ms_prior()  # before any: the model's kind of graph decides it
        self.workers_lost = 0  # declared dead: exited, missed heartbeats or replaced (for the metrics)
        self.calls_moved = 0  # released by one worker and assigned to another (for the metrics)

    # -- sending -----------------------------------------------------------

    def _send_worker(self, worker: _Worker, command: bytes, *body: str) -> None:
        worker.last_sent = time.monotonic()
        self.workers_sock.send_multipart([worker.identity, *wire.message(command, *body)])

    def _send_ingress(self, command: bytes, *body: str) -> None:
        frames = wire.message(command, *body)
        if self.ingress_identity is None:
            if command == wire.I_GAVE_UP:  # a restarted broker hears workers first: keep these
                self.for_ingress.append(frames)
            return
        self.ingress_sock.send_multipart([self.ingress_identity, *frames])

    def _send_status(self) -> None:
        """I_STATUS: in answer to the ingress's heartbeat, and at once when workers come or go."""
        lag = min((w.load.lag_ms for w in self.workers.values()), default=0)
        cost = self._call_cpu_ms()
        status = wire.Status(
            len(self.workers),
            lag,
            sum(not is_canary(c) for w in self.workers.values() for c in w.calls),  # the canary is nobody's call
            node_capacity(self.cpus, self.config.admission_cpu, cost),
            cost,
            self.workers_lost,
            self.calls_moved,
            os.getpid(),
            tuple(
                wire.WorkerReport(w.index, w.pid, w.load) for w in sorted(self.workers.values(), key=lambda w: w.index)
            ),
        )
        self._send_ingress(wire.I_STATUS, status.encode())

    def _call_cpu_ms(self) -> int:
        """What a call costs: the operator's figure, else what the workers last measured,
        else the prior."""
        return self.config.admission_call_cpu_ms or self.call_cpu_ms or self.prior_ms

    def _note_cost(self) -> None:
        """The workers' figures, weighted by their calls; a worker that has not measured yet
        (new, restarted) leaves the last figure as it is."""
        measured = [(w.load.call_cpu_ms, max(1, len(w.calls))) for w in self.workers.values() if w.load.call_cpu_ms]
        if measured:
            self.call_cpu_ms = round(sum(ms * n for ms, n in measured) / sum(n for _, n in measured))

    # -- call table ----------------------------------------------------------

    def _can_assign(self) -> bool:
        """Some worker is live, and (after a restart) its peers have had time to come back."""
        return bool(self.workers) and time.monotonic() >= self.grace_until

    def _assign(self, call: _Call) -> bool:
        if not self._can_assign():
            return False
        # A released call goes elsewhere when there is anywhere else to go.
        others = [w for w in self.workers.values() if w.identity != call.released_by] or list(self.workers.values())
        worker = min(others, key=lambda w: w.busy)
        call.worker = worker.identity
        call.released_by = None
        worker.calls.add(call.call_id)
        self._send_worker(worker, wire.B_ASSIGN, call.call_id, call.ring, call.info)
        log.info(
            "assigned to worker %d (pid %d, %d calls)",
            worker.index,
            worker.pid,
            len(worker.calls),
            extra={"call_id": call.call_id},
        )
        return True

    def _assign_pending(self) -> None:
        while self.pending and self._can_assign():
            call = self.calls.get(self.pending.popleft())
            if call is not None and call.worker is None:
                self._assign(call)

    def _rebalance(self, now: float) -> None:
        """Move one call from the busiest worker to the least busy when they differ by two or
        more calls (see the contract's "Balance"); one release in flight at a time."""
        if self.releasing is not None:
            call_id, source, since = self.releasing
            call = self.calls.get(call_id)
            if call is not None and call.worker == source and now - since < RELEASE_TIMEOUT_S:
                return
            self.releasing = None  # moved, ended, or not answered in time: next
        if len(self.workers) < 2 or now < self.grace_until:
            return
        busiest = max(self.workers.values(), key=lambda w: w.busy)
        idlest = min(self.workers.values(), key=lambda w: w.busy)
        if len(busiest.calls) - len(idlest.calls) < 2:
            return
        call_id = min(busiest.calls)
        self.releasing = (call_id, busiest.identity, now)
        self._send_worker(busiest, wire.B_RELEASE, call_id)
        log.info(
            "moving it off worker %d (%d calls) to balance with worker %d (%d calls)",
            busiest.index,
            len(busiest.calls),
            idlest.index,
            len(idlest.calls),
            extra={"call_id": call_id},
        )

    def _claim(self, worker: _Worker, call_id: str, ring: str, info: str, now: float, replaced: set[bytes]) -> None:
        """A call ``worker`` still serves as it registers (again): it stays there unless
        another live worker has it (``replaced``: the registrations this one replaces);
        after a restart's grace, one the broker does not know has ended."""
        call = self.calls.get(call_id)
        if call is None and now < self.grace_until:
            call = self.calls[call_id] = _Call(call_id, ring, info)
        elsewhere = call is not None and call.worker in self.workers and call.worker not in replaced
        if call is None or call.ring != ring or (elsewhere and call.worker != worker.identity):
            self._send_worker(worker, wire.B_DROP, call_id)
            return
        call.worker = worker.identity
        worker.calls.add(call_id)

    def _done_unregistered(self, call_id: str, gave_up: list[str]) -> None:
        """W_DONE from a worker the broker does not know (sent to the broker before a
        restart): the call is over unless a live worker serves it."""
        call = self.calls.get(call_id)
        if call is not None and call.worker in self.workers:
            return
        self.calls.pop(call_id, None)
        if gave_up:
            self._send_ingress(wire.I_GAVE_UP, call_id, *gave_up)

    def _watch(self, worker: _Worker) -> None:
        """Watch the worker's process, so its exit is seen at once and its silence is patient."""
        try:
            worker.pidfd = os.pidfd_open(worker.pid)
        except OSError:  # gone already, or not in our pid namespace: heartbeats only
            pass
        else:
            self.poller.register(worker.pidfd, zmq.POLLIN)
        worker.expiry = time.monotonic() + self._patience(worker)

    def _unwatch(self, worker: _Worker) -> None:
        if worker.pidfd >= 0:
            self.poller.unregister(worker.pidfd)
            os.close(worker.pidfd)
            worker.pidfd = -1

    def _interval(self, worker: _Worker) -> float:
        return wire.beat_interval(bool(worker.calls), self.config.worker_timeout)

    def _patience(self, worker: _Worker) -> float:
        if worker.pidfd >= 0:
            return max(wire.HEARTBEAT_INTERVAL * wire.WATCHED_LIVENESS, 2 * self._interval(worker))
        return self._interval(worker) * wire.HEARTBEAT_LIVENESS

    def _worker_exited(self, pidfd: int) -> None:
        for worker in self.workers.values():
            if worker.pidfd == pidfd:
                self.workers_lost += 1
                self._forget_worker(worker, "exited")
                return

    def _forget_worker(self, worker: _Worker, why: str) -> None:
        del self.workers[worker.identity]
        self._unwatch(worker)
        self._send_status()
        # Its calls, but for those its replacement claimed (W_READY's held).
        calls = [c for c in map(self.calls.get, sorted(worker.calls)) if c and c.worker == worker.identity]
        log.warning("worker %d (pid %d) %s; reassigning %d calls", worker.index, worker.pid, why, len(calls))
        for call in calls:
            call.worker = None
            self.pending.append(call.call_id)
        self._assign_pending()

    # -- message handlers ------------------------------------------------------

    @staticmethod
    def _parse(frames: list[bytes], sender: str) -> tuple[bytes, list[str]] | None:
        try:
            return wire.parse(frames[1:])
        except wire.WireError as exc:
            log.warning("dropped a message from %s: %s", sender, exc)
            return None

    def handle_worker(self, frames: list[bytes]) -> None:
        identity, parsed = frames[0], self._parse(frames, "a worker")
        if parsed is None:
            return
        command, body = parsed
        now = time.monotonic()
        worker = self.workers.get(identity)
        if command == wire.W_READY:
            try:
                index, pid, held = wire.parse_ready(body)
            except wire.WireError as exc:
                log.warning("dropped a message from a worker: %s", exc)
                return
            replaced = [w for w in self.workers.values() if w.index == index and w.identity != identity]
            if worker is not None:  # registered again on the same connection
                self._unwatch(worker)
            worker = self.workers[identity] = _Worker(identity, index, pid, now)
            self._watch(worker)
            log.info("worker %d (pid %d) ready%s", index, pid, f", {len(held)} calls held" if held else "")
            for call_id, ring, info in held:
                self._claim(worker, call_id, ring, info, now, {w.identity for w in replaced})
            for old in replaced:
                # One process holds an index at a time: the supervisor starts index i only
                # after the last one exited, and a worker that reconnects drops its calls.
                self.workers_lost += 1
                self._forget_worker(old, f"was replaced by pid {pid}")
            self._assign_pending()
            self._send_status()
            return
        if worker is None:
            if command == wire.W_DONE:
                self._done_unregistered(body[0], body[1:])
            # Declared dead earlier (or the broker restarted): make it register again.
            self.workers_sock.send_multipart([identity, *wire.message(wire.B_DISCONNECT)])
            return
        if command == wire.W_HEARTBEAT:
            try:
                worker.load = wire.Load.decode(body[0])
            except wire.WireError as exc:
                log.warning("worker %d: dropped a heartbeat's load: %s", worker.index, exc)
            else:
                self._note_cost()
        elif command == wire.W_DONE:
            call_id = body[0]
            worker.calls.discard(call_id)
            self.calls.pop(call_id, None)
            if len(body) > 1:  # given up: no call_end will end it on the event path
                self._send_ingress(wire.I_GAVE_UP, call_id, body[1])
        elif command == wire.W_FLUSH:
            call = self.calls.get(body[0])
            if call is not None and call.worker == identity:  # not from a worker the call has left
                self._send_ingress(wire.I_FLUSH, *body)
        elif command == wire.W_RELEASED:
            call = self.calls.get(body[0])
            if call is not None and call.worker == identity:
                worker.calls.discard(call.call_id)
                call.worker = None
                call.released_by = identity
                if self._assign(call):
                    self.calls_moved += 1
                else:
                    self.pending.append(call.call_id)
        elif command == wire.W_DISCONNECT:
            self._forget_worker(worker, "disconnected")
        else:
            log.warning("worker %d sent unexpected %s", worker.index, wire.name(command))
        worker.expiry = now + self._patience(worker)  # after the message: its calls set the beat

    def handle_ingress(self, frames: list[bytes]) -> None:
        identity, parsed = frames[0], self._parse(frames, "the ingress")
        if parsed is None:
            return
        command, body = parsed
        self.ingress_identity = identity
        while self.for_ingress:
            self.ingress_sock.send_multipart([identity, *self.for_ingress.popleft()])
        if command == wire.I_OPEN:
            call_id, ring, info = body
            old = self.calls.get(call_id)
            if old is not None and old.ring == ring:
                return  # announced again (a new broker's ingress), or claimed by its worker first
            if old is not None and old.worker in self.workers:
                self.workers[old.worker].calls.discard(call_id)
            call = _Call(call_id, ring, info)
            self.calls[call_id] = call
            if not self._assign(call):
                why = (
                    "restarted, waiting for the workers to name their calls" if self.grace_until else "no worker ready"
                )
                log.info("queued: %s", why, extra={"call_id": call_id})
                self.pending.append(call_id)
        elif command == wire.I_HEARTBEAT:
            self._send_status()
        else:
            log.warning("ingress sent unexpected %s", wire.name(command))

    def tick(self) -> None:
        """Heartbeats out, expired workers out; call at least every heartbeat interval."""
        if orphaned(self.parent):
            log.warning("supervisor (pid %d) is gone: exiting (pid %d)", self.parent, os.getpid())
            self.running = False
        now = time.monotonic()
        if self.grace_until and now >= self.grace_until:
            self.grace_until = 0.0
            waiting = sum(1 for c in self.pending if (call := self.calls.get(c)) is not None and call.worker is None)
            log.info(
                "restart grace over: %d calls kept by their workers, %d to assign", len(self.calls) - waiting, waiting
            )
            self._assign_pending()
        for worker in list(self.workers.values()):
            if worker.expiry < now:
                self.workers_lost += 1
                self._forget_worker(worker, "missed its heartbeats")
            elif now - worker.last_sent >= self._interval(worker):
                self._send_worker(worker, wire.B_HEARTBEAT)
        self._rebalance(now)

    def run(self) -> None:
        self.relay.start()
        next_tick = time.monotonic()
        log.info("broker ready (pid %d), events on %s", os.getpid(), self.config.events)
        while self.running:
            timeout = max(0, math.ceil((next_tick - time.monotonic()) * 1000))  # up: no 0 ms polls before the tick
            for sock, _ in self.poller.poll(timeout):
                if isinstance(sock, int):  # a worker's pidfd: its process exited
                    self._worker_exited(sock)
                    continue
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if sock is self.workers_sock:
                        self.handle_worker(frames)
                    else:
                        self.handle_ingress(frames)
            if time.monotonic() >= next_tick:
                self.tick()
                # With no call on the node, tick at the idle workers' beat (a call wakes the poll).
                busy = bool(self.calls or self.pending)
                next_tick = time.monotonic() + wire.beat_interval(busy, self.config.worker_timeout)

    def close(self) -> None:
        for worker in self.workers.values():
            self._unwatch(worker)
        self.workers_sock.close()
        self.ingress_sock.close()
        if self.authenticator is not None:
            self.authenticator.stop()
        self.ctx.term()


def main() -> None:
    from farm.logs import setup_logging

    parent = parent_from_env()
    if not die_with_parent(parent):
        return  # the supervisor died while starting us
    config = Config.from_env()
    setup_logging(config.log_level, "broker")
    name_process("broker")
    broker = Broker(config)

    def stop(signum: int, frame: object) -> None:
        broker.running = False

    signal.signal(obey_supervisor_only(parent), stop)
    try:
        broker.run()
    finally:
        broker.close()


if __name__ == "__main__":
    main()
