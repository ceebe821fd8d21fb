"""The call-flow robot's scenario file (deploy/robot/README.md): YAML, read and checked here.

A scenario is a set of named steps and the step to start with. A step may ``play`` a
prompt, then do one thing that ends with an *outcome*, then go to the step its ``goto`` map
names for that outcome (or ``default`` there, or ``next``); no step to go to ends the call's
run. Booleans are YAML 1.2's (``true``/``false`` only): ``yes``, ``no``, ``on`` and ``off``
are strings, so intents named ``yes`` and ``no`` need no quotes.

======== ============================== =========================================
action   what the robot does            outcomes
======== ============================== =========================================
amd      waits for farm's ``amd`` event human, machine, unknown, timeout, hangup
listen   waits for what the caller says an intent's name, no_match (a final no
                                        intent matched), no_speech, timeout, hangup
wait_beep waits for farm's ``beep``     beep, timeout, hangup
transfer ``uuid_transfer`` to an exten  ok, failed (then the call is the agent's)
hangup   ``uuid_kill`` with a cause     ok, failed
(none)   only the ``play``              played, barge_in, hangup
======== ============================== =========================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


__all__ = ["ACTIONS", "Scenario", "ScenarioError", "Step", "load"]

ACTIONS = ("amd", "listen", "wait_beep", "transfer", "hangup")
# How long the waiting actions wait by default, s.
DEFAULT_TIMEOUT_S = {"amd": 10.0, "listen": 8.0, "wait_beep": 20.0}


class _Loader(yaml.SafeLoader):  # type: ignore[misc]
    """SafeLoader with YAML 1.2's booleans: PyYAML's 1.1 rules make ``yes: confirmed`` {True: ...}."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


class ScenarioError(ValueError):
    """The scenario file is not one the robot can run; the message says where."""


@dataclass(frozen=True)
class Step:
    name: str
    play: Path | None = None  # a prompt, played to the end (or until the caller talks over it)
    action: str | None = None  # one of ACTIONS
    timeout_s: float = 0.0  # amd, listen, wait_beep
    no_speech_s: float = 0.0  # listen: silence that ends it before timeout_s
    extension: str = ""  # transfer
    dialplan: str = "XML"
    context: str = "default"
    cause: str = "NORMAL_CLEARING"  # hangup
    on: dict[str, str] = field(default_factory=dict)
    next: str | None = None

    def after(self, outcome: str) -> str | None:
        """The step to go to after ``outcome``; None ends the run."""
        return self.on.get(outcome) or self.on.get("default") or self.next


@dataclass(frozen=True)
class Scenario:
    name: str
    start: str
    steps: dict[str, Step]
    amd: bool = False  # ask farm for answering-machine detection from the answer


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ScenarioError(f"{where}: expected a positive number of seconds, got {value!r}")
    return float(value)


def _step(name: str, raw: Any, prompts: Path) -> Step:
    where = f"step {name!r}"
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = set(raw) - {"play", "goto", "next", *ACTIONS}
    if unknown:
        raise ScenarioError(f"{where}: unknown keys {sorted(unknown)}")
    actions = [a for a in ACTIONS if a in raw]
    if len(actions) > 1:
        raise ScenarioError(f"{where}: one action per step, got {actions}")
    kw: dict[str, Any] = {}
    if "play" in raw:
        kw["play"] = prompts / str(raw["play"])
        if not kw["play"].is_file():
            raise ScenarioError(f"{where}: prompt {kw['play']} is not a file")
    action = actions[0] if actions else None
    options = raw.get(action) if action else None
    if action in DEFAULT_TIMEOUT_S:
        options = options or {}
        if not isinstance(options, dict):
            raise ScenarioError(f"{where}: {action} takes a mapping (timeout_s, ...), got {options!r}")
        kw["timeout_s"] = _number(f"{where} timeout_s", options.get("timeout_s", DEFAULT_TIMEOUT_S[action]))
        kw["no_speech_s"] = _number(f"{where} no_speech_s", options.get("no_speech_s", kw["timeout_s"]))
    elif action == "transfer":
        target = options if isinstance(options, dict) else {"extension": options}
        if not target.get("extension"):
            raise ScenarioError(f"{where}: transfer needs an extension")
        kw["extension"] = str(target["extension"])
        kw["dialplan"] = str(target.get("dialplan", "XML"))
        kw["context"] = str(target.get("context", "default"))
    elif action == "hangup":
        kw["cause"] = "NORMAL_CLEARING" if options in (None, True) else str(options)
    on = raw.get("goto") or {}
    if not isinstance(on, dict):
        raise ScenarioError(f"{where}: goto: expected a mapping of outcomes to steps")
    return Step(name, action=action, on={str(k): str(v) for k, v in on.items()}, next=raw.get("next"), **kw)


def load(path: str | Path) -> Scenario:
    """Read a scenario file; prompts are relative to its ``prompts`` directory (default: beside it).

    Raises ScenarioError naming the step and the key that is wrong, and any step named
    but not defined.
    """
    path = Path(path)
    raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # a SafeLoader
    if not isinstance(raw, dict) or not isinstance(raw.get("steps"), dict) or not raw["steps"]:
        raise ScenarioError(f"{path}: expected a mapping with a non-empty 'steps' mapping")
    prompts = path.parent / str(raw.get("prompts", "."))
    steps = {str(name): _step(str(name), step, prompts) for name, step in raw["steps"].items()}
    start = str(raw.get("start", next(iter(steps))))
    for where, target in [("start", start)] + [
        (f"step {s.name!r}", t) for s in steps.values() for t in [*s.on.values(), s.next] if t is not None
    ]:
        if target not in steps:
            raise ScenarioError(f"{path}: {where} goes to {target!r}, which is not a step")
    return Scenario(str(raw.get("name", path.stem)), start, steps, amd=bool(raw.get("amd", False)))
