"""The processes of ``farm up`` end with their supervisor.

A supervisor that dies without stopping them (SIGKILL, the OOM killer, a crash) must not
leave a broker, an ingress or workers serving on their own: the next ``farm up`` would
find its ports taken, and nobody would restart or stop them. Two ways, as neither alone
is enough (gunicorn's workers do the second):

* Linux sends each child a signal the moment its parent dies (``prctl(PR_SET_PDEATHSIG)``,
  set by the child itself at its start);
* each child's loop checks that its parent is still the one that started it, which also
  covers other systems and a parent that died before the child's ``prctl``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys


__all__ = ["PARENT_ENV", "STOP_SIGNAL", "die_with_parent", "obey_supervisor_only", "orphaned", "parent_from_env"]

# The supervisor's pid, in the environment of the children it starts as new interpreters.
PARENT_ENV = "FARM_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# What the supervisor sends a child to stop it (gracefully). Not SIGTERM: SIGTERM and SIGINT
# reach every process of the group at once (``kill -- -PGID``, Ctrl-C in a terminal), and
# a worker or broker that stopped then would go before the ingress drained its calls; so a
# child under a supervisor ignores them and waits for the supervisor, which drains in order.
STOP_SIGNAL = signal.SIGUSR1


def parent_from_env() -> int:
    """The supervisor's pid from :data:`PARENT_ENV`; 0 when run on its own."""
    try:
        return int(os.environ.get(PARENT_ENV, "0"))
    except ValueError:
        return 0


def obey_supervisor_only(parent: int) -> int:
    """Ignore the group's SIGTERM and SIGINT under a supervisor; the signal that stops this
    process: :data:`STOP_SIGNAL` under supervisor ``parent``, SIGTERM on its own (0)."""
    if not parent:
        return signal.SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return STOP_SIGNAL


def die_with_parent(parent: int, sig: int = STOP_SIGNAL) -> bool:
    """Have ``sig`` sent to this process when its parent dies; call once, at the start.

    Returns False when ``parent`` is not this process's parent any more (it died before
    the signal was set up): the caller exits. A ``parent`` of 0 means none to watch.
    """
    if not parent:
        return True
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the parent-pid checks remain
    return not orphaned(parent)


def orphaned(parent: int) -> bool:
    """Whether the supervisor ``parent`` (0: none) is gone: the process was re-parented."""
    return bool(parent) and os.getppid() != parent
