"""Tests for farm.ring: the per-call shared-memory audio ring."""

from __future__ import annotations

import array
import gc
import itertools
import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import pytest

from farm import ring as ring_mod
from farm.ring import MAGIC, Ring, RingError, segment_name, sweep_stale


_counter = itertools.count()
SHM = Path("/dev/shm")


def unique_name() -> str:
    """A segment name no other test (or test run) uses."""
    return f"farm-{os.getpid()}-test{next(_counter)}-{time.monotonic_ns()}"


@pytest.fixture
def make_ring() -> Iterator[Callable[..., Ring]]:
    """Create rings that are always closed and unlinked afterwards."""
    created: list[Ring] = []

    def make(**kwargs: int) -> Ring:
        kwargs.setdefault("capacity", 1024)
        kwargs.setdefault("rate", 8000)
        kwargs.setdefault("channels", 1)
        ring = Ring.create(unique_name(), **kwargs)
        created.append(ring)
        return ring

    yield make
    for ring in created:
        ring.close()
        ring.unlink()


@pytest.fixture
def raw_segment() -> Iterator[Callable[[int, bytes], str]]:
    """Create non-ring shared memory segments (unlinked afterwards)."""
    names: list[str] = []

    def make(size: int, head: bytes = b"") -> str:
        name = unique_name()
        shm = SharedMemory(name=name, create=True, size=size)
        assert shm.buf is not None
        shm.buf[: len(head)] = head
        shm.close()
        names.append(name)
        return name

    yield make
    for name in names:
        shm = SharedMemory(name=name)
        shm.close()
        shm.unlink()  # also balances the resource tracker registrations


def dead_pid() -> int:
    """A pid that belongs to no process right now."""
    while True:
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        try:
            os.kill(child.pid, 0)
        except ProcessLookupError:
            return child.pid


def pattern(start: int, n: int) -> bytes:
    """Bytes whose value identifies their cursor, to spot misplaced data."""
    return bytes((c * 7 + c // 256) & 0xFF for c in range(start, start + n))


# --- header and attach ----------------------------------------------------------------------------


def test_create_rounds_capacity_and_attach_reads_every_header_field(make_ring: Callable[..., Ring]) -> None:
    before = time.monotonic_ns()
    writer = make_ring(capacity=1001, rate=16000, channels=2, slots=64, event_seq=7)
    assert writer.capacity == 1008
    reader = Ring.attach(writer.name)
    try:
        assert reader.name == writer.name
        assert (reader.capacity, reader.rate, reader.channels) == (1008, 16000, 2)
        assert reader.event_seq == 7
        assert reader.writer_pid == os.getpid()
        assert before <= reader.created_ns <= time.monotonic_ns()
        assert (reader.write_cursor, reader.read_cursor, reader.committed, reader.frames) == (0, 0, 0, 0)
        assert (reader.overrun_bytes, reader.overrun_count) == (0, 0)
        assert not reader.closed and not reader.in_speech
        assert SHM.joinpath(writer.name).stat().st_size == 304 + 64 * 24 + 1008
        assert isinstance(Ring.write_cursor, ring_mod._Field)  # class access yields the descriptor
    finally:
        reader.close()


def test_header_fields_sit_at_the_documented_offsets(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(capacity=64, rate=48000, channels=2, slots=4, event_seq=3)
    ring.write(b"abc", recv_ns=5)
    raw = SHM.joinpath(ring.name).read_bytes()

    def u64(off: int) -> int:
        return int.from_bytes(raw[off : off + 8], "little")

    assert raw[:8] == b"FARMRNG3"
    assert (u64(8), u64(16), u64(80), u64(88), u64(96), u64(112), u64(120)) == (64, 3, 1, 4, 3, os.getpid(), 3)
    assert int.from_bytes(raw[40:44], "little") == 48000 and int.from_bytes(raw[44:48], "little") == 2
    assert u64(128) == 0  # no finalize asked
    assert (u64(136), u64(144)) == (0, 0)  # no end reason, no detail
    assert u64(272) == 0  # no amd asked
    assert (u64(280), u64(288), u64(296)) == (0, 0, 0)  # no final owed, no reader yet
    assert u64(304) == 3 and u64(312) == 5  # slot 0: end_cursor, recv_ns
    assert raw[304 + 4 * 24 : 304 + 4 * 24 + 3] == b"abc"
    assert ring.request_finalize() == 3
    assert int.from_bytes(SHM.joinpath(ring.name).read_bytes()[128:136], "little") == 4  # 1 + the cursor
    ring.mark_closed(6, "bad")
    raw = SHM.joinpath(ring.name).read_bytes()
    assert (u64(136), u64(144), raw[152:155]) == (6, 3, b"bad")


def test_a_finalize_request_marks_the_cursor_the_reader_sees(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(capacity=64)
    reader = Ring.attach(ring.name)
    try:
        assert reader.finalize_at is None
        assert ring.request_finalize() == 0  # before any audio: cursor 0 is a real request
        assert reader.finalize_at == 0
        ring.write(b"x" * 10, recv_ns=1)
        assert ring.request_finalize() == 10
        assert reader.finalize_at == 10  # the latest request replaces the earlier
    finally:
        reader.close()


def test_an_amd_request_marks_the_cursor_once(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(capacity=64)
    reader = Ring.attach(ring.name)
    try:
        assert reader.amd_at is None
        ring.write(b"x" * 10, recv_ns=1)
        assert ring.request_amd() == 10 and reader.amd_at == 10
        assert int.from_bytes(SHM.joinpath(ring.name).read_bytes()[272:280], "little") == 11  # 1 + the cursor
        ring.write(b"y" * 6, recv_ns=2)
        assert ring.request_amd() == 10 and reader.amd_at == 10  # answered once: the first request stands
    finally:
        reader.close()


def test_create_rejects_bad_arguments_and_existing_names(make_ring: Callable[..., Ring]) -> None:
    for bad in ({"capacity": 0}, {"rate": 0}, {"channels": -1}, {"slots": 0}):
        with pytest.raises(ValueError, match="must be positive"):
            make_ring(**bad)
    ring = make_ring()
    with pytest.raises(RingError, match="already exists"):
        Ring.create(ring.name, capacity=64, rate=8000, channels=1)


def test_attach_refuses_missing_small_empty_foreign_and_corrupt_segments(
    raw_segment: Callable[[int, bytes], str],
) -> None:
    with pytest.raises(RingError, match="not found"):
        Ring.attach(unique_name())
    with pytest.raises(RingError, match="too small"):
        Ring.attach(raw_segment(64, MAGIC))
    with pytest.raises(RingError, match="not a farm ring"):
        Ring.attach(raw_segment(4096, b"NOTARING"))
    # Magic right, but the header promises more payload than the segment holds.
    corrupt = MAGIC + (4096).to_bytes(8, "little") + bytes(72) + (1).to_bytes(8, "little")
    with pytest.raises(RingError, match="truncated or has a corrupt header"):
        Ring.attach(raw_segment(1024, corrupt))
    empty = unique_name()
    SHM.joinpath(empty).write_bytes(b"")
    try:
        with pytest.raises(RingError, match="too small"):
            Ring.attach(empty)
    finally:
        SHM.joinpath(empty).unlink()


def test_segment_name_embeds_owner_pid_and_sequence() -> None:
    assert segment_name(1234, 7) == "farm-1234-7"


# --- write / read ---------------------------------------------------------------------------------


def test_reads_return_exactly_the_written_bytes_across_many_wraparounds(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(capacity=1000, slots=16)
    reader = Ring.attach(ring.name)
    rng = random.Random(42)
    written, read = bytearray(), bytearray()
    try:
        for _ in range(3000):
            n = rng.randrange(1, 334, 2)  # odd sizes never line up with the capacity
            # Read (in random bites) until the frame fits, and now and then for no reason.
            while ring.write_cursor - reader.read_cursor + n > ring.capacity or rng.random() < 0.3:
                start, data = reader.read(rng.choice([None, 1, 17, 999, 5000]))
                assert start == len(read)
                read += data
                if not data:
                    break
            assert ring.write(pattern(len(written), n), recv_ns=len(written)) == 0
            written += pattern(len(written), n)
        while (chunk := reader.read())[1]:
            read += chunk[1]
        assert bytes(read) == bytes(written)
        assert ring.write_cursor == reader.read_cursor == len(written) > 200 * ring.capacity
        assert (ring.overrun_bytes, ring.overrun_count, ring.frames) == (0, 0, 3000)
    finally:
        reader.close()


def test_read_of_an_empty_ring_or_with_zero_limit_returns_nothing(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(capacity=64)
    assert ring.read() == (0, b"")
    ring.write(b"hello", recv_ns=1)
    assert ring.read(0) == (0, b"")
    assert ring.read(-3) == (0, b"")
    assert ring.read(2) == (0, b"he")
    assert ring.read() == (2, b"llo")
    assert ring.read() == (5, b"")


def test_memoryview_frames_of_any_item_size_are_stored_byte_exact(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(capacity=64)
    samples = array.array("h", [1, -2, 300, -32768])
    ring.write(memoryview(samples), recv_ns=1)
    ring.write(memoryview(b"xyz"), recv_ns=2)
    assert ring.read() == (0, samples.tobytes() + b"xyz")


def test_a_stalled_reader_is_lapped_with_exact_overrun_accounting(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(capacity=64)
    stream = pattern(0, 40 * 5)
    assert ring.write(stream[0:40], recv_ns=0) == 0
    assert ring.write(stream[40:80], recv_ns=0) == 16  # 80 - 64 unread bytes overwritten
    assert ring.write(stream[80:120], recv_ns=0) == 40  # oldest present was 16, now 56
    assert (ring.overrun_bytes, ring.overrun_count) == (56, 2)
    start, data = ring.read()
    assert (start, data) == (56, stream[56:120])  # skipped to the oldest byte still present
    assert ring.read_cursor == 120
    assert ring.write(stream[120:160], recv_ns=0) == 0  # caught up: no more loss
    assert ring.read(10) == (120, stream[120:130])
    assert ring.write(stream[160:200], recv_ns=0) == 6  # 70 unread now: the 6 oldest go
    assert (ring.overrun_bytes, ring.overrun_count) == (62, 3)
    assert ring.read() == (136, stream[136:200])


def test_a_lapped_reader_is_not_charged_twice(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(capacity=64)
    for k in range(10):
        ring.write(pattern(k * 32, 32), recv_ns=k)
    # Each write beyond the first two overwrites exactly its own size of never-read audio.
    assert (ring.overrun_bytes, ring.overrun_count) == (320 - 64, 8)
    assert ring.read() == (256, pattern(256, 64))


def test_a_frame_larger_than_the_ring_keeps_only_its_tail(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(capacity=64)
    big = pattern(0, 100)
    assert ring.write(big, recv_ns=1) == 36
    assert ring.read() == (36, big[36:])
    ring.write(pattern(100, 10), recv_ns=2)
    ring.read()
    # Now the payload position is 46: the kept tail wraps around the end.
    bigger = pattern(110, 150)
    assert ring.write(memoryview(bigger), recv_ns=3) == 150 - 64
    assert ring.read() == (260 - 64, bigger[-64:])
    assert (ring.overrun_bytes, ring.overrun_count, ring.write_cursor) == (36 + 86, 2, 260)


def test_bytes_the_writer_may_be_overwriting_during_the_copy_are_dropped(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(capacity=64)
    stream = pattern(0, 64)
    ring.write(stream, recv_ns=1)
    buf = ring._buf
    # Simulate a writer caught between announcing a 20-byte write and publishing it.
    ring_mod._put(buf, ring_mod._OFFSET_WRITE_HORIZON, 84)
    assert ring.read() == (20, stream[20:])
    assert ring.read_cursor == 64
    # A write reaching past everything the reader copied leaves nothing trustworthy.
    ring.write(b"ab", recv_ns=2)
    ring_mod._put(buf, ring_mod._OFFSET_WRITE_HORIZON, 66 + 64 + 5)
    assert ring.read() == (66, b"")
    assert ring.read_cursor == 66


# --- cross-process --------------------------------------------------------------------------------


def _child_reader(
    name: str, ready: multiprocessing.synchronize.Event, results: multiprocessing.queues.Queue[object]
) -> None:
    """Spawned reader: read everything until the writer closes; report every chunk with its cursor."""
    ring = Ring.attach(name)
    ready.set()
    chunks: list[tuple[int, bytes]] = []
    try:
        while True:
            closed = ring.closed  # checked BEFORE the read, so a final read drains everything
            start, data = ring.read()
            if data:
                chunks.append((start, data))
            elif closed:
                break
            else:
                time.sleep(0.0002)
    finally:
        ring.close()
    results.put(chunks)


def _spawned_reader(ring: Ring) -> tuple[multiprocessing.process.BaseProcess, Callable[[], object]]:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    results: multiprocessing.queues.Queue[object] = ctx.Queue()
    child = ctx.Process(target=_child_reader, args=(ring.name, ready, results))
    child.start()
    assert ready.wait(60), "child never attached"
    return child, lambda: results.get(timeout=60)


def test_a_spawned_process_reads_exactly_what_the_parent_writes(make_ring: Callable[..., Ring]) -> None:
    """Paced by the reader (the writer waits for room), so no byte is overwritten on any machine."""
    ring = make_ring(capacity=16000, rate=8000, channels=1)
    child, result = _spawned_reader(ring)
    try:
        rng = random.Random(7)
        written = bytearray()
        deadline = time.monotonic() + 60
        for _ in range(400):
            frame = rng.randbytes(640)
            while ring.write_cursor + len(frame) - ring.read_cursor > ring.capacity:
                assert time.monotonic() < deadline, "the reader stopped reading"
                time.sleep(0.0005)
            ring.write(frame, recv_ns=time.monotonic_ns())
            written += frame
        ring.mark_closed()
        chunks = result()
        child.join(60)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode == 0
    assert (ring.overrun_bytes, ring.overrun_count) == (0, 0)
    assert isinstance(chunks, list) and b"".join(data for _, data in chunks) == bytes(written)
    assert [start for start, _ in chunks] == list(itertools.accumulate([0] + [len(d) for _, d in chunks[:-1]]))


def test_a_spawned_reader_that_falls_behind_gets_exact_bytes_and_counted_gaps(make_ring: Callable[..., Ring]) -> None:
    """Free-running writer, 16x the ring: the reader may be lapped (by design). Whatever it
    got is exactly what was written at those cursors, in order, and every byte it missed is
    within what the writer counted as overrun."""
    ring = make_ring(capacity=16000, rate=8000, channels=1)
    child, result = _spawned_reader(ring)
    try:
        rng = random.Random(11)
        written = bytearray()
        for k in range(400):
            frame = rng.randbytes(640)
            ring.write(frame, recv_ns=time.monotonic_ns())
            written += frame
            if k % 50 == 0:
                time.sleep(0.001)
        ring.mark_closed()
        chunks = result()
        child.join(60)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode == 0
    assert isinstance(chunks, list) and chunks
    expected = 0
    missed = 0
    for start, data in chunks:
        assert start >= expected, "chunks overlap or go back"
        missed += start - expected
        assert data == written[start : start + len(data)], f"bytes at cursor {start} differ from what was written"
        expected = start + len(data)
    assert expected == len(written), "the last read ends where the writer stopped"
    assert missed <= ring.overrun_bytes
    assert (missed > 0) <= (ring.overrun_count > 0)  # a gap is never silent


_PERIOD = 65536  # pattern() repeats every 64 KiB: slicing one period is far faster than computing bytes
_PATTERN = pattern(0, _PERIOD + 8192)


def _expected(start: int, n: int) -> bytes:
    return _PATTERN[start % _PERIOD : start % _PERIOD + n]


def _lapped_reader(
    name: str,
    ready: multiprocessing.synchronize.Event,
    go: multiprocessing.synchronize.Event,
    results: multiprocessing.queues.Queue[tuple[int, int, int]],
) -> None:
    """Spawned reader: verify every byte it gets against its cursor while the writer laps it."""
    ring = Ring.attach(name)
    ready.set()
    go.wait(30)  # the writer has lapped it once already: a skip, whatever the scheduling
    expected = received = skipped = bad = 0
    try:
        while True:
            closed = ring.closed
            start, data = ring.read()
            skipped += start - expected
            expected = start + len(data)
            received += len(data)
            bad += data != _expected(start, len(data))
            if closed and not data:
                break
    finally:
        ring.close()
    results.put((bad, received, skipped))


def test_a_reader_lapped_by_a_concurrent_writer_never_gets_a_torn_byte(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(capacity=4096)
    ctx = multiprocessing.get_context("spawn")
    ready, go = ctx.Event(), ctx.Event()
    lapped: multiprocessing.queues.Queue[tuple[int, int, int]] = ctx.Queue()
    child = ctx.Process(target=_lapped_reader, args=(ring.name, ready, go, lapped))
    child.start()
    try:
        assert ready.wait(30), "child never attached"
        cursor = 0
        for k in range(100_000):  # unpaced: the ring is lapped every seven frames
            ring.write(_expected(cursor, 640), recv_ns=k)
            cursor += 640
            if k == 10:
                go.set()
        ring.mark_closed()
        bad, received, skipped = lapped.get(timeout=60)
        child.join(30)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode == 0
    assert bad == 0
    assert received + skipped == cursor
    assert received > 0 and skipped > 0  # both regimes happened (the first read skips; the last gets the tail)
    assert ring.overrun_bytes >= skipped  # the writer may over-count a race, never under-count


def test_a_second_reader_resumes_from_the_committed_cursor(make_ring: Callable[..., Ring]) -> None:
    writer = make_ring(capacity=4096, event_seq=1)
    stream = pattern(0, 1000)
    for k in range(0, 1000, 100):
        writer.write(stream[k : k + 100], recv_ns=k)
    first = Ring.attach(writer.name)
    assert first.read(600) == (0, stream[:600])
    first.committed = 400
    first.in_speech = True
    first.event_seq = 5
    first.owed, first.owed_end, first.reader_pid = 2, 1 + 380, 4242
    first.close()
    first.close()  # idempotent
    second = Ring.attach(writer.name)
    try:
        assert (second.committed, second.in_speech, second.event_seq) == (400, True, 5)
        assert (second.owed, second.owed_end, second.reader_pid) == (2, 381, 4242)
        assert SHM.joinpath(writer.name).read_bytes()[280:304] == b"".join(
            v.to_bytes(8, "little") for v in (2, 381, 4242)
        )
        assert second.read_cursor == 600
        second.seek(second.committed)
        assert second.read() == (400, stream[400:])
    finally:
        second.close()


def test_a_reader_process_that_exits_without_closing_leaves_the_ring_alone(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring()
    # A separate interpreter has its own resource tracker; capture_output waits until that tracker has exited
    # too (it shares the stderr pipe), so any cleanup it would do has happened by then.
    code = f"from farm.ring import Ring; r = Ring.attach({ring.name!r}); r.read()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "leaked" not in done.stderr
    assert SHM.joinpath(ring.name).exists()
    Ring.attach(ring.name).close()


def test_writer_gone_says_whether_the_process_that_created_the_ring_died(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring()
    reader = Ring.attach(ring.name)
    try:
        assert ring.writer_pid == os.getpid() and not reader.writer_gone
        # 0: no writer recorded; 2**63: not a pid (kill() overflows): neither is proof of death.
        for pid, gone in ((dead_pid(), True), (0, False), (2**63, False), (1, False)):
            ring_mod._put(ring._buf, ring_mod._OFFSET_WRITER_PID, pid)
            assert reader.writer_gone is gone, pid
    finally:
        reader.close()


def test_seek_is_clamped_to_the_bytes_still_present(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(capacity=64)
    ring.write(pattern(0, 40), recv_ns=0)
    ring.seek(-5)
    assert ring.read_cursor == 0
    ring.seek(1000)
    assert ring.read_cursor == 40
    ring.write(pattern(40, 100), recv_ns=0)
    ring.seek(10)
    assert ring.read_cursor == 140 - 64
    ring.seek(100)
    assert ring.read() == (100, pattern(100, 40))


# --- timestamps -----------------------------------------------------------------------------------


def test_arrival_finds_the_frame_holding_a_cursor_while_it_is_in_the_table(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(capacity=1024, slots=8)
    assert ring.arrival(0) is None  # nothing written yet
    before = time.monotonic_ns()
    ring.write(b"x" * 10, recv_ns=1000)
    ring.write(b"", recv_ns=1001)  # an empty frame owns no byte
    ring.write(b"y" * 5, recv_ns=1002)
    recv, commit = ring.arrival(0) or (0, 0)
    assert recv == 1000 and before <= commit <= time.monotonic_ns()
    assert [(ring.arrival(c) or (None,))[0] for c in (9, 10, 14)] == [1000, 1002, 1002]
    assert ring.arrival(15) is None  # not written yet
    assert ring.arrival(-1) is None
    for k in range(3, 20):  # frames 3..19 are 10 bytes each, starting at cursor 15
        ring.write(b"z" * 10, recv_ns=1000 + k)
    commits = [(ring.arrival(15 + 10 * (k - 3)) or (0, 0))[1] for k in range(13, 20)]
    assert commits == sorted(commits)
    for k in range(3, 20):
        got = ring.arrival(15 + 10 * (k - 3) + 9)
        # Slots hold frames 12..19; frame 12's start went with frame 11's slot, and frame 13's start
        # (frame 12's slot) is the one the next write recycles, so only frames 14..19 are answered.
        assert (got[0] if got else None) == (1000 + k if k >= 14 else None)
    assert ring.arrival(0) is None  # frame 0 left the table long ago


def test_arrival_distrusts_slots_the_writer_recycled_during_the_search(
    make_ring: Callable[..., Ring], monkeypatch: pytest.MonkeyPatch
) -> None:
    ring = make_ring(capacity=1024, slots=4)
    for k in range(6):
        ring.write(b"a" * 10, recv_ns=k)
    assert ring.arrival(35) is None  # frame 3: its start sits in the slot the next write recycles
    assert (ring.arrival(45) or (None,))[0] == 4
    real_get = ring_mod._get
    reads = {"frames": 0}

    def racing_get(buf: memoryview, offset: int) -> tuple[int, ...]:
        # The second look at `frames` sees the writer three frames further on.
        if offset == ring_mod._OFFSET_FRAMES:
            reads["frames"] += 1
            return (6 + 3 * (reads["frames"] > 1),)
        return real_get(buf, offset)

    monkeypatch.setattr(ring_mod, "_get", racing_get)
    assert ring.arrival(45) is None


# --- flags, lifecycle -----------------------------------------------------------------------------


def test_flags_and_event_seq_are_shared_and_independent(make_ring: Callable[..., Ring]) -> None:
    writer = make_ring()
    reader = Ring.attach(writer.name)
    try:
        ring_mod._put(writer._buf, ring_mod._OFFSET_READER_FLAGS, 0b100)  # a bit owned by a future version
        reader.in_speech = True
        assert writer.in_speech and not writer.closed
        reader.in_speech = False
        assert not writer.in_speech
        assert ring_mod._get(writer._buf, ring_mod._OFFSET_READER_FLAGS)[0] == 0b100
        assert reader.end == (0, "")
        writer.mark_closed()
        writer.mark_closed(2, "said why")
        assert reader.closed and not reader.in_speech
        assert reader.end == (2, "said why")
        writer.mark_closed(6, "é" * 100)  # 200 bytes of UTF-8: cut to whole characters within 120
        assert reader.end == (6, "é" * 60)
        reader.event_seq += 1
        assert writer.event_seq == 1
        writer.playing = True  # the PLAYING bit sits beside CLOSED; neither disturbs the other
        assert reader.playing and reader.closed
        writer.playing = False
        assert not reader.playing and reader.closed
    finally:
        reader.close()


def test_only_the_creator_may_unlink_and_unlink_is_idempotent() -> None:
    name = unique_name()
    writer = Ring.create(name, capacity=64, rate=8000, channels=1)
    reader = Ring.attach(name)
    with pytest.raises(RingError, match="only the creator"):
        reader.unlink()
    writer.unlink()
    writer.unlink()
    assert not SHM.joinpath(name).exists()
    writer.write(b"still mapped", recv_ns=1)  # unlinking removes the name, not the mappings
    assert reader.read() == (0, b"still mapped")
    reader.close()
    writer.close()


def test_with_blocks_close_and_the_creator_s_also_unlinks() -> None:
    name = unique_name()
    with Ring.create(name, capacity=64, rate=8000, channels=1) as writer:
        with Ring.attach(name) as reader:
            writer.write(b"hi", recv_ns=1)
            assert reader.read() == (0, b"hi")
        assert SHM.joinpath(name).exists()
    assert not SHM.joinpath(name).exists()
    with pytest.raises(ValueError):
        reader.read()  # closed rings refuse to touch the (unmapped) segment


def test_a_dropped_ring_releases_its_mapping_quietly(
    make_ring: Callable[..., Ring], monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = make_ring()
    reader = Ring.attach(writer.name)
    reader.read()
    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    del reader
    gc.collect()
    assert unraisable == []


# --- sweep ----------------------------------------------------------------------------------------


def test_sweep_removes_only_farm_rings_of_dead_processes(tmp_path: Path) -> None:
    dead, alive = dead_pid(), os.getpid()
    ring_head = MAGIC + bytes(120)
    entries = {
        f"farm-{dead}-1": ring_head,  # swept
        f"farm-{dead}-call-7": ring_head,  # swept: anything may follow the pid
        f"farm-{alive}-1": ring_head,  # owner alive
        f"farm-{dead}-2": b"NOTARING" + bytes(120),  # not ours
        f"farm-{dead}-3": b"FARM",  # too short for the magic
        f"farm-{dead}-": ring_head,  # no sequence part
        "farm-0-1": ring_head,  # pid 0 would signal our own process group
        "farm-99999999999999999999-1": ring_head,  # not a pid at all
        "farm-abc-1": ring_head,
        "other-segment": ring_head,
    }
    for entry, content in entries.items():
        tmp_path.joinpath(entry).write_bytes(content)
    tmp_path.joinpath(f"farm-{dead}-dir").mkdir()  # unreadable as a file: left alone
    assert sweep_stale(str(tmp_path)) == [f"farm-{dead}-1", f"farm-{dead}-call-7"]
    left = {p.name for p in tmp_path.iterdir()}
    assert left == set(entries) - {f"farm-{dead}-1", f"farm-{dead}-call-7"} | {f"farm-{dead}-dir"}
    assert sweep_stale(str(tmp_path / "missing")) == []


def test_sweep_treats_a_pid_it_may_not_signal_as_alive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp_path.joinpath("farm-1-1").write_bytes(MAGIC)

    def refuse(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", refuse)
    assert sweep_stale(str(tmp_path)) == []
    assert tmp_path.joinpath("farm-1-1").exists()


def test_sweep_removes_a_real_orphaned_ring_segment(monkeypatch: pytest.MonkeyPatch) -> None:
    name = segment_name(dead_pid(), next(_counter))
    orphan = Ring.create(name, capacity=64, rate=8000, channels=1)
    orphan.close()  # its "owner" died without unlinking
    real_listdir = os.listdir

    def only_ours(path: str) -> list[str]:
        # Other suites' segments in /dev/shm are none of this test's business.
        return [entry for entry in real_listdir(path) if entry == name]

    monkeypatch.setattr(os, "listdir", only_ours)
    try:
        assert sweep_stale() == [name]
        assert not SHM.joinpath(name).exists()
        with pytest.raises(RingError, match="not found"):
            Ring.attach(name)
    finally:
        orphan.unlink()  # a no-op when the sweep worked
