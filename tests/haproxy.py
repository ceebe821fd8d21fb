"""A real HAProxy (Debian's package) for the tests, and how they ask it what it sees.

tests/test_agent.py runs one on loopback in front of nodes on this host's loopback;
tests/test_multinode.py runs deploy/haproxy/haproxy.cfg in a network namespace of its own
(tests/netns.py) in front of nodes in theirs. Both read the servers' state from its stats
socket, a unix socket in the test's temporary directory.
"""

from __future__ import annotations

import csv
import io
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .conftest import MS


__all__ = ["HAProxy", "wait_for"]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60_000 * MS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.1)


class HAProxy:
    """HAProxy run with ``config`` (its ``global`` section gets an admin stats socket)."""

    def __init__(self, tmp: Path, config: str, *, netns: str = "", backend: str = "farm_nodes") -> None:
        self.sock = tmp / "haproxy.sock"
        self.backend = backend
        head, found, rest = config.partition("global\n")
        assert found, "no global section"
        path = tmp / "haproxy.cfg"
        path.write_text(f"{head}global\n    stats socket {self.sock} level admin\n{rest}")
        self.path = path
        self.proc = subprocess.Popen(
            [*(["ip", "netns", "exec", netns] if netns else []), "haproxy", "-db", "-f", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_for(lambda: self.sock.exists() or self.proc.poll() is not None, "HAProxy's stats socket")
        assert self.proc.poll() is None, self.proc.communicate()[1].decode(errors="replace")

    def ask(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.sock))
            s.sendall(command.encode() + b"\n")
            return b"".join(iter(lambda: s.recv(65536), b"")).decode()

    def stat(self, server: str) -> dict[str, str]:
        rows = csv.DictReader(io.StringIO(self.ask("show stat").lstrip("# ")))
        return next(r for r in rows if r["pxname"] == self.backend and r["svname"] == server)

    def drained(self, server: str) -> bool:
        """The server's admin state has HAProxy's drain flag (SRV_ADMF_FDRAIN, 0x08), which
        stays while its health check also fails (/readyz says draining)."""
        lines = self.ask(f"show servers state {self.backend}").splitlines()
        header = lines[1].lstrip("# ").split()
        for line in lines[2:]:
            row = dict(zip(header, line.split(), strict=False))
            if row.get("srv_name") == server:
                return bool(int(row["srv_admin_state"]) & 0x08)
        raise AssertionError(f"no server {server} in {lines}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
