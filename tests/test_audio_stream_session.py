"""Sans-I/O tests of :class:`farm.protocol.audio_stream.AudioStreamSession`.

No sockets, no node and no clock: a request target, text and binary messages and
times (``time.monotonic_ns()`` values made up here) go in, actions come out. The
recorded FreeSWITCH connections in tests/captures are replayed through the session
as recorded, with all audio between two texts in one message, one byte per message
and in seeded random chunks (HOUSE_STYLE point 3); every way must give the same call
and exactly the recorded audio. Section numbers are PROTOCOLS.md's.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st
from websockets import frames
from websockets.frames import Frame, Opcode

from farm.protocol.audio_stream import (
    CLOSED,
    CONNECTING,
    HOLDING,
    MAX_HELD_BYTES,
    STREAMING,
    WAITING,
    Action,
    AudioStreamSession,
    Close,
    Note,
    OpenCall,
    PublishError,
    WriteAudio,
)
from farm.protocol.exceptions import CLOSE_POLICY, CLOSE_UNSUPPORTED, LocalProtocolError

from .peers import Capture


S = 1_000_000_000  # ns per second
MS_NS = 1_000_000
T0 = 1234 * S  # when the upgrade completed; any monotonic time will do
UUID = "48010827-257b-445e-8fa3-72d9b52682ae"
CAPTURES = Path(__file__).parent / "captures" / "freeswitch-1.10.12"
TV_MAS_3 = bytes.fromhex("0000e80318fcff7f0080feff")  # 0, 1000, -1000, 32767, -32768, -2
TV_MAS_3_PAIRS = bytes.fromhex("e80318fcd00730f8")  # L=1000,R=-1000,L=2000,R=-2000


def new_session(**settings: Any) -> AudioStreamSession:
    """A session with the node's defaults (farm/config.py), overridden by ``settings``."""
    kwargs: dict[str, Any] = {
        "default_rate": 8000,
        "default_channels": 1,
        "metadata_wait_ms": 200,
        "first_message_timeout": 10.0,
        "idle_timeout": 600.0,
    }
    return AudioStreamSession(**(kwargs | settings))


def opened(path: str = f"/stream/{UUID}", **settings: Any) -> AudioStreamSession:
    session = new_session(**settings)
    assert session.receive_open(path, T0) == []
    return session


def streaming(path: str = f"/stream/{UUID}", metadata: str = "{}", **settings: Any) -> AudioStreamSession:
    session = opened(path, **settings)
    actions = session.receive_text(metadata, T0 + MS_NS)
    assert isinstance(actions[0], OpenCall)
    return session


def open_call(
    call_id: str = UUID,
    rate: int = 8000,
    channels: int = 1,
    transcribe: str | None = None,
    metadata: dict[str, Any] | None = None,
    metadata_seen: bool = True,
) -> OpenCall:
    return OpenCall(call_id, rate, channels, transcribe, {} if metadata is None else metadata, metadata_seen)


class TestUpgrade:
    """§1.6: the request target is all a connection says before its first message."""

    def test_an_upgrade_waits_first_message_timeout_for_a_first_message(self) -> None:
        session = opened()
        assert session.state is WAITING
        assert session.next_deadline() == T0 + 10 * S

    def test_a_new_session_has_no_deadline(self) -> None:
        session = new_session()
        assert session.state is CONNECTING
        assert session.next_deadline() is None
        assert session.timeout(T0 + 3600 * S) == []

    @pytest.mark.parametrize(
        ("query", "reason"),
        [
            ("?rate=44100", "unsupported sample rate 44100 (supported: 8000, 16000, 24000, 32000, 48000)"),
            ("?channels=3", "unsupported channel count 3 (1 or 2)"),
            ("?transcribe=callee", "transcribe must be 'caller' or 'both', not 'callee'"),
        ],
    )
    def test_a_url_farm_cannot_serve_is_closed_with_1003_at_once(self, query: str, reason: str) -> None:
        session = new_session()
        assert session.receive_open(f"/stream/{UUID}{query}", T0) == [Close(CLOSE_UNSUPPORTED, reason, "refused")]
        assert session.state is CLOSED
        assert session.next_deadline() is None
        assert session.call_id == UUID  # the refused call's call_end names it


class TestMetadata:
    """§1.7: the first text message is the ``start`` metadata, optional and maybe garbage."""

    def test_amigniter_start_metadata_opens_the_call_with_the_url_call_id(self) -> None:
        session = opened()
        text = f'{{"event":"start","uuid":"{UUID}"}}'  # the amigniter capture's first frame
        assert session.receive_text(text, T0 + MS_NS) == [open_call(metadata={"event": "start", "uuid": UUID})]
        assert session.state is STREAMING
        assert session.next_deadline() == T0 + MS_NS + 600 * S

    def test_metadata_says_what_the_url_does_not(self) -> None:
        session = opened("/")
        meta = {"call_id": "abc", "sampleRate": "16k", "channels": "stereo", "transcribe": "both"}
        actions = session.receive_text(json.dumps(meta), T0)
        assert actions == [open_call("abc", 16000, 2, "both", meta)]

    def test_the_call_id_the_peer_named_is_the_urls_else_the_metadatas_else_none(self) -> None:
        assert opened(f"/stream/{UUID}").call_id == UUID
        session = opened("/?rate=16000")
        assert session.call_id is None
        (action,) = session.receive_text('{"event": "start"}', T0)
        assert isinstance(action, OpenCall) and session.call_id is None  # the id farm made up is not named
        session = opened("/?rate=16000")
        session.receive_text('{"call_id": "abc"}', T0)
        assert session.call_id == "abc"

    def test_the_url_wins_over_the_metadata(self) -> None:
        session = opened(f"/stream/{UUID}?rate=16000&channels=1")
        actions = session.receive_text('{"uuid": "other", "rate": 8000, "channels": 2}', T0)
        assert actions == [open_call(UUID, 16000, 1, metadata={"uuid": "other", "rate": 8000, "channels": 2})]

    def test_garbage_metadata_opens_the_call_on_the_url_and_is_published_after_the_open(self) -> None:
        """sptmru may send freed memory as metadata (§1.7, amigniter#53)."""
        session = opened(f"/stream/{UUID}?rate=16000")
        actions = session.receive_text('{"event":"start","uuid":"\x13\x00\xff', T0)
        assert actions[0] == open_call(rate=16000)
        assert len(actions) == 2 and isinstance(actions[1], PublishError)
        assert actions[1].reason.startswith("metadata is not JSON (") and actions[1].reason.endswith("), ignored")

    def test_metadata_with_a_rate_farm_cannot_serve_is_closed_with_1003(self) -> None:
        session = opened()
        actions = session.receive_text('{"rate": 44100}', T0)
        assert actions == [
            Close(
                CLOSE_UNSUPPORTED,
                "unsupported sample rate 44100 (supported: 8000, 16000, 24000, 32000, 48000)",
                "refused",  # the call never opened
            )
        ]
        assert session.state is CLOSED


class TestAudioBeforeMetadata:
    """§1.7: libwsc may flush audio queued while connecting before it sends the metadata."""

    def test_audio_before_metadata_is_held_until_metadata_wait_ms_after_the_upgrade(self) -> None:
        session = opened()
        assert session.receive_binary(bytes(640), T0 + 50 * MS_NS) == []
        assert session.state is HOLDING
        assert session.next_deadline() == T0 + 200 * MS_NS  # from the upgrade, not from the audio

    def test_metadata_after_held_audio_sets_the_rate_the_held_audio_is_read_at(self) -> None:
        session = opened()
        session.receive_binary(TV_MAS_3_PAIRS[:3], T0 + 10 * MS_NS)
        session.receive_binary(TV_MAS_3_PAIRS[3:], T0 + 30 * MS_NS)
        actions = session.receive_text('{"rate": "16k", "channels": "stereo"}', T0 + 40 * MS_NS)
        meta = {"rate": "16k", "channels": "stereo"}
        assert actions == [
            open_call(rate=16000, channels=2, metadata=meta),
            WriteAudio(b"", T0 + 10 * MS_NS, 3),  # carried on 4-byte stereo pairs, not on samples
            WriteAudio(TV_MAS_3_PAIRS, T0 + 30 * MS_NS, 5),
        ]

    def test_garbage_metadata_after_held_audio_is_published_before_the_held_audio_is_written(self) -> None:
        session = opened()
        session.receive_binary(bytes(640), T0)
        actions = session.receive_text("not json", T0 + MS_NS)
        assert [type(a) for a in actions] == [OpenCall, PublishError, WriteAudio]

    def test_when_the_metadata_wait_runs_out_the_call_opens_on_the_url_alone(self) -> None:
        session = opened(f"/stream/{UUID}?rate=16000")
        session.receive_binary(TV_MAS_3[:5], T0 + 20 * MS_NS)
        assert session.timeout(T0 + 199 * MS_NS) == []  # a timer that fired early
        assert session.state is HOLDING
        actions = session.timeout(T0 + 200 * MS_NS)
        assert actions == [open_call(rate=16000, metadata_seen=False), WriteAudio(TV_MAS_3[:4], T0 + 20 * MS_NS, 5)]
        assert session.next_deadline() == T0 + 200 * MS_NS + 600 * S
        # The odd byte is still carried.
        assert session.receive_binary(TV_MAS_3[5:], T0 + 220 * MS_NS) == [WriteAudio(TV_MAS_3[4:], T0 + 220 * MS_NS, 7)]

    def test_audio_that_comes_after_the_metadata_wait_opens_the_call_at_once(self) -> None:
        """The stereo capture's first audio comes 4 s after the upgrade (§7)."""
        session = opened()
        actions = session.receive_binary(bytes(1280), T0 + 4 * S)
        assert actions == [open_call(metadata_seen=False), WriteAudio(bytes(1280), T0 + 4 * S, 1280)]

    def test_audio_held_past_the_wait_opens_the_call_even_if_the_timer_has_not_run(self) -> None:
        session = opened()
        session.receive_binary(bytes(640), T0 + 100 * MS_NS)
        actions = session.receive_binary(bytes(640), T0 + 250 * MS_NS)
        assert [type(a) for a in actions] == [OpenCall, WriteAudio, WriteAudio]

    def test_a_flood_of_audio_before_the_metadata_opens_the_call_instead_of_being_held(self) -> None:
        """No stream sends MAX_HELD_BYTES in a metadata wait: the session does not buffer it."""
        session = opened(f"/stream/{UUID}?rate=48000&channels=2", metadata_wait_ms=5000)
        chunk = bytes(64 * 1024)
        for i in range(MAX_HELD_BYTES // len(chunk)):
            assert session.receive_binary(chunk, T0 + i) == []
        actions = session.receive_binary(chunk, T0 + S)
        assert actions[0] == open_call(rate=48000, channels=2, metadata_seen=False)
        assert sum(len(a.pcm) for a in actions[1:] if isinstance(a, WriteAudio)) == MAX_HELD_BYTES + len(chunk)
        assert session.state is STREAMING

    def test_no_metadata_wait_opens_on_the_first_audio(self) -> None:
        session = opened(metadata_wait_ms=0)
        assert [type(a) for a in session.receive_binary(bytes(320), T0)] == [OpenCall, WriteAudio]


class TestStreaming:
    """§1.7, §1.13: binary messages are int16 PCM chunks of any length; text is noted."""

    def test_every_message_is_written_as_whole_samples_with_the_odd_byte_carried(self) -> None:
        """TV-MAS-3 in pieces that split samples."""
        session = streaming()
        assert session.receive_binary(TV_MAS_3[:5], T0 + S) == [WriteAudio(TV_MAS_3[:4], T0 + S, 5)]
        assert session.receive_binary(TV_MAS_3[5:6], T0 + 2 * S) == [WriteAudio(TV_MAS_3[4:6], T0 + 2 * S, 1)]
        assert session.receive_binary(TV_MAS_3[6:7], T0 + 3 * S) == [WriteAudio(b"", T0 + 3 * S, 1)]
        assert session.receive_binary(TV_MAS_3[7:], T0 + 4 * S) == [WriteAudio(TV_MAS_3[6:], T0 + 4 * S, 5)]

    def test_stereo_is_written_in_whole_pairs(self) -> None:
        session = streaming(metadata='{"channels": 2}')
        assert session.receive_binary(TV_MAS_3_PAIRS[:6], T0) == [WriteAudio(TV_MAS_3_PAIRS[:4], T0, 6)]
        assert session.receive_binary(TV_MAS_3_PAIRS[6:], T0) == [WriteAudio(TV_MAS_3_PAIRS[4:], T0, 2)]

    def test_metadata_again_keeps_the_stream_parameters(self) -> None:
        """IXWebSocket re-sends the metadata on every reconnect; dialers send text (§1.7)."""
        session = streaming()
        text = '{"event":"hello_from_fs","rate":16000}'
        assert session.receive_text(text, T0 + S) == [
            Note(f"metadata again, {len(text)} bytes; kept the stream's parameters")
        ]
        assert session.next_deadline() == T0 + MS_NS + 600 * S  # text does not keep a call alive
        assert session.receive_binary(bytes(3), T0 + 2 * S) == [WriteAudio(bytes(2), T0 + 2 * S, 3)]  # still mono

    def test_garbage_text_once_streaming_is_published_and_the_call_goes_on(self) -> None:
        session = streaming()
        (action,) = session.receive_text("\x00garbage", T0 + S)
        assert isinstance(action, PublishError) and "metadata is not JSON" in action.reason
        assert session.state is STREAMING

    def test_text_once_streaming_with_a_rate_farm_cannot_serve_still_closes_with_1003(self) -> None:
        session = streaming()
        (action,) = session.receive_text('{"rate": 11025}', T0 + S)
        assert isinstance(action, Close) and action.code == CLOSE_UNSUPPORTED
        assert action.end == "error"  # the open call ends in an error
        assert session.state is CLOSED


class TestTimeouts:
    """§1.10: a connection that never speaks is dropped soon; a paused call gets long."""

    def test_a_connection_that_sends_nothing_is_closed_1008_after_first_message_timeout(self) -> None:
        session = opened()
        assert session.timeout(T0 + 10 * S - 1) == []
        assert session.timeout(T0 + 10 * S) == [Close(CLOSE_POLICY, "no message in 10 s", "idle")]
        assert session.state is CLOSED and session.next_deadline() is None

    def test_every_audio_message_moves_the_idle_deadline(self) -> None:
        session = streaming(idle_timeout=30.0)
        session.receive_binary(bytes(640), T0 + 5 * S)
        assert session.next_deadline() == T0 + 35 * S
        assert session.timeout(T0 + 34 * S) == []
        session.receive_binary(bytes(640), T0 + 34 * S)  # a late message still counts
        assert session.next_deadline() == T0 + 64 * S
        assert session.timeout(T0 + 64 * S) == [Close(CLOSE_POLICY, "no audio in 30 s", "idle")]

    def test_a_call_that_sent_only_metadata_is_closed_1008_after_idle_timeout(self) -> None:
        """A stalled call holds a slot of --max-connections: it must not hold it for ever."""
        session = streaming(idle_timeout=2.0)  # opened at T0 + 1 ms
        assert session.timeout(T0 + MS_NS + 2 * S - 1) == []
        assert session.timeout(T0 + MS_NS + 2 * S) == [Close(CLOSE_POLICY, "no audio in 2 s", "idle")]
        assert session.state is CLOSED

    def test_text_without_audio_does_not_keep_a_call_open(self) -> None:
        """Metadata again, send_text, garbage: only audio counts as the call being alive."""
        session = streaming(idle_timeout=2.5)
        session.receive_binary(bytes(640), T0 + S)
        for i, text in enumerate(['{"rate": 8000}', "\x00garbage", '{"type": "mark"}']):
            session.receive_text(text, T0 + S + (i + 1) * S // 2)
        assert session.next_deadline() == T0 + S + 5 * S // 2
        assert session.timeout(T0 + S + 5 * S // 2) == [Close(CLOSE_POLICY, "no audio in 2.5 s", "idle")]


class TestCloseFrame:
    """RFC 6455 §5.5: a Close frame's reason is at most 123 bytes of UTF-8."""

    def test_the_close_reason_fits_a_close_frame(self) -> None:
        reason = "unsupported sample rate " + "9" * 200
        assert Close(CLOSE_UNSUPPORTED, reason, "refused").wire_reason == reason[:120]

    def test_a_reason_with_the_clients_multibyte_text_is_cut_to_123_bytes_on_a_character(self) -> None:
        session = new_session()
        (close,) = session.receive_open(f"/stream/{UUID}?transcribe={'통화' * 16}", T0)
        assert isinstance(close, Close) and len(close.reason.encode()) > 125
        assert close.reason.startswith(close.wire_reason)
        assert len(close.wire_reason.encode()) <= 123 < len(close.reason[: len(close.wire_reason) + 1].encode())
        # websockets refuses a Close frame longer than 125 bytes: this one it sends.
        Frame(Opcode.CLOSE, frames.Close(close.code, close.wire_reason).serialize()).check()


class TestMisuse:
    """Our own mistakes raise at once; the peer's late messages after a Close are dropped."""

    def test_messages_before_the_upgrade_is_done_are_our_bug(self) -> None:
        session = new_session()
        with pytest.raises(LocalProtocolError, match="receive_text before receive_open"):
            session.receive_text("{}", T0)
        with pytest.raises(LocalProtocolError, match="receive_binary before receive_open"):
            session.receive_binary(b"", T0)

    def test_a_second_upgrade_is_our_bug(self) -> None:
        session = opened()
        with pytest.raises(LocalProtocolError, match="receive_open in state WAITING"):
            session.receive_open("/", T0)

    def test_after_a_close_nothing_more_happens(self) -> None:
        session = opened()
        session.receive_binary(bytes(640), T0)  # held audio is dropped with the connection
        assert session.receive_text('{"rate": 5}', T0)[0] == Close(
            CLOSE_UNSUPPORTED, "unsupported sample rate 5 (supported: 8000, 16000, 24000, 32000, 48000)", "refused"
        )
        assert session.receive_text("{}", T0) == []
        assert session.receive_binary(bytes(640), T0) == []
        assert session.timeout(T0 + 3600 * S) == []
        assert session.state is CLOSED


# -- recorded FreeSWITCH connections --------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """What a capture's replay must open, whatever the chunking."""

    folder: str
    query: str  # added to the recorded target, as test_captures.py does
    default_rate: int  # the node's --default-rate in test_captures.py
    call: OpenCall
    notes: int  # texts once the call is open (send_text, stop)


EXPECTED = [
    Expected(
        "audio_stream_amigniter_8kcall_16k",
        "",
        16000,
        open_call(UUID, 16000, metadata={"event": "start", "uuid": UUID}),
        2,
    ),
    Expected(
        "audio_stream_sptmru_8kcall_16k",
        "",
        8000,
        open_call("85d95002-6fa1-4047-b46d-cfbefc684169", metadata_seen=False),
        0,
    ),
    Expected(
        "audio_stream_amigniter_stereo",
        "?rate=16000&channels=2",
        16000,
        open_call("f355cafa-cc2a-4cf1-b80f-962f54a90d39", 16000, 2, metadata_seen=False),
        0,
    ),
    Expected(
        "audio_stream_amigniter_buffer100ms",
        "",
        16000,
        open_call("662a8e72-f9fc-4cbb-8adb-b51a1141d46e", 16000, metadata_seen=False),
        0,
    ),
]

Message = tuple[int, str | bytes]  # (arrival time, text or binary payload)


def recorded(capture: Capture) -> tuple[list[Message], int]:
    """The capture's messages as FreeSWITCH sent them, and when its Close came."""
    messages: list[Message] = []
    pos = 0
    end = T0
    for step in capture.schedule():
        at = T0 + round(step.at * S)
        if step.kind == "text":
            messages.append((at, step.text))
        elif step.kind == "binary":
            messages.append((at, capture.raw[pos : pos + step.size]))
            pos += step.size
        else:
            end = at
    return messages, end


def rechunk(messages: list[Message], sizes: Iterator[int]) -> list[Message]:
    """The same audio in binary messages of the next ``sizes``, texts where they were.

    A piece arrives when the recorded message that held its first byte did.
    """
    out: list[Message] = []
    segment: list[Message] = []  # binary messages since the last text

    def flush() -> None:
        data = b"".join(payload for _, payload in segment if isinstance(payload, bytes))
        starts: list[tuple[int, int]] = []  # (offset, arrival) of each recorded message
        offset = 0
        for at, payload in segment:
            starts.append((offset, at))
            offset += len(payload)
        pos, k = 0, 0
        while pos < len(data):
            while k + 1 < len(starts) and starts[k + 1][0] <= pos:
                k += 1
            size = next(sizes)
            out.append((starts[k][1], data[pos : pos + size]))
            pos += size
        segment.clear()

    for message in messages:
        if isinstance(message[1], str):
            flush()
            out.append(message)
        else:
            segment.append(message)
    flush()
    return out


def chunkings(messages: list[Message], seed: int) -> Iterator[tuple[str, list[Message]]]:
    """HOUSE_STYLE point 3's replays, at the level of WebSocket messages."""
    yield "recorded", messages
    yield "whole", rechunk(messages, iter(lambda: 1 << 40, None))
    yield "bytewise", rechunk(messages, iter(lambda: 1, None))
    rng = random.Random(seed)
    for run in range(3):
        yield (
            f"random{run}",
            rechunk(messages, iter(lambda: rng.choice([1, 2, 3, 639, 641, rng.randrange(1, 5000)]), None)),
        )


def replay(session: AudioStreamSession, path: str, messages: list[Message], end: int) -> list[tuple[int, Action]]:
    """Drive the session as the ingress does: timeouts when due, then each message."""
    done: list[tuple[int, Action]] = []

    def due(until: int) -> None:
        deadline = session.next_deadline()
        while deadline is not None and deadline <= until:
            done.extend((deadline, a) for a in session.timeout(deadline))
            deadline = session.next_deadline()

    done.extend((T0, a) for a in session.receive_open(path, T0))
    for at, payload in messages:
        due(at)
        if isinstance(payload, str):
            done.extend((at, a) for a in session.receive_text(payload, at))
        else:
            done.extend((at, a) for a in session.receive_binary(payload, at))
    due(end)
    return done


@pytest.mark.parametrize("expected", EXPECTED, ids=lambda e: e.folder)
def test_every_capture_replayed_every_way_opens_one_call_with_exactly_the_recorded_audio(expected: Expected) -> None:
    capture = Capture.load(CAPTURES / expected.folder / "conn1.jsonl")
    messages, end = recorded(capture)
    width = 2 * expected.call.channels
    first_binary = next(at for at, payload in messages if isinstance(payload, bytes))
    for how, chunks in chunkings(messages, seed=len(capture.raw)):
        session = new_session(default_rate=expected.default_rate)
        done = replay(session, capture.path + expected.query, chunks, end)
        actions = [a for _, a in done]
        assert actions[0] == expected.call, how
        assert sum(isinstance(a, OpenCall) for a in actions) == 1, how
        assert not [a for a in actions if isinstance(a, (Close, PublishError))], how
        assert sum(isinstance(a, Note) for a in actions) == expected.notes, how
        writes = [a for a in actions if isinstance(a, WriteAudio)]
        assert len(writes) == sum(isinstance(p, bytes) for _, p in chunks), how  # one per message
        assert all(len(w.pcm) % width == 0 for w in writes), how
        assert b"".join(w.pcm for w in writes) == capture.raw, how
        assert sum(w.size for w in writes) == len(capture.raw), how
        assert [w.received for w in writes] == sorted(w.received for w in writes), how
        # Without metadata the call opens once the wait is over, not before.
        opened_at = done[0][0]
        if expected.call.metadata_seen:
            assert opened_at < first_binary, how
        else:
            assert opened_at == max(first_binary, T0 + 200 * MS_NS), how
        assert session.state is STREAMING
        # Audio moves the idle deadline, text does not; the open by timeout may come last.
        last = max(opened_at, *(at for at, p in chunks if isinstance(p, bytes)))
        assert session.next_deadline() == last + 600 * S, how


def test_the_chunkings_really_split_the_audio() -> None:
    """The replay above proves little if rechunk gave back the recorded messages."""
    capture = Capture.load(CAPTURES / EXPECTED[0].folder / "conn1.jsonl")
    messages, _ = recorded(capture)
    ways = dict(chunkings(messages, seed=1))
    binary = {how: [p for _, p in m if isinstance(p, bytes)] for how, m in ways.items()}
    assert [len(p) for p in binary["recorded"]] == [640] * 552
    assert len(binary["whole"]) == 2  # hello_from_fs cuts the audio in two
    assert len(binary["bytewise"]) == len(capture.raw)
    assert {len(p) for p in binary["random0"]} - {640}
    for how, m in ways.items():
        texts = [p for _, p in m if isinstance(p, str)]
        assert texts == capture.texts, how


# -- anything at all --------------------------------------------------------------------

inputs = st.lists(
    st.one_of(
        st.tuples(
            st.just("text"), st.sampled_from(["{}", '{"rate": 16000}', '{"rate": 5}', "garbage", '{"channels": 2}'])
        ),
        st.tuples(st.just("binary"), st.binary(max_size=50)),
        st.tuples(st.just("wait"), st.integers(0, 700 * S)),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(inputs)
def test_whatever_arrives_the_call_opens_once_and_gets_a_prefix_of_the_audio(steps: list[tuple[str, Any]]) -> None:
    session = opened()
    now = T0
    fed = b""
    actions: list[Action] = []
    for kind, value in steps:
        if kind == "text":
            actions += session.receive_text(value, now)
        elif kind == "binary":
            if session.state is not CLOSED:
                fed += value
            actions += session.receive_binary(value, now)
        else:
            now += value
            actions += session.timeout(now)
    opens = [i for i, a in enumerate(actions) if isinstance(a, OpenCall)]
    assert len(opens) <= 1
    closes = [i for i, a in enumerate(actions) if isinstance(a, Close)]
    assert len(closes) <= 1 and (not closes or closes[0] == len(actions) - 1)
    writes = [(i, a) for i, a in enumerate(actions) if isinstance(a, WriteAudio)]
    assert all(i > opens[0] for i, _ in writes)
    written = b"".join(w.pcm for _, w in writes)
    assert fed.startswith(written)
    if session.state is STREAMING:
        assert len(fed) - len(written) < 4  # only a carried part of a sample frame is missing
