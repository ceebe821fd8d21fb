"""TLS on the WebSocket, vosk and HTTP ports: ``wss://`` for mod_audio_stream (which
supports it) and for vosk clients, HTTPS for ``POST /transcribe``.

The certificate and key come from files (``--tls-cert``, ``--tls-key``). Certificates are
renewed while calls run (ACME every few weeks), so the ingress looks at the files' times
every ``RELOAD_CHECK_S`` and loads a new pair into the same context: new connections get
it, connections already open keep theirs. A pair that does not load is logged and the
old one stays.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl


__all__ = ["RELOAD_CHECK_S", "CertificateFiles", "server_context"]

log = logging.getLogger("farm.tls")

RELOAD_CHECK_S = 2.0


def server_context(cert: str, key: str) -> ssl.SSLContext | None:
    """A server context with the pair loaded, or None without a certificate; raises
    ValueError with the reason if the pair does not load."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise ValueError("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _load(context, cert, key)
    return context


def _load(context: ssl.SSLContext, cert: str, key: str) -> None:
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the certificate {cert} and key {key}: {exc}") from None


class CertificateFiles:
    """Reloads a context's pair when its files change."""

    def __init__(self, context: ssl.SSLContext, cert: str, key: str) -> None:
        self.context, self.cert, self.key = context, cert, key
        self.seen = self._times()

    def _times(self) -> tuple[float, float]:
        try:
            return os.stat(self.cert).st_mtime, os.stat(self.key).st_mtime
        except OSError:
            return self.seen if hasattr(self, "seen") else (0.0, 0.0)

    def check(self) -> bool:
        """Load the pair again if a file changed; True when a new pair is in use."""
        times = self._times()
        if times == self.seen:
            return False
        self.seen = times
        try:
            _load(self.context, self.cert, self.key)
        except ValueError as exc:
            log.warning("%s; the previous certificate stays in use", exc)
            return False
        log.info("certificate %s loaded again: new connections get it", self.cert)
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_CHECK_S)
            self.check()
