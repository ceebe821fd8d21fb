"""What a call asks for with itself: options read from its metadata.

A call says what it wants in mod_audio_stream's metadata (JSON, typed) or URL query, or
as ``farm_*`` channel variables of a mod_socket_audio call (text: "true", "0", a JSON
object). The worker reads them (workers/analysis.py: AMD, tones, intents) and so does
the ingress (the LLM fallback prompts with the call's intents, farm/ingress/llm_intents.py):
one reading, so both see the same options.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


__all__ = ["call_metadata", "call_option"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def call_metadata(info: Mapping[str, Any]) -> Mapping[str, Any]:
    """The metadata in a call's info (what the ingress told the broker of it), or {}."""
    metadata = info.get("metadata")
    return metadata if isinstance(metadata, Mapping) else {}


def _value(raw: Any) -> Any:
    """A per-call option as sent: JSON metadata gives it typed; a URL query or a channel
    variable gives text ("true", "0", a JSON object)."""
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    if text.startswith("{"):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not a JSON object ({exc})") from None
    return text


def call_option(metadata: Mapping[str, Any], key: str) -> Any:
    """Option ``key`` (or ``farm_<key>``) as a typed value, None if the call did not say;
    raises ValueError for a JSON object that does not parse."""
    for name in (key, "farm_" + key):
        if name in metadata:
            return _value(metadata[name])
    return None
