"""TLS on the WebSocket, vosk and HTTP ports (farm/tls.py), with a certificate for
127.0.0.1 that the test makes with openssl; renewed while the node runs."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import time
import urllib.request
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets

from farm.client import Subscription
from farm.protocol.events import Event
from farm.sender import metadata_for

from .conftest import DATA, MS, Node, free_port, start_node


def make_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("certs")
    return {name: make_pair(d, name) for name in ("first", "renewed")}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pairs: dict[str, tuple[Path, Path]]) -> Iterator[Node]:
    live = tmp_path_factory.mktemp("live")
    cert, key = live / "cert.pem", live / "key.pem"
    cert.write_bytes(pairs["first"][0].read_bytes())
    key.write_bytes(pairs["first"][1].read_bytes())
    n = start_node(
        tmp_path_factory.mktemp("tls"),
        "--tls-cert", str(cert), "--tls-key", str(key),
        "--vosk-port", str(free_port()), "--http-port", str(free_port()),
        workers=1,
    )  # fmt: skip
    yield n
    assert n.stop() == 0


def trusting(*certs: Path) -> ssl.SSLContext:
    context = ssl.create_default_context()
    for cert in certs:
        context.load_verify_locations(cafile=str(cert))
    return context


def port_of(node: Node, flag: str) -> int:
    return int(node.args[node.args.index(flag) + 1])


def served_certificate(port: int, context: ssl.SSLContext) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der


def der_of(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def test_a_wss_call_is_transcribed_and_plain_ws_is_not_served(
    node: Node, pairs: dict[str, tuple[Path, Path]]
) -> None:
    context = trusting(pairs["first"][0], pairs["renewed"][0])
    with wave.open(str(DATA / "ko_01.wav"), "rb") as w:
        pcm = w.readframes(w.getnframes())

    async def call() -> list[Event]:
        async with Subscription(node.events, "tls-call") as sub:
            async with websockets.connect(f"wss://127.0.0.1:{node.port}/tls-call", ssl=context) as ws:
                await ws.send(metadata_for("tls-call", 16000, 1))
                for i in range(0, len(pcm), 640):
                    await ws.send(pcm[i : i + 640])
            events = [await sub.next(timeout=60_000 * MS)]
            while events[-1].type != "call_end":
                events.append(await sub.next(timeout=60_000 * MS))
            return events

    events = asyncio.run(call())
    assert any(e.type == "final" and e["text"] for e in events)
    assert events[-1]["reason"] == "hangup"

    async def plain() -> None:
        async with websockets.connect(f"ws://127.0.0.1:{node.port}/plain", open_timeout=30_000 * MS):
            pass

    with pytest.raises((websockets.InvalidMessage, websockets.InvalidHandshake, OSError, EOFError)):
        asyncio.run(plain())


def test_the_vosk_and_http_ports_speak_tls_too(node: Node, pairs: dict[str, tuple[Path, Path]]) -> None:
    context = trusting(pairs["first"][0], pairs["renewed"][0])

    async def vosk() -> dict[str, object]:
        url = f"wss://127.0.0.1:{port_of(node, '--vosk-port')}"
        async with websockets.connect(url, ssl=context) as ws:
            await ws.send('{"eof" : 1}')
            return dict(json.loads(await asyncio.wait_for(ws.recv(), 30_000 * MS)))

    assert "text" in asyncio.run(vosk())
    url = f"https://127.0.0.1:{port_of(node, '--http-port')}/transcribe"
    body = (DATA / "ko_01.wav").read_bytes()
    with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), context=context, timeout=60) as r:
        lines = [json.loads(line) for line in r.read().splitlines()]
    assert any(e["type"] == "final" and e["text"] for e in lines)


def test_a_renewed_certificate_is_served_without_a_restart_and_a_broken_one_is_not(
    node: Node, pairs: dict[str, tuple[Path, Path]]
) -> None:
    cert, key = (Path(node.args[node.args.index(flag) + 1]) for flag in ("--tls-cert", "--tls-key"))
    context = trusting(pairs["first"][0], pairs["renewed"][0])
    assert served_certificate(node.port, context) == der_of(pairs["first"][0])
    for path, new in ((key, pairs["renewed"][1]), (cert, pairs["renewed"][0])):  # as certbot's deploy does
        tmp = path.with_suffix(".new")
        tmp.write_bytes(new.read_bytes())
        os.replace(tmp, path)
    deadline = time.monotonic() + 60_000 * MS
    while served_certificate(node.port, context) != der_of(pairs["renewed"][0]):
        assert time.monotonic() < deadline, node.log()[-2000:]
        time.sleep(0.2)
    assert "loaded again" in node.log()
    kept = node.log().count("the previous certificate stays in use")
    key.write_text("not a key\n")  # a broken renewal: logged, the renewed pair stays
    deadline = time.monotonic() + 60_000 * MS
    while node.log().count("the previous certificate stays in use") == kept:
        assert time.monotonic() < deadline, node.log()[-2000:]
        time.sleep(0.2)
    assert served_certificate(node.port, context) == der_of(pairs["renewed"][0])
    assert node.pids("ingress") and node.proc.poll() is None
