"""How a :class:`~farm.config.Config` field becomes a knob: its metadata (:func:`knob`) and
the checks ``farm up`` runs on its value before starting anything (each returns what is
wrong with a value, or None). :mod:`farm.knobs` turns the metadata into flags, environment
variables and README's table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from farm.llm import parse_url


__all__ = ["knob", "at_least", "within", "ms_step", "port_range", "port", "parses", "curve_keys", "llm_url"]


def at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be >= {low:g}, got {v}"


def within(low: float, high: float) -> Callable[[Any], str | None]:
    return lambda v: None if low <= v <= high else f"must be within {low:g}-{high:g}, got {v}"


def ms_step(v: int) -> str | None:
    return None if v >= 0 and v % 20 == 0 else f"must be a non-negative multiple of 20 ms, got {v}"


def port_range(v: str) -> str | None:
    if not v:
        return None
    low, _, high = v.partition("-")
    if low.isdigit() and (high or low).isdigit() and 0 < int(low) <= int(high or low) <= 65535:
        return None
    return f"must be FIRST-LAST within 1-65535, got {v!r}"


def port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else f"must be a port number (0-65535), got {v}"


def parses(parse: Callable[[str], Any]) -> Callable[[str], str | None]:
    def check(v: str) -> str | None:
        try:
            parse(v)
        except ValueError as exc:
            return str(exc)
        return None

    return check


def curve_keys(directory: str) -> None:
    if directory:
        from farm.curve import node_keys

        node_keys(directory)


def llm_url(url: str) -> None:
    if url:
        parse_url(url)


def knob(
    help: str,
    *,
    group: str,
    flag: str = "",
    short: str = "",
    env: str = "",
    choices: tuple[Any, ...] = (),
    check: Callable[[Any], str | None] | None = None,
    cli_default: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Field metadata that makes a Config field a knob (see the module docstring)."""
    return {
        "knob": {
            "help": help,
            "group": group,
            "flag": flag,
            "short": short,
            "env": env,
            "choices": choices,
            "check": check,
            "cli_default": cli_default,
        }
    }
