"""Open-file limits: every call holds descriptors (its connection, its ring), in the
ingress and in the worker that serves it, so each farm process raises its soft limit to
the hard one when it starts (the supervisor first: its children inherit it)."""

from __future__ import annotations

import resource


__all__ = ["raise_open_files_limit"]


def raise_open_files_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # hard "unlimited" above what the kernel allows
            pass
    return soft
