"""Knobs as flags, environment variables and README's table, generated from :class:`Config`'s fields.

Each field's ``knob`` metadata (:func:`farm.knob_spec.knob`) names its group, help and check;
nothing else lists them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from farm.config import Config


__all__ = ["add_arguments", "env_name", "flag_name", "from_args", "knob_table"]

_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}
_GROUPS = {
    "node": "the node",
    "ws": "mod_audio_stream (WebSocket) and HTTP",
    "socket_audio": "mod_socket_audio (outbound Event Socket)",
    "playback": "playback and barge-in",
    "vosk": "vosk-server protocol",
    "recognition": "recognition (workers)",
    "dialer": "answering machines, tones and intents (workers/analysis.py)",
    "security": "who may stream",
}


def env_name(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata["knob"]["env"] or f"FARM_{f.name.upper()}")


def flag_name(f: dataclasses.Field[Any]) -> str:
    spec = f.metadata["knob"]
    if spec["flag"]:
        return str(spec["flag"])
    dashed = f.name.replace("_", "-")
    if _TYPES[str(f.type)] is bool and f.default:
        return f"--no-{dashed}"
    return f"--{dashed}"


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = _TYPES[str(f.type)]
    if kind is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{env_name(f)}={raw!r} is not a boolean (1/0, true/false)")
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{env_name(f)}={raw!r} is not a {kind.__name__}") from None


def _start_value(f: dataclasses.Field[Any], environ: Mapping[str, str]) -> Any:
    """The default ``farm up`` starts from: the environment, else the cli default, else the field's."""
    if env_name(f) in environ:
        return _parse(f, environ[env_name(f)])
    spec = f.metadata["knob"]
    return spec["cli_default"]() if spec["cli_default"] else f.default


def _abspath(path: str) -> str:
    return os.path.abspath(path) if path else ""


def add_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """One flag per knob, in groups, defaulting to the environment (raises ValueError on a bad variable)."""
    environ = os.environ if environ is None else environ
    groups = {key: parser.add_argument_group(title) for key, title in _GROUPS.items()}
    for f in dataclasses.fields(Config):
        spec = f.metadata["knob"]
        kind = _TYPES[str(f.type)]
        start = _start_value(f, environ)
        names = [flag_name(f), *([spec["short"]] if spec["short"] else [])]
        text = f"{spec['help']} (${env_name(f)}"
        group = groups[spec["group"]]
        if kind is bool:
            # --x turns a default-off knob on, --no-x a default-on one off; the variable sets either.
            action = "store_false" if f.default else "store_true"
            group.add_argument(*names, dest=f.name, action=action, default=start, help=f"{text})")
            continue
        group.add_argument(
            *names,
            dest=f.name,
            type=kind,
            default=start,
            choices=spec["choices"] or None,
            metavar=None if spec["choices"] else f.name.split("_")[-1].upper(),
            help=f"{text}, default %(default)s)",
        )


def from_args(args: argparse.Namespace) -> Config:
    """The Config of a parsed ``farm up`` command line."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
    values["model"] = _abspath(values["model"])
    return Config(**values)


def knob_table() -> str:
    """README's table of every knob: flag, variable, default, meaning (tests keep it in step)."""
    rows = ["| flag | environment | default | what it does |", "|---|---|---|---|"]
    for f in dataclasses.fields(Config):
        spec = f.metadata["knob"]
        default = "(see text)" if spec["cli_default"] else f.default
        shown = f"`{default}`" if default not in ("", "(see text)") else ("" if default == "" else default)
        rows.append(f"| `{flag_name(f)}` | `{env_name(f)}` | {shown} | {spec['help'].replace('|', '/')} |")
    return "\n".join(rows)
