"""Sans-I/O tests of farm/protocol/audio_stream.py: what a mod_audio_stream connection means.

No sockets and no node here: URL targets, metadata texts and binary chunks as
FreeSWITCH sends them (PROTOCOLS.md §1.2, §1.6, §1.7, §1.13) go straight into the
functions that turn them into a call id, a rate and a channel count (the session that
uses them is tested in test_audio_stream_session.py, whole samples in test_pcm.py).
"""

from __future__ import annotations

import json
import uuid

import pytest

from farm.protocol import exceptions
from farm.protocol.audio_stream import (
    CLOSE_POLICY,
    CLOSE_UNSUPPORTED,
    AudioStreamError,
    StreamParams,
    params_from_path,
    parse_metadata,
    resolve,
)
from farm.protocol.pcm import SUPPORTED_RATES


UUID = "48010827-257b-445e-8fa3-72d9b52682ae"  # the amigniter capture's channel


# -- params_from_path ------------------------------------------------------------


def test_the_call_id_is_the_last_path_segment_as_freeswitch_captures_send_it() -> None:
    p = params_from_path(f"/stream/{UUID}")
    assert p == StreamParams(call_id=UUID)
    assert params_from_path(f"/stream/{UUID}/second").call_id == "second"
    assert params_from_path(f"/{UUID}/").call_id == UUID


def test_a_percent_encoded_path_segment_is_decoded_into_the_call_id() -> None:
    assert params_from_path("/calls/a%20b%2Fc").call_id == "a b/c"


def test_a_bare_slash_has_no_call_id_and_no_parameters() -> None:
    assert params_from_path("/") == StreamParams()
    assert params_from_path("/?rate=8000").call_id is None


@pytest.mark.parametrize("key", ["call_id", "callId", "uuid", "call_uuid"])
def test_a_call_id_in_the_query_wins_over_the_path(key: str) -> None:
    assert params_from_path(f"/stream/ignored?{key}={UUID}").call_id == UUID


def test_an_empty_call_id_in_the_query_falls_back_to_the_path() -> None:
    assert params_from_path("/stream/abc?call_id=&uuid=").call_id == "abc"


def test_the_last_of_repeated_query_values_counts() -> None:
    assert params_from_path("/x?rate=8000&rate=16000").rate == 16000


@pytest.mark.parametrize(
    ("spelling", "rate"),
    [
        ("16k", 16000),
        ("8k", 8000),
        ("8K", 8000),
        ("8000", 8000),
        ("16000", 16000),
        ("48000", 48000),
        (" 24000 ", 24000),
        ("32000.0", 32000),
    ],
)
def test_rates_are_read_in_the_spellings_uuid_audio_stream_uses(spelling: str, rate: int) -> None:
    assert params_from_path(f"/c?rate={spelling}").rate == rate


@pytest.mark.parametrize("key", ["rate", "sample_rate", "sampleRate", "samplerate"])
def test_every_rate_key_is_understood(key: str) -> None:
    assert params_from_path(f"/c?{key}=16000").rate == 16000


@pytest.mark.parametrize(
    ("spelling", "named"), [("44100", "44100"), ("24k", "24"), ("11025", "11025"), ("0", "0"), ("-16000", "-16000")]
)
def test_an_unsupported_rate_is_refused_with_1003_naming_the_rate(spelling: str, named: str) -> None:
    """44100 and 24k are refused by the module itself (§1.2: "24k" parses as 24)."""
    with pytest.raises(AudioStreamError) as err:
        params_from_path(f"/c?rate={spelling}")
    assert err.value.code == CLOSE_UNSUPPORTED == 1003
    assert f"unsupported sample rate {named} " in str(err.value)
    for r in SUPPORTED_RATES:
        assert str(r) in str(err.value)


@pytest.mark.parametrize("spelling", ["fast", "k", "inf", "nan", "1e400", "1" * 5000, "1" * 5000 + "k"])
def test_a_rate_that_is_not_a_number_is_refused_with_1003(spelling: str) -> None:
    with pytest.raises(AudioStreamError) as err:
        params_from_path(f"/c?rate={spelling}")
    assert err.value.code == 1003
    assert "is not a number" in str(err.value)
    assert len(str(err.value)) < 100  # fits a Close frame reason


@pytest.mark.parametrize(
    ("spelling", "channels"), [("1", 1), ("2", 2), ("mono", 1), ("mixed", 1), ("stereo", 2), ("STEREO", 2)]
)
def test_channels_are_read_as_numbers_or_mix_types(spelling: str, channels: int) -> None:
    assert params_from_path(f"/c?channels={spelling}").channels == channels
    assert params_from_path(f"/c?nchannels={spelling}").channels == channels
    assert params_from_path(f"/c?mix={spelling}").channels == channels


def test_an_explicit_channel_count_wins_over_the_mix_type() -> None:
    assert params_from_path("/c?mix=mono&channels=2").channels == 2


@pytest.mark.parametrize(
    ("spelling", "message"),
    [("3", "unsupported channel count 3"), ("0", "unsupported channel count 0"), ("quad", "'quad' is not a number")],
)
def test_an_unsupported_channel_count_is_refused_with_1003(spelling: str, message: str) -> None:
    with pytest.raises(AudioStreamError) as err:
        params_from_path(f"/c?channels={spelling}")
    assert err.value.code == 1003
    assert message in str(err.value)


@pytest.mark.parametrize("mode", ["caller", "both", "Both"])
def test_transcribe_caller_or_both_is_taken_from_the_query(mode: str) -> None:
    assert params_from_path(f"/c?transcribe={mode}").transcribe == mode.lower()


def test_another_transcribe_mode_is_refused_with_1003() -> None:
    with pytest.raises(AudioStreamError, match="transcribe must be 'caller' or 'both'") as err:
        params_from_path("/c?transcribe=callee")
    assert err.value.code == 1003


def test_unknown_query_members_are_ignored() -> None:
    assert params_from_path("/c?lang=ko&foo=bar") == StreamParams(call_id="c")


def test_a_stream_error_carries_the_close_code_it_was_given() -> None:
    assert AudioStreamError("x").code == CLOSE_UNSUPPORTED
    assert AudioStreamError("idle", CLOSE_POLICY).code == 1008
    assert isinstance(AudioStreamError("x"), exceptions.RemoteProtocolError)  # the peer's fault


# -- parse_metadata --------------------------------------------------------------


def test_amigniter_start_metadata_gives_the_call_id_and_keeps_every_member() -> None:
    text = '{"event":"start","uuid":"48010827-257b-445e-8fa3-72d9b52682ae"}'  # capture conn1, first text frame
    params, error = parse_metadata(text)
    assert error is None
    assert params.call_id == UUID
    assert params.rate is None and params.channels is None and params.transcribe is None
    assert params.metadata == {"event": "start", "uuid": UUID}


def test_metadata_with_rate_channels_and_transcribe_is_read() -> None:
    meta = {"call_id": "abc", "sampleRate": "16k", "channels": "stereo", "transcribe": "both", "lang": "ko"}
    params, error = parse_metadata(json.dumps(meta))
    assert error is None
    assert params == StreamParams(call_id="abc", rate=16000, channels=2, transcribe="both", metadata=meta)


def test_a_numeric_call_id_in_metadata_becomes_a_string() -> None:
    params, _ = parse_metadata('{"callId": 12345, "rate": 8000}')
    assert params.call_id == "12345" and params.rate == 8000


def test_metadata_without_an_id_has_no_call_id() -> None:
    params, error = parse_metadata('{"call":"abc","lang":"en"}')  # TV-MAS-1
    assert error is None and params.call_id is None
    assert params.metadata == {"call": "abc", "lang": "en"}


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "not json",
        '{"event":"start"',
        "\x00\x13\xff\xfe garbage from freed memory",  # sptmru use-after-free (amigniter#53)
        "{'call': 'abc'}",  # single quotes
    ],
)
def test_garbage_metadata_is_an_error_string_not_an_exception(garbage: str) -> None:
    params, error = parse_metadata(garbage)
    assert params == StreamParams()
    assert error is not None and error.startswith("metadata is not JSON (") and error.endswith("), ignored")
    assert " at char " in error


@pytest.mark.parametrize("garbage", ["[" * 100_000, "1" * 5000, '{"rate": ' + "9" * 5000 + "}"])
def test_json_python_cannot_hold_is_an_error_string_not_an_exception(garbage: str) -> None:
    """Nesting deeper than the recursion limit, integers past the 4300-digit limit."""
    params, error = parse_metadata(garbage)
    assert params == StreamParams()
    assert error is not None and error.startswith("metadata is not usable JSON (") and error.endswith("), ignored")
    assert len(error) < 120


@pytest.mark.parametrize("value", [[1, 2], "just a string", 42, None, True])
def test_json_that_is_not_an_object_is_kept_as_a_value_without_error(value: object) -> None:
    params, error = parse_metadata(json.dumps(value))
    assert error is None
    assert params == StreamParams(metadata={"value": value})


def test_an_unsupported_rate_in_metadata_raises_1003() -> None:
    with pytest.raises(AudioStreamError, match="unsupported sample rate 44100") as err:
        parse_metadata('{"uuid": "x", "rate": 44100}')
    assert err.value.code == 1003


def test_an_infinite_rate_in_metadata_raises_1003_not_an_overflow() -> None:
    with pytest.raises(AudioStreamError, match="is not a number") as err:
        parse_metadata('{"rate": 1e400}')
    assert err.value.code == 1003


def test_null_and_empty_members_count_as_absent() -> None:
    params, error = parse_metadata('{"call_id": "", "uuid": "u1", "rate": null, "sample_rate": 8000, "channels": ""}')
    assert error is None
    assert params.call_id == "u1" and params.rate == 8000 and params.channels is None


# -- resolve ---------------------------------------------------------------------


def test_the_url_wins_over_metadata_and_metadata_over_defaults() -> None:
    url = params_from_path("/stream/from-url?rate=16000&channels=2&transcribe=both")
    meta, _ = parse_metadata('{"uuid": "from-meta", "rate": 8000, "channels": 1, "transcribe": "caller", "x": 1}')
    p = resolve(url, meta, default_rate=48000, default_channels=1)
    assert p == StreamParams(
        call_id="from-url",
        rate=16000,
        channels=2,
        transcribe="both",
        metadata={"uuid": "from-meta", "rate": 8000, "channels": 1, "transcribe": "caller", "x": 1},
    )


def test_metadata_fills_in_what_the_url_does_not_say() -> None:
    url = params_from_path("/")
    meta, _ = parse_metadata('{"uuid": "from-meta", "rate": "8k", "channels": "stereo", "transcribe": "both"}')
    p = resolve(url, meta, default_rate=16000, default_channels=1)
    assert (p.call_id, p.rate, p.channels, p.transcribe) == ("from-meta", 8000, 2, "both")


def test_defaults_apply_when_neither_url_nor_metadata_says() -> None:
    """sptmru sends no rate anywhere: the node's --default-rate applies (§1.11)."""
    url = params_from_path("/stream/85d95002-6fa1-4047-b46d-cfbefc684169")
    p = resolve(url, StreamParams(), default_rate=8000, default_channels=1)
    assert p == StreamParams(
        call_id="85d95002-6fa1-4047-b46d-cfbefc684169", rate=8000, channels=1, transcribe=None, metadata={}
    )


def test_a_fresh_uuid_is_made_up_when_no_call_id_is_known() -> None:
    a = resolve(StreamParams(), StreamParams(), default_rate=8000, default_channels=1)
    b = resolve(StreamParams(), StreamParams(), default_rate=8000, default_channels=1)
    assert a.call_id is not None and b.call_id is not None
    assert str(uuid.UUID(a.call_id)) == a.call_id
    assert a.call_id != b.call_id
    assert (a.rate, a.channels, a.transcribe, a.metadata) == (8000, 1, None, {})
