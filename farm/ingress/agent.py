"""HAProxy's agent-check: how many more calls this node takes, one line per connection.

HAProxy (``server ... agent-check agent-port 8086 agent-inter 2s``) connects, reads one
line and closes; farm answers and closes without reading (whatever ``agent-send`` sends
is ignored, so garbage there changes nothing). The line is HAProxy's agent protocol:

- ``ready up 60% maxconn:12``: taking calls; the weight is the share of the node's
  capacity still free (free / capacity, at least 1 % while one call fits), ``maxconn`` its
  capacity in calls, as the broker works it out from the measured CPU per call-second
  (deploy/haproxy/haproxy.cfg). Without a capacity (``--admission-cpu 0``) it is
  ``ready up 100%``.
- ``ready up 0%``: full (a call more would be refused: its CPUs or recognition lag),
  so no new calls, none cut.
- ``ready down``: the node cannot transcribe (no worker, the broker silent, the canary failing).
- ``drain``: SIGTERM, the node is draining: its calls finish, new ones go elsewhere.

``ready`` comes first in every line but the draining one, so a node back from a
``drain`` (a cancelled stop) is taken again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from farm.config import Config
from farm.ingress.calls import CallRegistry


__all__ = ["agent_reply", "AgentSite"]

log = logging.getLogger("farm.ingress.agent")


def agent_reply(draining: bool, not_ready: bool, refusing: bool, active: int, capacity: int) -> str:
    """The agent-check line for a node in this state (see the module docstring)."""
    if draining:
        return "drain\n"
    if not_ready:
        return "ready down\n"
    maxconn = f" maxconn:{capacity}" if capacity else ""
    if refusing:
        return f"ready up 0%{maxconn}\n"
    if not capacity:
        return "ready up 100%\n"
    free = max(0, capacity - active)
    weight = 0 if not free else max(1, round(100 * free / capacity))
    return f"ready up {weight}%{maxconn}\n"


class AgentSite:
    """The agent-check port (``--agent-port``, 0: off)."""

    def __init__(self, config: Config, registry: CallRegistry, draining: Callable[[], bool]) -> None:
        self.config = config
        self.registry = registry
        self.draining = draining
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        if self.config.agent_port:
            self.server = await asyncio.start_server(self._answer, self.config.ws_host, self.config.agent_port)
            log.info("HAProxy agent-check on %s:%d", self.config.ws_host, self.config.agent_port)

    def reply(self) -> str:
        registry = self.registry
        refusing = registry.link.overloaded or bool(registry.full)
        return agent_reply(
            self.draining(), bool(registry.recognition_ready), refusing, registry.active, registry.link.status.capacity
        )

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self.reply().encode())
            await asyncio.wait_for(writer.drain(), 5.0)
        except (ConnectionError, TimeoutError):
            pass  # HAProxy went away first: its next check asks again
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
