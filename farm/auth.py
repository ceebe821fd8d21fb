"""Who may stream: tokens on the WebSocket, vosk and HTTP ports, addresses on the Event Socket.

mod_audio_stream can send only a URL (and, in the amigniter build, extra headers), so a
stream shows its token as ``?token=…`` in the URL or as ``Authorization: Bearer …``;
vosk-server clients and ``POST /transcribe`` do the same. FreeSWITCH's outbound Event
Socket carries no credential at all: it connects from known machines, so that port takes
an allow-list of networks. Refusals are logged once per peer address (a misconfigured
dialer retries every call), and counted by the sites as refusals.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit


__all__ = ["AllowList", "Tokens", "UNAUTHORIZED", "once_per_peer", "without_token"]

UNAUTHORIZED = "farm: a valid token is required (?token=... in the URL, or Authorization: Bearer ...)\n"

log = logging.getLogger("farm.auth")

_LOGGED_PEERS = 4096  # peers remembered as already logged (the oldest are forgotten)
_logged: OrderedDict[tuple[str, str], None] = OrderedDict()


def once_per_peer(peer: str, what: str) -> None:
    """Log ``what`` about ``peer`` the first time only (bounded memory)."""
    key = (peer, what)
    if key in _logged:
        return
    _logged[key] = None
    if len(_logged) > _LOGGED_PEERS:
        _logged.popitem(last=False)
    log.warning("refused %s: %s (logged once per address)", peer, what)


def without_token(target: str) -> str:
    """``target`` (a request's path and query) as events may show it: no ``token``."""
    url = urlsplit(target)
    if "token" not in parse_qs(url.query):
        return target
    query = urlencode([(k, v) for k, v in parse_qsl(url.query, keep_blank_values=True) if k != "token"])
    return urlunsplit(url._replace(query=query))


class Tokens:
    """The tokens a stream may show; none means no check."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = [t.encode() for t in tokens]

    @classmethod
    def from_spec(cls, spec: str) -> Tokens:
        """``a,b,c`` or ``@FILE`` (one token per line, ``#`` comments); ValueError if unusable."""
        if spec.startswith("@"):
            try:
                lines = Path(spec[1:]).read_text().splitlines()
            except OSError as exc:
                raise ValueError(f"cannot read the tokens file: {exc}") from None
            tokens = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            if not tokens:
                raise ValueError(f"no token in {spec[1:]}")
        else:
            tokens = [t.strip() for t in spec.split(",") if t.strip()]
        if any(len(t) < 8 for t in tokens):
            raise ValueError("a token must have at least 8 characters")
        return cls(tokens)

    def allows(self, target: str, authorization: str | None) -> bool:
        """Whether the request for ``target`` (path and query) with that Authorization header
        shows a valid token (always, when none is required). Compared in constant time."""
        return self.credential(target, authorization) is not None

    def credential(self, target: str, authorization: str | None) -> str | None:
        """Who the request is, by the token it shows: the token's fingerprint (a hash: the
        token itself is never published), ``""`` when no token is required, None when it
        shows no valid one. A call id belongs to the credential that opened it."""
        if not self._tokens:
            return ""
        shown = [v.encode() for v in parse_qs(urlsplit(target).query).get("token", [])]
        scheme, _, credential = (authorization or "").strip().partition(" ")
        if scheme.lower() == "bearer" and credential.strip():
            shown.append(credential.strip().encode())
        for token in self._tokens:
            if any(hmac.compare_digest(s, token) for s in shown):
                return fingerprint(token)
        return None


def fingerprint(token: bytes) -> str:
    """A token's name in events and logs: 12 hex digits of its SHA-256."""
    return hashlib.sha256(token).hexdigest()[:12]


class AllowList:
    """Networks that may connect; none means anyone."""

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self.networks = list(networks)

    @classmethod
    def from_spec(cls, spec: str) -> AllowList:
        """``10.0.0.0/8,192.0.2.7`` (an address is a network of one); ValueError if not."""
        try:
            return cls(ipaddress.ip_network(n.strip(), strict=False) for n in spec.split(",") if n.strip())
        except ValueError as exc:
            raise ValueError(f"not a network: {exc}") from None

    def allows(self, host: str) -> bool:
        if not self.networks:
            return True
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in n for n in self.networks)
