"""Errors of the protocol layer (:mod:`farm.protocol`), split by blame.

Hierarchy::

    Exception
     └── ProtocolError              anything wrong at the protocol layer
          ├── RemoteProtocolError   the peer (FreeSWITCH, a module) sent bytes that break
          │    │                    the protocol; a parser records it in ``parser_exc``
          │    │                    and stops, it is never raised out of ``receive_data``
          │    ├── AudioStreamError a mod_audio_stream connection cannot be served
          │    │                    (PROTOCOLS.md §1); ``code`` closes the WebSocket
          │    └── VoskServerError  a vosk-server client broke its protocol; ``code``
          │                         closes the WebSocket
          └── LocalProtocolError    we misused a codec: an argument that cannot be put on
                                    the wire, or a call in the wrong state; raised at once

The WebSocket close codes (RFC 6455 §7.4.1) the two WebSocket errors carry are
defined here, once.

Messages are lowercase, have no final period and carry the numbers involved
(HOUSE_STYLE.md point 8). They are for logs; what goes into a Close frame is the
message itself, so it never holds internal details.
"""

from __future__ import annotations


__all__ = [
    "ProtocolError",
    "RemoteProtocolError",
    "LocalProtocolError",
    "AudioStreamError",
    "VoskServerError",
    "CLOSE_GOING_AWAY",
    "CLOSE_UNSUPPORTED",
    "CLOSE_INVALID",
    "CLOSE_POLICY",
]

CLOSE_GOING_AWAY = 1001  # the server is shutting down
CLOSE_UNSUPPORTED = 1003  # data the endpoint cannot accept (rate, channels, unknown message)
CLOSE_INVALID = 1007  # payload not consistent with the message type (bad JSON)
CLOSE_POLICY = 1008  # policy violation (idle, limits)


class ProtocolError(Exception):
    """Base class of every protocol-layer error; catch this to catch both blames."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow: drop the connection."""


class LocalProtocolError(ProtocolError):
    """Our own code asked for something the protocol cannot express: a bug on our side."""


class _WebSocketError(RemoteProtocolError):
    def __init__(self, message: str, code: int = CLOSE_UNSUPPORTED) -> None:
        super().__init__(message)
        self.code = code


class AudioStreamError(_WebSocketError):
    """The stream cannot be served; ``code`` and the message go into the Close frame."""


class VoskServerError(_WebSocketError):
    """The client broke the protocol; ``code`` and the message go into the Close frame."""
