"""deploy/k8s/farm.yaml checked against farm's own knobs (no cluster here: the manifest is
read as Kubernetes would read it, and every value farm reads is parsed by farm's parser)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from farm.config import Config
from farm.knobs import add_arguments, env_name, from_args


ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "deploy" / "k8s" / "farm.yaml"
SUPERVISOR_MARGIN_S = 15 + 5 + 2  # after the drain: ingress, then workers and the broker (supervisor.py)


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}


def container(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    [c] = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return dict(c)


def node_config(c: dict[str, Any]) -> Config:
    """The Config `farm up` would start with in that container (its env through farm's parser)."""
    environ = {e["name"]: e["value"] for e in c["env"]}
    parser = argparse.ArgumentParser()
    add_arguments(parser, environ)
    config = from_args(parser.parse_args([]))
    config.check()
    return config


def test_every_variable_is_a_knob_and_farm_accepts_the_values(docs: dict[str, dict[str, Any]]) -> None:
    c = container(docs)
    knobs = {env_name(f) for f in dataclasses.fields(Config)}
    assert {e["name"] for e in c["env"]} - knobs == set()
    assert c["command"] == ["farm", "up"]
    config = node_config(c)
    assert (config.workers, config.ws_port, config.esl_port) == (2, 8080, 8084)


def test_ports_probes_and_service_agree_with_the_knobs(docs: dict[str, dict[str, Any]]) -> None:
    c = container(docs)
    config = node_config(c)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["ws"] == config.ws_port and ports["esl"] == config.esl_port
    assert f"tcp://0.0.0.0:{ports['events']}" == config.events
    assert f"tcp://0.0.0.0:{ports['commands']}" == config.commands
    for probe, path in (("readinessProbe", "/readyz"), ("startupProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert c[probe]["httpGet"] == {"path": path, "port": config.ws_port}
    [service_port] = docs["Service"]["spec"]["ports"]
    assert service_port["targetPort"] == config.ws_port
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]


def test_the_grace_period_covers_the_drain_and_the_preStop_drains(docs: dict[str, dict[str, Any]]) -> None:
    c = container(docs)
    config = node_config(c)
    grace = docs["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > config.drain_timeout + SUPERVISOR_MARGIN_S
    command = " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
    assert "kill -TERM 1" in command and "kill -0 1" in command  # SIGTERM drains; wait for the exit


def test_dev_shm_holds_a_ring_for_every_connection(docs: dict[str, dict[str, Any]]) -> None:
    c = container(docs)
    config = node_config(c)
    [mount] = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    [volume] = [v for v in docs["Deployment"]["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    size = volume["emptyDir"]["sizeLimit"]
    assert size.endswith("Mi")
    ring_bytes = config.ring_seconds * 16000 * 2 * 2  # 16 kHz stereo: the largest call farm takes
    assert int(size[:-2]) * 2**20 >= config.max_connections * ring_bytes
