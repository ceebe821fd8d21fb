"""Every knob declared once (farm/config.py): flag, environment variable, check and README row."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from farm.config import Config
from farm.knobs import add_arguments, env_name, flag_name, from_args, knob_table


README = Path(__file__).parent.parent / "README.md"


def parse(argv: list[str], environ: dict[str, str] | None = None) -> Config:
    parser = argparse.ArgumentParser()
    add_arguments(parser, environ or {})
    return from_args(parser.parse_args(argv))


def test_every_field_is_a_knob_with_its_own_flag_and_variable() -> None:
    fields = dataclasses.fields(Config)
    assert all(f.metadata["knob"]["help"] for f in fields)
    assert len({flag_name(f) for f in fields}) == len({env_name(f) for f in fields}) == len(fields)
    assert all(env_name(f).startswith("FARM_") for f in fields)


def test_the_readme_lists_every_knob_as_the_code_declares_it() -> None:
    table = knob_table()
    assert table in README.read_text(), (
        "README.md's knob table is out of date: paste the output of "
        "`python -c 'from farm.knobs import knob_table; print(knob_table())'`"
    )
    assert table.count("\n| `--") == len(dataclasses.fields(Config))


def test_defaults_then_environment_then_flags() -> None:
    assert parse([]).ws_port == 8080 and parse([]).gating is True
    env = {"FARM_PORT": "9000", "FARM_WS_PORT": "9001", "FARM_GATING": "false", "FARM_VAD_HANGOVER_MS": "400"}
    # the variable is named after the field (FARM_WS_PORT), the flag keeps its short form (--port)
    got = parse([], env)
    assert (got.ws_port, got.gating, got.vad_hangover_ms) == (9001, False, 400)
    got = parse(["--port", "9002", "--vad-hangover-ms", "340"], env)
    assert (got.ws_port, got.vad_hangover_ms) == (9002, 340)
    assert parse(["--no-gating", "--no-barge-in"]).barge_in is False
    assert parse(["--esl", "10.0.0.1:8021"], {"FARM_ESL_PASSWORD": "s3cret"}).esl_password == "s3cret"
    assert parse(["--esl", "10.0.0.1:8021"]).esl_inbound == "10.0.0.1:8021"
    assert parse([], {"FARM_ESL": "fs:8021"}).esl_inbound == "fs:8021"


def test_farm_up_starts_from_the_machine_where_it_has_a_cli_default() -> None:
    from farm.config import default_model_dir, default_workers

    got = parse([])
    assert got.workers == default_workers() and got.model == str(Path(default_model_dir() or "").absolute())
    assert Config().workers == 2  # a Config made in code keeps the field's own default


@pytest.mark.parametrize(
    ("value", "message"),
    [("abc", "FARM_WORKERS='abc' is not a int"), ("1.5", "FARM_WORKERS='1.5' is not a int")],
)
def test_a_bad_variable_is_refused_by_name(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse([], {"FARM_WORKERS": value})
    with pytest.raises(ValueError, match="FARM_GATING='maybe' is not a boolean"):
        parse([], {"FARM_GATING": "maybe"})


def test_farm_up_refuses_a_bad_variable_with_exit_2_before_starting() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "farm.cli", "up"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**__import__("os").environ, "FARM_VAD_HANGOVER_MS": "soon"},
    )
    assert proc.returncode == 2
    assert "FARM_VAD_HANGOVER_MS='soon' is not a int" in proc.stderr and "started" not in proc.stderr


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"workers": 0}, "workers must be >= 1, got 0"),
        ({"vad_tentative_ms": 30}, "vad_tentative_ms must be a non-negative multiple of 20 ms, got 30"),
        ({"default_rate": 11025}, "default_rate must be one of 8000, 16000, 24000, 32000, 48000, got 11025"),
        ({"socket_audio_ports": "9-8"}, "socket_audio_ports must be FIRST-LAST within 1-65535, got '9-8'"),
        ({"ws_port": 70000}, "ws_port must be a port number"),
        ({"socket_audio_fallback": "pray"}, "socket_audio_fallback must be one of hangup, dialplan, got 'pray'"),
    ],
)
def test_check_names_the_knob_and_the_value(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Config().replace(**changes).check()
    Config().check()


def test_the_config_crosses_to_other_processes_whole() -> None:
    c = Config(workers=3, vad_hangover_ms=340, esl_inbound="fs:8021", gating=False)
    assert Config.from_json(c.to_json()) == c
