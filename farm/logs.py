"""Logging set-up shared by every farm process: one line per record, pid in every line."""

from __future__ import annotations

import logging
import sys


__all__ = ["setup_logging"]


def setup_logging(level: str = "INFO", role: str = "") -> None:
    """Configure the root logger; call once at the start of each process."""
    fmt = f"%(asctime)s %(levelname)-7s {role or '%(processName)s'}[%(process)d] %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # websockets logs every failed handshake at ERROR with a traceback; our own lines say it.
    logging.getLogger("websockets").setLevel(logging.CRITICAL)
