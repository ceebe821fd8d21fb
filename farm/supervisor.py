"""``farm up``: the pre-fork arbiter that starts, watches and stops a node.

Shaped like gunicorn 23's arbiter: signal handlers only enqueue and wake the loop;
the loop waits for signals (1 s), handles them, murders workers whose loop stopped
beating, and brings the worker count back to N. The Vosk model is loaded here, once,
before the workers are forked, so all of them share one copy (copy-on-write). The
broker and the ingress need no model and run as fresh interpreters.

Exit codes: 0 clean stop, 3 workers die as they start (gunicorn's WORKER_BOOT_ERROR), 4
the model could not be loaded, 5 a farm process could not start (port in use, bad
endpoint), 1 anything else.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from farm.broker.wire import RESTART_ENV
from farm.config import Config
from farm.graph import has_static_graph
from farm.heartbeats import HeartbeatTable
from farm.lifeline import PARENT_ENV, STOP_SIGNAL
from farm.limits import raise_open_files_limit
from farm.native import describe as describe_native, loaded_core, loaded_malloc
from farm.proctitle import name_process
from farm.ring import sweep_stale
from workers.engines.vosk import ModelError, load_model, model_rate, model_view
from workers.worker import worker_main


__all__ = ["Supervisor", "HaltServer", "WORKER_BOOT_ERROR", "MODEL_LOAD_ERROR", "START_ERROR"]

log = logging.getLogger("farm.supervisor")

WORKER_BOOT_ERROR = 3
MODEL_LOAD_ERROR = 4
START_ERROR = 5

# A process that dies this soon after its start is broken, not unlucky: halt.
_EARLY_DEATH_S = 3.0
# A starting worker warms a recognizer before it registers (no call waits on it), and one
# Vosk call of that warm-up can keep its loop silent for many seconds on a loaded machine
# (seen: 10 s under stress-ng, then SIGABRT, then a second start): its start is not a hang.
_START_GRACE_S = 60.0
# Workers dying this many times in a row right after their start: halt, do not respawn forever.
_WORKER_BOOT_FAILURES = 5


class HaltServer(BaseException):
    """Stop the whole node with an exit code; raised instead of respawning forever."""

    def __init__(self, reason: str, exit_status: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit_status = exit_status


@dataclass
class _Child:
    role: str  # "broker" | "ingress" | "worker"
    pid: int
    started: float
    index: int = 0
    popen: subprocess.Popen[bytes] | None = None
    aborted: float = 0.0  # when SIGABRT was sent for a silent loop


class Supervisor:
    SIGNALS = [
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGQUIT,
        signal.SIGHUP,
        signal.SIGCHLD,
        signal.SIGTTIN,
        signal.SIGTTOU,
    ]

    def __init__(self, config: Config) -> None:
        self.config = config
        self.num_workers = config.workers
        self.children: dict[int, _Child] = {}
        self.sig_queue: list[int] = []
        self.pipe: tuple[int, int] = (-1, -1)
        self.model: Any = None  # the Vosk model, loaded before the workers fork (they share its pages)
        self.model_rate = 16000
        self.heartbeats = HeartbeatTable()
        self.cpus = sorted(os.sched_getaffinity(0))
        self.stopping = False
        self.boot_failures = 0  # workers in a row that died right after their start

    # -- start -------------------------------------------------------------------

    def start(self) -> None:

        removed = sweep_stale()
        if removed:
            log.info("removed %d shared-memory rings left by a crashed farm: %s", len(removed), " ".join(removed[:5]))
        t0 = time.monotonic()
        try:
            model_dir = self.config.model
            if os.path.isdir(model_dir) and self.config.dither >= 0:
                model_dir = model_view(
                    model_dir, self.config.run_dir, dither=self.config.dither, decoder=self.config.decoder_options()
                )
            self.model = load_model(model_dir)
        except ModelError as exc:
            raise HaltServer(f"cannot load the model: {exc}", MODEL_LOAD_ERROR) from None
        self.model_rate = model_rate(self.config.model)
        log.info(
            "model %s loaded in %.1f s (%d Hz, %s) (pid %d)",
            self.config.model,
            time.monotonic() - t0,
            self.model_rate,
            "static decoding graph"
            if has_static_graph(self.config.model)
            else "its graph composed on the fly: farm graph compiles it for a tenth of the CPU",
            os.getpid(),
        )
        core, malloc = loaded_core(), loaded_malloc()
        hint = " (apt-get install libjemalloc2 for ~25 % less CPU per call)" if self.config.malloc == "auto" else ""
        log.info("recognition runs on %s%s", describe_native(core, malloc), "" if malloc else hint)
        asked = os.environ.get("OPENBLAS_CORETYPE", "")
        if asked and asked.lower() != core.lower():
            log.warning("OpenBLAS did not take the kernels asked for (%s): it runs %s", asked, core)
        self.pipe = os.pipe()
        for fd in self.pipe:
            os.set_blocking(fd, False)
        for sig in self.SIGNALS:
            signal.signal(sig, self._enqueue)
        self._spawn_process("broker")
        for i in range(self.num_workers):
            self._spawn_worker(i)
        ingress = self._spawn_process("ingress")
        self._wait_listening(ingress)
        host = self.config.ws_host if self.config.ws_host not in ("0.0.0.0", "::") else socket.gethostname()
        log.info(
            "farm up (pid %d): node %s, mod_audio_stream on ws://%s:%d/<call-id>, events on %s, model %s, %d workers. "
            "Point FreeSWITCH at it with: uuid_audio_stream <uuid> start ws://%s:%d/<uuid>?rate=16000 mono 16k%s",
            os.getpid(),
            self.config.node_id,
            self.config.ws_host,
            self.config.ws_port,
            self.config.events,
            self.config.model,
            self.num_workers,
            host,
            self.config.ws_port,
            f', or for mod_socket_audio: <action application="socket" data="{host}:{self.config.esl_port} '
            f'async full"/>; play/flush commands on {self.config.commands}'
            if self.config.esl_port
            else "",
        )

    def _enqueue(self, signum: int, frame: object) -> None:
        # Only enqueue and wake the loop: no logging or locks in a signal handler.
        if len(self.sig_queue) < 10:
            self.sig_queue.append(signum)
        try:
            os.write(self.pipe[1], b".")
        except OSError:
            pass

    def _spawn_process(self, role: str, again: bool = False) -> _Child:
        env = dict(os.environ, FARM_CONFIG=self.config.to_json(), **{PARENT_ENV: str(os.getpid())})
        if again and role == "broker":
            env[RESTART_ENV] = "1"  # its workers and ingress come back with their calls
        popen = subprocess.Popen(
            [sys.executable, "-m", f"farm.{'broker.broker' if role == 'broker' else 'ingress.runner'}"],
            env=env,
        )
        child = _Child(role, popen.pid, time.monotonic(), popen=popen)
        self.children[popen.pid] = child
        log.info("started %s (pid %d)", role, popen.pid)
        return child

    def _spawn_worker(self, index: int) -> None:
        cpu = self.cpus[index % len(self.cpus)] if self.cpus else None
        self.heartbeats.beat(index)  # its slot exists before the fork (see HeartbeatTable)
        parent = os.getpid()
        pid = os.fork()
        if pid:
            self.children[pid] = _Child("worker", pid, time.monotonic(), index)
            return
        # Child: leave the arbiter's signal set-up and pipe behind.
        code = 1
        try:
            for sig in self.SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            os.close(self.pipe[0])
            os.close(self.pipe[1])
            code = worker_main(index, cpu, self.config, self.model, self.model_rate, self.heartbeats, parent)
        except BaseException:
            logging.getLogger("workers.worker").exception("worker %d crashed (pid %d)", index, os.getpid())
        finally:
            os._exit(code)

    def _wait_listening(self, ingress: _Child) -> None:
        host = "127.0.0.1" if self.config.ws_host in ("0.0.0.0", "") else self.config.ws_host
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if ingress.popen is not None and ingress.popen.poll() is not None:
                raise HaltServer(
                    f"the ingress exited at start (code {ingress.popen.returncode}): "
                    f"is port {self.config.ws_port} in use? (or the Event Socket port {self.config.esl_port}, "
                    f"the command endpoint {self.config.commands})",
                    START_ERROR,
                )
            try:
                with socket.create_connection((host, self.config.ws_port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise HaltServer(f"the ingress did not listen on port {self.config.ws_port} within 15 s", START_ERROR)

    # -- main loop -------------------------------------------------------------------

    def run(self) -> int:
        raise_open_files_limit()  # the children inherit it (a worker holds a ring per call)
        try:
            self.start()
            while True:
                sig = self.sig_queue.pop(0) if self.sig_queue else None
                if sig is None:
                    self._sleep()
                    self.reap()
                    self.murder_workers()
                    self.manage_workers()
                    continue
                handler = getattr(self, f"handle_{signal.Signals(sig).name[3:].lower()}", None)
                if handler is not None:
                    handler()
        except StopIteration:
            self.stop(graceful=True)
            return 0
        except KeyboardInterrupt:
            self.stop(graceful=False)
            return 0
        except HaltServer as exc:
            log.error("farm halted (pid %d): %s", os.getpid(), exc.reason)
            self.stop(graceful=False)
            return exc.exit_status
        except Exception:
            # A bug of ours must not leave the broker, the ingress and the workers running
            # unsupervised: say it and stop them all (drained: the calls are not to blame).
            log.exception("unexpected error in the supervisor (pid %d): stopping the farm", os.getpid())
            self.stop(graceful=True)
            return 1

    def _sleep(self) -> None:
        try:
            ready = select.select([self.pipe[0]], [], [], 1.0)
            if ready[0]:
                while os.read(self.pipe[0], 64):
                    pass
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EINTR):
                raise

    def handle_term(self) -> None:
        raise StopIteration

    def handle_int(self) -> None:
        raise StopIteration

    def handle_quit(self) -> None:
        raise KeyboardInterrupt

    def handle_hup(self) -> None:
        # A reload would drop every call's recognizer state: not worth it. Say so.
        log.info("SIGHUP ignored: restart farm to change its configuration (pid %d)", os.getpid())

    def handle_chld(self) -> None:
        self.reap()

    def handle_ttin(self) -> None:
        self.num_workers += 1
        log.info("TTIN: %d workers (pid %d)", self.num_workers, os.getpid())

    def handle_ttou(self) -> None:
        if self.num_workers > 1:
            self.num_workers -= 1
            log.info("TTOU: %d workers (pid %d)", self.num_workers, os.getpid())

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            if child.popen is not None:
                child.popen.returncode = os.waitstatus_to_exitcode(status)
            code = os.waitstatus_to_exitcode(status)
            cause = f"killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
            if self.stopping:
                log.info("%s %s (pid %d)", child.role, cause, pid)
                continue
            log.warning("%s %d %s (pid %d)", child.role, child.index, cause, pid)
            early = time.monotonic() - child.started < _EARLY_DEATH_S
            if child.role == "worker":
                self.heartbeats.clear(child.index)
                self.boot_failures = self.boot_failures + 1 if early else 0
                if self.boot_failures >= _WORKER_BOOT_FAILURES:
                    raise HaltServer(
                        f"{self.boot_failures} workers in a row died right after their start: see the log above",
                        WORKER_BOOT_ERROR,
                    )
            elif early:
                hint = f": is port {self.config.ws_port} in use?" if child.role == "ingress" else ""
                raise HaltServer(f"the {child.role} {cause} right after its start{hint}", START_ERROR)
            else:
                if child.role == "ingress":
                    # Its calls are gone with it; free their rings before the new one starts.
                    removed = sweep_stale()
                    log.warning("ingress restarted: %d rings of its calls removed", len(removed))
                self._spawn_process(child.role, again=True)

    def murder_workers(self) -> None:
        """SIGABRT a worker whose loop stopped beating, then SIGKILL if it lingers."""
        now = time.monotonic()
        for child in list(self.children.values()):
            if child.role != "worker":
                continue
            if child.aborted:
                if now - child.aborted > 5:
                    self._kill(child.pid, signal.SIGKILL)
                continue
            age = self.heartbeats.age(child.index)
            limit = self.config.worker_timeout
            if now - child.started < _START_GRACE_S:
                limit = max(limit, _START_GRACE_S)
            if age > limit:
                log.critical("worker %d loop silent for %.1f s: SIGABRT (pid %d)", child.index, age, child.pid)
                child.aborted = now
                self._kill(child.pid, signal.SIGABRT)

    def manage_workers(self) -> None:
        running = sorted(c.index for c in self.children.values() if c.role == "worker")
        for index in range(self.num_workers):
            if index not in running:
                self._spawn_worker(index)
        for child in list(self.children.values()):
            if child.role == "worker" and child.index >= self.num_workers:
                self._kill(child.pid, STOP_SIGNAL)

    def _kill(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            self.children.pop(pid, None)

    # -- stop ------------------------------------------------------------------------

    def stop(self, graceful: bool = True) -> None:
        """Ingress first (drain), then workers, then the broker: STOP_SIGNAL, reap, KILL."""
        self.stopping = True
        ingress = [c for c in self.children.values() if c.role == "ingress"]
        for c in ingress:
            self._kill(c.pid, STOP_SIGNAL if graceful else signal.SIGKILL)
        self._reap_until(
            lambda: not any(c.role == "ingress" for c in self.children.values()), self.config.drain_timeout + 15
        )
        # Workers next: they finish the recognition their calls still hold (up to the drain
        # timeout) and publish it through the broker's relay, so the broker goes last.
        for c in list(self.children.values()):
            if c.role == "worker":
                self._kill(c.pid, STOP_SIGNAL)
        self._reap_until(
            lambda: not any(c.role == "worker" for c in self.children.values()), self.config.drain_timeout + 5.0
        )
        for c in list(self.children.values()):
            self._kill(c.pid, STOP_SIGNAL)
        self._reap_until(lambda: not self.children, 5.0)
        for c in list(self.children.values()):
            log.warning("%s did not stop: SIGKILL (pid %d)", c.role, c.pid)
            self._kill(c.pid, signal.SIGKILL)
        self._reap_until(lambda: not self.children, 2.0)
        removed = sweep_stale()
        if removed:
            log.info("removed %d rings left behind", len(removed))
        if self.config.run_dir.startswith(tempfile.gettempdir()):
            shutil.rmtree(self.config.run_dir, ignore_errors=True)
        log.info("farm stopped (pid %d)", os.getpid())

    def _reap_until(self, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)


def _signal_name(number: int) -> str:
    """``SIGKILL``; real-time signals, which have no name of their own: ``SIGRTMIN+1``."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIGRTMIN+{number - signal.SIGRTMIN}" if number > signal.SIGRTMIN else f"signal {number}"


def run(config: Config) -> int:
    """Run a node until it is stopped; returns the process exit code."""
    if not config.run_dir:
        config = config.replace(run_dir=tempfile.mkdtemp(prefix=f"farm-{os.getpid()}-"))
    if not config.node_id:
        config = config.replace(node_id=socket.gethostname())
    os.makedirs(config.run_dir, exist_ok=True)
    name_process("supervisor")
    return Supervisor(config).run()
