"""CURVE on the event and command endpoints (farm/curve.py), keys made by `farm keys`."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest

from farm.client import CommandError, Commands, Subscription
from farm.curve import client_keys, make_keys
from farm.protocol.events import Event
from farm.sender import metadata_for, send_pcm

from .conftest import DATA, MS, Node, start_node


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("curve")
    made = subprocess.run(
        [sys.executable, "-m", "farm.cli", "keys", str(d), "dialer"], capture_output=True, text=True, check=True
    )
    assert str(d / "server.key_secret") in made.stdout and str(d / "clients" / "dialer.key_secret") in made.stdout
    return d


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, keys_dir: Path) -> Iterator[Node]:
    n = start_node(tmp_path_factory.mktemp("curve-node"), "--curve-dir", str(keys_dir), workers=1)
    yield n
    assert n.stop() == 0


def test_an_admitted_client_gets_the_events_and_strangers_get_nothing(node: Node, keys_dir: Path) -> None:
    stranger_dir = keys_dir.parent / "stranger"
    make_keys(str(stranger_dir), ["eve"])
    with wave.open(str(DATA / "ko_01.wav"), "rb") as w:
        pcm = w.readframes(w.getnframes())

    async def main() -> tuple[list[Event], bool, bool]:
        async with Subscription(node.events, "curve-call", keys=client_keys(str(keys_dir), "dialer")) as sub:
            assert sub.subscribed, "an admitted client's subscription was not confirmed"
            nobody = Subscription(node.events, "curve-call")
            eve = Subscription(node.events, "curve-call", keys=client_keys(str(stranger_dir), "eve"))
            try:
                nobody_ok, eve_ok = await asyncio.gather(nobody.ready(3_000 * MS), eve.ready(3_000 * MS))
                await send_pcm(f"{node.url}/curve-call", pcm, rate=16000, metadata=metadata_for("curve-call", 16000, 1))
                events = [await sub.next(timeout=60_000 * MS)]
                while events[-1].type != "call_end":
                    events.append(await sub.next(timeout=60_000 * MS))
                with pytest.raises(TimeoutError):
                    await nobody.next(timeout=500 * MS)  # not one event reached it
            finally:
                nobody.close()
                eve.close()
            return events, nobody_ok, eve_ok

    events, nobody_ok, eve_ok = asyncio.run(main())
    assert not nobody_ok and not eve_ok
    assert any(e.type == "final" and e["text"] for e in events)


def test_only_admitted_clients_command_and_a_new_key_works_without_a_restart(node: Node, keys_dir: Path) -> None:
    async def calls(keys: object) -> object:
        commands = Commands(node.commands, timeout=3_000 * MS, keys=keys)  # type: ignore[arg-type]
        try:
            return await commands.calls()
        finally:
            commands.close()

    assert asyncio.run(calls(client_keys(str(keys_dir), "dialer"))) == []
    with pytest.raises(CommandError, match="no answer"):
        asyncio.run(calls(None))
    make_keys(str(keys_dir), ["late"])  # farm keys DIR late, while the node runs
    assert asyncio.run(calls(client_keys(str(keys_dir), "late"))) == []
