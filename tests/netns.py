"""Several hosts on one machine for the tests: Linux network namespaces (``ip netns``).

:class:`Lan` makes a hub namespace with a bridge (the balancer's and the dialer's host:
HAProxy, the FreeSWITCH peers and the test's own clients run there) and one namespace
per node, each joined to the bridge by a veth pair, on 10.0.0.0/24 as
deploy/haproxy/haproxy.cfg has it (hub 10.0.0.1, nodes 10.0.0.11, .12, ...). Those
addresses exist only inside the namespaces made here, whose names carry this test
process's pid (``farm-test-<pid>-...``): two test runs side by side never meet, and the
machine's own network is not touched. :meth:`Lan.remove` kills what still runs in them
and deletes them (their veths and bridge go with them); tests/leftovers.py fails a run
that leaves one behind.

:func:`inside` runs a block of this process in a namespace (setns(2) on the calling
thread): sockets made there stay in it. A ZeroMQ context has I/O threads of its own,
made with its first socket, that connect in the namespace of the thread that made
them: make one inside the block (``zmq.asyncio.Context()``), not ``Context.instance()``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator


__all__ = ["Lan", "inside", "missing", "prefix"]

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def prefix() -> str:
    """The start of the names of this test run's namespaces."""
    return f"farm-test-{os.getpid()}-"


def missing() -> str:
    """Why namespaces cannot be made here ("" if they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "no ip command (iproute2)"
    return ""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def inside(name: str) -> Iterator[None]:
    """Run the block in the network namespace ``name`` (this thread only)."""
    with open("/proc/thread-self/ns/net", "rb") as home, open(f"/run/netns/{name}", "rb") as there:
        if _libc.setns(there.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
        try:
            yield
        finally:
            if _libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back home")


class Lan:
    """A hub namespace and one namespace per node on one bridge (see the module docstring)."""

    def __init__(self, nodes: list[str]) -> None:
        self.hub = f"{prefix()}hub"
        self.namespaces: dict[str, str] = {}  # node -> its namespace
        self.addresses: dict[str, str] = {}  # node -> its address
        try:
            _ip("netns", "add", self.hub)
            _ip("-n", self.hub, "link", "set", "lo", "up")
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "addr", "add", "10.0.0.1/24", "dev", "br0")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            for i, node in enumerate(nodes):
                ns, address = f"{prefix()}{node}", f"10.0.0.{11 + i}"
                _ip("netns", "add", ns)
                self.namespaces[node] = ns
                _ip("-n", ns, "link", "set", "lo", "up")
                # Made in the hub with its peer moved straight into the node: no name in the host's namespace.
                _ip("-n", self.hub, "link", "add", f"v{node}", "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("-n", self.hub, "link", "set", f"v{node}", "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                self.addresses[node] = address
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Kill what still runs in the namespaces, then delete them."""
        for ns in [*self.namespaces.values(), self.hub]:
            if not os.path.exists(f"/run/netns/{ns}"):
                continue
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30).stdout
            for pid in pids.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
