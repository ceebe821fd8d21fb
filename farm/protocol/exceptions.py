"""Errors of the protocol layer (:mod:`farm.protocol`), split by blame.

Hierarchy::

    Exception
     └── ProtocolError            anything wrong at the protocol layer
          ├── RemoteProtocolError the peer (FreeSWITCH, a module) sent bytes that break
          │                       the protocol; a parser records it in ``parser_exc``
          │                       and stops, it is never raised out of ``receive_data``
          └── LocalProtocolError  we misused a codec: an argument that cannot be put on
                                  the wire, or a call in the wrong state; raised at once

Messages are lowercase, have no final period and carry the numbers involved
(HOUSE_STYLE.md point 8). They are for logs only, never for the wire.
"""

from __future__ import annotations


__all__ = [
    "ProtocolError",
    "RemoteProtocolError",
    "LocalProtocolError",
]


class ProtocolError(Exception):
    """Base class of every protocol-layer error; catch this to catch both blames."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow: drop the connection."""


class LocalProtocolError(ProtocolError):
    """Our own code asked for something the protocol cannot express: a bug on our side."""
