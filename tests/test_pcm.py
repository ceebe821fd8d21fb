"""Sans-I/O tests of farm/protocol/pcm.py: arbitrary binary chunks into whole samples.

The byte vectors are PROTOCOLS.md's TV-MAS-3; the chunk sizes are those the modules
send (§1.7: 640, 1280, 3200 B) and the odd ones a WebSocket may deliver.
"""

from __future__ import annotations

import random

import pytest

from farm.protocol.pcm import SampleCarry


def test_whole_chunks_pass_through_untouched() -> None:
    carry = SampleCarry(2)
    chunk = bytes(range(256)) * 2 + bytes(128)  # 640 B, a 16 kHz 20 ms frame
    assert carry.feed(chunk) == chunk
    assert carry.pending == 0


def test_an_odd_byte_count_carries_half_a_sample_into_the_next_chunk() -> None:
    carry = SampleCarry(2)
    pcm = bytes.fromhex("0000e80318fcff7f0080feff")  # TV-MAS-3: 0, 1000, -1000, 32767, -32768, -2
    assert carry.feed(pcm[:5]) == pcm[:4]
    assert carry.pending == 1
    assert carry.feed(pcm[5:6]) == pcm[4:6]
    assert carry.pending == 0
    assert carry.feed(pcm[6:7]) == b""
    assert carry.pending == 1
    assert carry.feed(pcm[7:]) == pcm[6:]
    assert carry.pending == 0


def test_stereo_is_carried_on_four_byte_pairs() -> None:
    carry = SampleCarry(4)
    pairs = bytes.fromhex("e80318fcd00730f8")  # TV-MAS-3: L=1000,R=-1000,L=2000,R=-2000
    assert carry.feed(pairs[:3]) == b""
    assert carry.pending == 3
    assert carry.feed(pairs[3:6]) == pairs[:4]
    assert carry.pending == 2
    assert carry.feed(pairs[6:]) == pairs[4:]
    assert carry.pending == 0
    assert carry.feed(b"") == b""


@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("seed", range(5))
def test_random_chunking_concatenates_to_the_input_minus_the_tail(width: int, seed: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(rng.randrange(10_000, 40_000))
    carry = SampleCarry(width)
    out = bytearray()
    pos = 0
    while pos < len(data):
        n = rng.choice([0, 1, 2, 3, 5, 639, 641, 1279, rng.randrange(1, 4000)])
        got = carry.feed(data[pos : pos + n])
        assert len(got) % width == 0
        out += got
        pos += n
        assert len(out) + carry.pending == min(pos, len(data))
    tail = len(data) % width
    assert carry.pending == tail
    assert bytes(out) == data[: len(data) - tail]
