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


__all__ = ["PARENT_ENV", "die_with_parent", "orphaned", "parent_from_env"]

# The supervisor's pid, in the environment of the children it starts as new interpreters.
PARENT_ENV = "FARM_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def parent_from_env() -> int:
    """The supervisor's pid from :data:`PARENT_ENV`; 0 when run on its own."""
    try:
        return int(os.environ.get(PARENT_ENV, "0"))
    except ValueError:
        return 0


def die_with_parent(parent: int, sig: int = signal.SIGTERM) -> bool:
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
