"""The LLM fallback, wired in: finals no intent rule matched, classified by Ollama.

Where it runs: in the ingress, never on a worker. A worker's loop is the calls' media
path (VAD, recognition, the barge-in decision); an HTTP exchange of a second or more has
no place there. The ingress already hears every event (it relays them to the calls'
connections), runs asyncio, and has what the prompt needs: each call's info, from which
its worker read the call's intents (:func:`farm.call_options.call_option`), and the
node's ``--intents`` (:class:`farm.intents.IntentLibrary`). A separate process
subscribed to the event stream would need the same, plus a supervisor's care and a
socket to publish on.

The flow. A worker marks a final ``llm_intent: true`` when the call has intents and no
rule reported its utterance, neither early nor on the final
(:meth:`workers.analysis.CallAnalysis.ask_llm`). When that final comes back from the
relay (:meth:`LlmIntents.seen`: already published to every subscriber and sent on the
call's own connection), the ingress asks :class:`farm.llm.OllamaClient` on a task of
its own, and publishes what it answers as an ``intent`` event: source ``"llm"``,
``final_seq`` the final's seq, the intent or ``unknown`` with a ``reason``
(farm.llm.REASONS; ``no_rules`` if the call's intents cannot be read here).

Why a slow or dead LLM delays nothing: the final is out before the question is asked;
the relay's loop only starts a task and goes on; a barge-in is the worker's flush
request through the broker link, another task; and each answer is bounded
(``--llm-budget-ms``, then ``timeout``; ``--llm-max-concurrent`` requests in flight,
past them ``busy`` at once: nothing queues).

``call_end`` stays a call's last event: a question still open when it comes is cancelled
and nothing is published for it; an answer for a call whose ring is already marked closed
(its worker may be saying call_end right now, on another pipe) is not published either.
Both count as outcome ``call_ended``. A final the call's end made (reason ``end``) is not
marked at all: its call_end follows at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from farm.broker import wire
from farm.call_options import call_metadata, call_option
from farm.config import Config
from farm.ingress.metrics import Metrics
from farm.intents import UNKNOWN, IntentLibrary, IntentMatch, IntentRules
from farm.llm import OllamaClient
from farm.protocol.events import Event


if TYPE_CHECKING:
    from farm.ingress.calls import Call


__all__ = ["LlmIntents"]

log = logging.getLogger("farm.ingress.llm")

_NOT_ASKED = ("busy", "empty", "no_rules")  # answered without a request: no latency to observe


class LlmIntents:
    """The ingress's LLM questions: one task per marked final, dropped with their call."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        find: Callable[[str], Call | None],
        publish: Callable[[Event], None],
    ) -> None:
        self.client = OllamaClient(
            config.llm_url,
            config.llm_model,
            budget=config.llm_budget_ms / 1000,
            max_concurrent=config.llm_max_concurrent,
        )
        self.library = IntentLibrary(config.intents)  # checked by `farm up`
        self.metrics = metrics
        self.find = find
        self.publish = publish
        self.asking: dict[str, set[asyncio.Task[None]]] = {}  # call id -> its open questions
        self._rules: dict[str, IntentRules | None] = {}  # call id -> its intents, read once

    def seen(self, event: Event) -> None:
        """Every event from the relay, once delivered (CallRegistry._seen)."""
        if event.type == "call_end":
            self._forget(event.call_id)
        elif event.type == "final" and event.get("llm_intent") is True and event.channel == 0:
            call = self.find(event.call_id)
            if call is None or call.canary:
                return  # not a call of this ingress (a restarted one): nowhere to say it; or the canary
            task = asyncio.create_task(self._ask(call, event), name=f"llm {event.call_id}")
            tasks = self.asking.setdefault(event.call_id, set())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _ask(self, call: Call, final: Event) -> None:
        started = time.monotonic()
        rules = self._rules_of(call)
        try:
            if rules is None:
                match = IntentMatch(UNKNOWN, str(final.get("text", "")), source="llm", reason="no_rules")
            else:
                match = await self.client.classify(str(final.get("text", "")), rules)
        except asyncio.CancelledError:
            self.metrics.llm_outcomes["call_ended"] += 1
            raise
        if match.reason not in _NOT_ASKED:
            self.metrics.llm_latency.observe(time.monotonic() - started)
        now = self.find(call.call_id)
        if now is None or (now.closed_at and now.closing is None):
            # Its ring is marked closed: the worker may be publishing call_end this moment.
            self.metrics.llm_outcomes["call_ended"] += 1
            return
        self.metrics.llm_outcomes["intent" if not match.reason else match.reason] += 1
        audio = final.get("audio_ms")
        offset = audio[1] if isinstance(audio, list) and len(audio) == 2 else final.offset_ms  # as the rules' intent
        data = {**match.to_dict(), "final_seq": final.seq}
        self.publish(Event("intent", call.call_id, 0, int(offset), data, {"recv": time.monotonic_ns()}))

    def _rules_of(self, call: Call) -> IntentRules | None:
        """The call's intents as its worker read them: from its info, or the node's default."""
        if call.call_id not in self._rules:
            try:
                asked = call_option(call_metadata(wire.decode_info(call.info)), "intents")
                self._rules[call.call_id] = self.library.for_call(asked)
            except ValueError as exc:  # the worker said so in an error event already
                log.debug("no intents for the llm: %s", exc, extra={"call_id": call.call_id})
                self._rules[call.call_id] = None
        return self._rules[call.call_id]

    def _forget(self, call_id: str) -> None:
        self._rules.pop(call_id, None)
        for task in self.asking.pop(call_id, ()):
            task.cancel()

    def close(self) -> None:
        for call_id in list(self.asking):
            self._forget(call_id)
