"""Names an operator tells processes apart by: ``ps`` and ``top`` show ``farm: supervisor``,
``farm: broker``, ``farm: ingress``, ``farm: worker 0`` ... (setproctitle, from PyPI).

``SPT_NOENV`` keeps setproctitle off /proc/PID/environ (it would otherwise reuse that
memory for a long title, and tools that read a process's environment, the tests' leftover
check among them, would see garbage): a title then fits in the original command line,
which these short names always do.
"""

from __future__ import annotations

import os


__all__ = ["name_process"]


def name_process(role: str) -> None:
    os.environ.setdefault("SPT_NOENV", "1")  # read by setproctitle when it first sets a title
    import setproctitle

    setproctitle.setproctitle(f"farm: {role}")
