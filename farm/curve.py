"""CURVE on the event and command endpoints: only clients with a known key subscribe or command.

Without ``--curve-dir`` those endpoints are loopback and open to any local process (the
defaults). With it, the events XPUB (the broker's relay) and the command ROUTER (the
ingress) are CURVE servers, and a ZAP handler in each process admits the clients whose
public key is in the directory. The layout is pyzmq's (:func:`zmq.auth.create_certificates`),
made by ``farm keys``::

    DIR/server.key, DIR/server.key_secret   the node's keypair
    DIR/clients/NAME.key                    each admitted client's public key
    DIR/clients/NAME.key_secret             (``farm keys`` leaves the client's secret there too,
                                            to hand to the dialer app; not needed by farm)

The clients directory is read at each new connection: adding or removing a key takes
effect without a restart. The node's own subscriber (the ingress relaying events to
FreeSWITCH) uses the server keypair, which is always admitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.auth.thread import ThreadAuthenticator


__all__ = [
    "Keys",
    "admitted",
    "client_keys",
    "client_socket",
    "make_keys",
    "node_keys",
    "server_socket",
    "start_async_authenticator",
    "start_authenticator",
]

SERVER = "server"
CLIENTS = "clients"


@dataclass(frozen=True)
class Keys:
    """A CURVE keypair (z85), and for a client, the server's public key it expects."""

    public: bytes
    secret: bytes
    server: bytes = b""


def _pair(secret_file: Path) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the CURVE keypair {secret_file}: {exc}") from None
    if not secret:
        raise ValueError(f"{secret_file} holds no secret key")
    return public, secret


def node_keys(directory: str) -> Keys:
    """The node's keypair (``DIR/server.key_secret``); ValueError if it is not there."""
    public, secret = _pair(Path(directory) / f"{SERVER}.key_secret")
    return Keys(public, secret, public)


def client_keys(directory: str, name: str) -> Keys:
    """A client's keypair made by ``farm keys DIR NAME``, with the node's public key."""
    public, secret = _pair(Path(directory) / CLIENTS / f"{name}.key_secret")
    server, _ = zmq.auth.load_certificate(Path(directory) / f"{SERVER}.key")
    return Keys(public, secret, server)


def admitted(directory: str) -> set[bytes]:
    """Public keys (z85) admitted now: the clients' and the node's own."""
    keys = {node_keys(directory).public}
    for path in sorted((Path(directory) / CLIENTS).glob("*.key")):
        try:
            keys.add(zmq.auth.load_certificate(path)[0])
        except (OSError, ValueError):
            continue  # a half-written file: admitted at the next connection
    return keys


def make_keys(directory: str, clients: list[str]) -> list[Path]:
    """Create the node's keypair (if missing) and one per client name; the files made."""
    root = Path(directory)
    (root / CLIENTS).mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    if not (root / f"{SERVER}.key_secret").exists():
        made += [Path(p) for p in zmq.auth.create_certificates(root, SERVER)]
    for name in clients:
        made += [Path(p) for p in zmq.auth.create_certificates(root / CLIENTS, name)]
    return made


class _Provider:
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def callback(self, domain: str, key: bytes) -> bool:
        return key in admitted(self.directory)


def start_authenticator(ctx: zmq.Context[zmq.Socket[bytes]], directory: str) -> ThreadAuthenticator:
    """The ZAP handler of a process with a synchronous context (the broker)."""
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=_Provider(directory))
    return auth


def start_async_authenticator(ctx: zmq.asyncio.Context, directory: str) -> AsyncioAuthenticator:
    """The ZAP handler of a process with an asyncio context (the ingress)."""
    auth = AsyncioAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=_Provider(directory))
    return auth


def server_socket(sock: zmq.Socket[Any], keys: Keys) -> None:
    """Make ``sock`` (before it binds) a CURVE server with the node's keypair."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def client_socket(sock: zmq.Socket[Any], keys: Keys) -> None:
    """Make ``sock`` (before it connects) a CURVE client of the server ``keys.server``."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server
