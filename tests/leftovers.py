"""What the tests leave behind: processes, shared-memory rings, listening sockets, network namespaces.

tests/conftest.py takes a snapshot when a test module starts and checks it when the
module has stopped what it started (and once more at the end of the run), so a node,
a ring or a server that outlives its tests fails the run and names its module.

Only what this test run made counts, so other work on the machine never fails it:
processes carry the run's ``FARM_TEST_SESSION`` marker in their environment (every
process the tests start inherits it); rings are those that appeared since the
snapshot and belong to this run (named after this process, ``farm-test-…``, or after
a pid that is one of this run's processes or is gone); sockets are this process's own;
network namespaces are those named after this process (tests/netns.py).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass


__all__ = ["Snapshot", "snapshot", "leftovers_since"]

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp
_UNIX_ACCEPTCON = 0x10000  # __SO_ACCEPTCON in /proc/net/unix: a listening unix socket


@dataclass(frozen=True)
class Snapshot:
    rings: frozenset[str]
    sockets: frozenset[int]  # inodes of this process's listening sockets


def _marked_processes(marker: bytes) -> list[tuple[int, str]]:
    """Live (not zombie) processes other than this one whose environment holds ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            if "multiprocessing.resource_tracker" in cmd:
                continue  # the stdlib's helper of this process (shared memory): ends with it
            found.append((int(entry), cmd))
        except OSError:
            continue  # gone meanwhile
    return found


def _own_namespaces() -> list[str]:
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return []
    return sorted(n for n in names if n.startswith(f"farm-test-{os.getpid()}-"))


def _farm_rings() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("farm-")}


def _listening_inodes() -> set[int]:
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                for line in f.readlines()[1:]:
                    cols = line.split()
                    if cols[3] == _LISTEN:
                        inodes.add(int(cols[9]))
        except OSError:
            pass
    try:
        with open("/proc/net/unix", encoding="ascii", errors="replace") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if int(cols[3], 16) & _UNIX_ACCEPTCON:
                    inodes.add(int(cols[6]))
    except OSError:
        pass
    return inodes


def _own_listening_sockets() -> set[int]:
    listening = _listening_inodes()
    own = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if m and int(m.group(1)) in listening:
            own.add(int(m.group(1)))
    return own


def snapshot() -> Snapshot:
    return Snapshot(frozenset(_farm_rings()), frozenset(_own_listening_sockets()))


def _ours(ring: str, pids: set[int]) -> bool:
    # Tests name their own rings farm-test-<pid>-...; the farm names them farm-<pid>-...
    m = re.match(r"farm-(?:test-)?(\d+)-", ring)
    if not m:
        return False
    pid = int(m.group(1))
    return pid == os.getpid() or pid in pids or not os.path.exists(f"/proc/{pid}")


def leftovers_since(before: Snapshot, marker: str, pids: set[int], wait: float) -> list[str]:
    """What this run left since ``before``; waits up to ``wait`` s for things still going away."""
    deadline = time.monotonic() + wait
    while True:
        found = [f"process {pid} still running: {cmd}" for pid, cmd in _marked_processes(marker.encode())]
        found += [f"ring /dev/shm/{r} left behind" for r in sorted(_farm_rings() - before.rings) if _ours(r, pids)]
        found += [
            f"a listening socket (inode {i}) left open" for i in sorted(_own_listening_sockets() - before.sockets)
        ]
        found += [f"network namespace {n} left behind" for n in _own_namespaces()]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)
