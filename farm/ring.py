"""Shared-memory single-producer/single-consumer audio ring, one per call.

The ingress creates the ring, writes it and alone unlinks it; a worker attaches by name, reads and
only ``close()``s. Cursors count bytes ever written and never wrap (u64), so byte ``c`` lives at
payload offset ``c % capacity`` and every gap is exact. Each header field has one owner: no locks.

Segment layout (little-endian; every header field is 8-byte aligned)::

    off  field             type     owner    meaning
    0    magic             8s       creator  b"FARMRNG3", stored last by create()
    8    capacity          u64      creator  payload bytes, a multiple of 8
    16   write_cursor      u64      writer   bytes ever written; published last
    24   read_cursor       u64      reader   bytes consumed (or skipped)
    32   committed_cursor  u64      reader   start of the unfinished utterance
    40   rate, channels    2 x u32  creator  sample rate (Hz), channel count
    48   writer_flags      u64      writer   bit0 CLOSED: no more audio; bit1 PLAYING: audio is
                                             being played to the caller (barge-in applies)
    56   reader_flags      u64      reader   bit0 IN_SPEECH: inside an utterance
    64   overrun_bytes     u64      writer   unread bytes overwritten
    72   overrun_count     u64      writer   writes that overwrote unread bytes
    80   frames            u64      writer   write() calls so far
    88   slots             u64      creator  timestamp table entries
    96   event_seq         u64      reader   next per-call event sequence number
    104  created_ns        u64      creator  time.monotonic_ns() at create
    112  writer_pid        u64      creator  pid of the creating process
    120  write_horizon     u64      writer   end of the write in progress (set first)
    128  finalize          u64      writer   1 + the cursor where the writer asked the reader to end the
                                             utterance in progress (an explicit end of speech); 0: never
    136  end_reason        u64      writer   why the writer closed: a code its reader knows (the ingress and
                                             the workers: farm.protocol.events.END_REASONS); 0: not said
    144  end_detail_len    u64      writer   bytes of end_detail used
    152  end_detail        120 B    writer   UTF-8 text saying more (an error's message); both set before CLOSED
    272  amd               u64      writer   1 + the cursor from which the writer asked the reader to run
                                             answering-machine detection (a command: "answered now"); 0: never
    280  owed              u64      reader   utterances whose speech_end went out and whose final has not
    288  owed_end          u64      reader   1 + the cursor where the newest of them ended; 0: none owed
    296  reader_pid        u64      reader   pid of the worker serving the ring now: set as it takes the call,
                                             and a worker that served it before stops on seeing another
    304  timestamp table   slots x (end_cursor, recv_ns, commit_ns) u64;
                           frame k lives in slot k % slots
    304 + 24*slots         payload, capacity bytes

``write_horizon`` exposes a write that is overwriting bytes a reader is copying, which
``write_cursor``, published after the copy, cannot. Relies on in-order store visibility (x86-64).
"""

from __future__ import annotations

import os
import re
import struct
import sys
import time
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import overload


__all__ = ["MAGIC", "Ring", "RingError", "segment_name", "sweep_stale"]

MAGIC = b"FARMRNG3"

_OFFSET_MAGIC = 0
_OFFSET_CAPACITY = 8
_OFFSET_WRITE = 16
_OFFSET_READ = 24
_OFFSET_COMMITTED = 32
_OFFSET_FORMAT = 40
_OFFSET_CHANNELS = 44  # the u32 half of the format word after the rate
_OFFSET_WRITER_FLAGS = 48
_OFFSET_READER_FLAGS = 56
_OFFSET_OVERRUN_BYTES = 64
_OFFSET_OVERRUN_COUNT = 72
_OFFSET_FRAMES = 80
_OFFSET_SLOTS = 88
_OFFSET_EVENT_SEQ = 96
_OFFSET_CREATED = 104
_OFFSET_WRITER_PID = 112
_OFFSET_WRITE_HORIZON = 120
_OFFSET_FINALIZE = 128
_OFFSET_END_REASON = 136
_OFFSET_END_DETAIL_LEN = 144
_OFFSET_END_DETAIL = 152
_END_DETAIL_BYTES = 120
_OFFSET_AMD = 272
_OFFSET_OWED = 280
_OFFSET_OWED_END = 288
_OFFSET_READER_PID = 296
_OFFSET_TABLE = 304
_SLOT_SIZE = 24

_WRITER_CLOSED = 1
_WRITER_PLAYING = 2
_READER_IN_SPEECH = 1

_MAGIC = struct.Struct("<8s")
_FORMAT = struct.Struct("<II")
_U32 = struct.Struct("<I")
_SLOT = struct.Struct("<QQQ")
# Bound methods of precompiled structs spare the hot path struct.pack_into()'s format-cache lookup.
_U64 = struct.Struct("<Q")
_get = _U64.unpack_from
_put = _U64.pack_into
_monotonic_ns = time.monotonic_ns

# gh-82300: before 3.13 the resource tracker gets every create AND attach and unlinks it at that process's exit.
_TRACKED = sys.version_info < (3, 13)
_SEGMENT_RE = re.compile(r"farm-(\d+)-.+")


class RingError(Exception):
    """A ring segment is missing, not a farm ring, or used against its role."""


def segment_name(owner_pid: int, seq: int) -> str:
    """Name of the ``seq``-th ring of process ``owner_pid`` (found by sweep_stale())."""
    return f"farm-{owner_pid}-{seq}"


def _open_shm(name: str, create: bool = False, size: int = 0) -> tuple[SharedMemory, memoryview]:
    """Open (or create) a segment that the resource tracker will leave alone."""
    if sys.version_info >= (3, 13):  # pragma: no cover - exercised on 3.13+ only
        shm = SharedMemory(name=name, create=create, size=size, track=False)
    else:
        shm = SharedMemory(name=name, create=create, size=size)
        # Untrack at once (see _TRACKED).
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    assert shm.buf is not None  # None only after close()
    return shm, shm.buf


class _Field:
    """A u64 header field read through :class:`Ring` as an int attribute."""

    def __init__(self, offset: int, doc: str, fmt: struct.Struct = _U64) -> None:
        self.offset = offset
        self.fmt = fmt
        self.__doc__ = doc

    @overload
    def __get__(self, ring: None, owner: type[Ring]) -> _Field: ...
    @overload
    def __get__(self, ring: Ring, owner: type[Ring]) -> int: ...
    def __get__(self, ring: Ring | None, owner: type[Ring]) -> int | _Field:
        return self if ring is None else int(self.fmt.unpack_from(ring._buf, self.offset)[0])


class _SettableField(_Field):
    """A u64 header field that its owner also stores through :class:`Ring`."""

    def __set__(self, ring: Ring, value: int) -> None:
        _put(ring._buf, self.offset, value)


class Ring:
    """One call's audio ring; get one from :meth:`create` or :meth:`attach`."""

    __slots__ = ("_payload", "_buf", "_shm", "_name", "_owner", "_capacity", "_slots")

    capacity = _Field(_OFFSET_CAPACITY, "Payload bytes.")
    rate = _Field(_OFFSET_FORMAT, "Sample rate in Hz.", _U32)
    channels = _Field(_OFFSET_CHANNELS, "Interleaved channel count.", _U32)
    write_cursor = _Field(_OFFSET_WRITE, "Bytes ever written.")
    read_cursor = _Field(_OFFSET_READ, "Bytes consumed or skipped by the reader.")
    committed = _SettableField(_OFFSET_COMMITTED, "Where a new reader resumes (reader-owned).")
    overrun_bytes = _Field(_OFFSET_OVERRUN_BYTES, "Unread bytes the writer overwrote.")
    overrun_count = _Field(_OFFSET_OVERRUN_COUNT, "Writes that overwrote unread bytes.")
    frames = _Field(_OFFSET_FRAMES, "write() calls so far.")
    event_seq = _SettableField(_OFFSET_EVENT_SEQ, "Next per-call event sequence number.")
    owed = _SettableField(_OFFSET_OWED, "Utterances ended (speech_end out) whose final is not (reader-owned).")
    owed_end = _SettableField(_OFFSET_OWED_END, "1 + where the newest owed utterance ended; 0: none (reader-owned).")
    reader_pid = _SettableField(_OFFSET_READER_PID, "Pid of the worker serving the ring now (reader-owned).")
    created_ns = _Field(_OFFSET_CREATED, "time.monotonic_ns() when the ring was created.")
    writer_pid = _Field(_OFFSET_WRITER_PID, "Pid of the creating (writing) process.")

    def __init__(self, shm: SharedMemory, buf: memoryview, name: str, *, owner: bool) -> None:
        """Wrap an opened, validated segment (use create() or attach())."""
        self._shm = shm
        self._buf = buf
        self._name = name
        self._owner = owner
        # Fixed at create: cached so the hot paths skip the header.
        self._capacity: int = _get(buf, _OFFSET_CAPACITY)[0]
        self._slots: int = _get(buf, _OFFSET_SLOTS)[0]
        start = _OFFSET_TABLE + self._slots * _SLOT_SIZE
        self._payload = buf[start : start + self._capacity]

    @classmethod
    def create(
        cls,
        name: str,
        *,
        capacity: int,
        rate: int,
        channels: int,
        slots: int = 4096,
        event_seq: int = 0,
    ) -> Ring:
        """Create a new ring segment; the caller becomes its writer and owner.

        Args:
            name: Segment name, normally from :func:`segment_name`.
            capacity: Payload bytes; rounded up to a multiple of 8.
            rate: Sample rate in Hz.
            channels: Interleaved channel count.
            slots: Entries in the per-frame timestamp table.
            event_seq: First per-call event sequence number.

        Raises:
            ValueError: A size or format argument is not positive.
            RingError: A segment with this name already exists.
        """
        if min(capacity, rate, channels, slots) <= 0:
            raise ValueError("capacity, rate, channels and slots must be positive")
        capacity = (capacity + 7) & ~7
        size = _OFFSET_TABLE + slots * _SLOT_SIZE + capacity
        try:
            shm, buf = _open_shm(name, create=True, size=size)
        except FileExistsError as exc:
            raise RingError(f"ring segment already exists: {name}") from exc
        # ftruncate zero-fills: cursors, flags, counters and the table start at 0.
        _put(buf, _OFFSET_CAPACITY, capacity)
        _FORMAT.pack_into(buf, _OFFSET_FORMAT, rate, channels)
        _put(buf, _OFFSET_SLOTS, slots)
        _put(buf, _OFFSET_EVENT_SEQ, event_seq)
        _put(buf, _OFFSET_CREATED, time.monotonic_ns())
        _put(buf, _OFFSET_WRITER_PID, os.getpid())
        # Magic last: whoever sees it also sees a complete header.
        _MAGIC.pack_into(buf, _OFFSET_MAGIC, MAGIC)
        return cls(shm, buf, name, owner=True)

    @classmethod
    def attach(cls, name: str) -> Ring:
        """Attach to an existing ring as its reader.

        Raises:
            RingError: The segment is missing, too small or not a farm ring, or this
                process is out of file descriptors.
        """
        try:
            shm, buf = _open_shm(name)
        except FileNotFoundError as exc:
            raise RingError(f"ring segment not found: {name}") from exc
        except ValueError as exc:  # mmap refuses an empty segment
            raise RingError(f"segment {name} is too small for a ring header") from exc
        except OSError as exc:  # EMFILE: a descriptor per ring, and the process has none left
            raise RingError(f"cannot open ring segment {name}: {exc.strerror or exc}") from exc
        try:
            if shm.size < _OFFSET_TABLE:
                raise RingError(f"segment {name} is too small for a ring header")
            if _MAGIC.unpack_from(buf, _OFFSET_MAGIC)[0] != MAGIC:
                raise RingError(f"segment {name} is not a farm ring (bad magic)")
            capacity, slots = _get(buf, _OFFSET_CAPACITY)[0], _get(buf, _OFFSET_SLOTS)[0]
            need = _OFFSET_TABLE + slots * _SLOT_SIZE + capacity
            if not capacity or capacity % 8 or not slots or shm.size < need:
                raise RingError(f"segment {name} is truncated or has a corrupt header")
        except RingError:
            shm.close()
            raise
        return cls(shm, buf, name, owner=False)

    def write(self, data: bytes | memoryview, recv_ns: int) -> int:
        """Append one frame (writer only); never blocks.

        Unread audio that no longer fits is overwritten and counted as overrun; of a frame larger than the
        ring only the last ``capacity`` bytes stay.

        Args:
            data: The frame's bytes.
            recv_ns: ``time.monotonic_ns()`` when the frame was received.

        Returns:
            Unread bytes this write dropped (0 normally).
        """
        buf = self._buf
        cap = self._capacity
        if isinstance(data, memoryview):
            data = data.cast("B")  # len() of an int16 view counts samples
        n = len(data)
        w: int = _get(buf, _OFFSET_WRITE)[0]
        r: int = _get(buf, _OFFSET_READ)[0]
        end = w + n
        # max(r, w - cap): bytes of an already lapped reader were counted when lost.
        dropped = max(end - cap - max(r, w - cap), 0)
        if n > cap:
            data = memoryview(data)[n - cap :]
            n = cap
        # Announce how far this write reaches before clobbering anything.
        _put(buf, _OFFSET_WRITE_HORIZON, end)
        payload = self._payload
        pos = (end - n) % cap
        room = cap - pos
        if n <= room:
            payload[pos : pos + n] = data
        else:
            view = memoryview(data)  # slicing a view copies nothing
            payload[pos:] = view[:room]
            payload[: n - room] = view[room:]
        frames: int = _get(buf, _OFFSET_FRAMES)[0]
        slot = _OFFSET_TABLE + frames % self._slots * _SLOT_SIZE
        _SLOT.pack_into(buf, slot, end, recv_ns, _monotonic_ns())
        _put(buf, _OFFSET_FRAMES, frames + 1)
        if dropped:
            _put(buf, _OFFSET_OVERRUN_BYTES, _get(buf, _OFFSET_OVERRUN_BYTES)[0] + dropped)
            _put(buf, _OFFSET_OVERRUN_COUNT, _get(buf, _OFFSET_OVERRUN_COUNT)[0] + 1)
        # Publish last: a reader never sees the cursor ahead of its bytes.
        _put(buf, _OFFSET_WRITE, end)
        return dropped

    def read(self, max_bytes: int | None = None) -> tuple[int, bytes]:
        """Take unread bytes (reader only), byte-exact: alignment is the caller's.

        A lapped reader skips to the oldest byte present, and bytes overwritten
        during the copy are dropped from the front; ``start_cursor`` shows gaps.

        Args:
            max_bytes: Upper bound on the bytes returned; None for all.

        Returns:
            ``(start_cursor, data)``: the cursor of ``data[0]``, and the bytes.
        """
        buf = self._buf
        cap = self._capacity
        w: int = _get(buf, _OFFSET_WRITE)[0]
        r = max(_get(buf, _OFFSET_READ)[0], w - cap)
        n = w - r
        if max_bytes is not None and max_bytes < n:
            n = max(max_bytes, 0)
        if not n:
            return r, b""
        payload = self._payload
        pos = r % cap
        room = cap - pos
        if n <= room:
            data = payload[pos : pos + n].tobytes()
        else:
            data = b"".join((payload[pos:], payload[: n - room]))
        # Bytes below (newest write's reach) - capacity may hold newer audio now; max(): a write that
        # began and ended between the two reads leaves the cursor, read second, past the horizon.
        reach = max(_get(buf, _OFFSET_WRITE_HORIZON)[0], _get(buf, _OFFSET_WRITE)[0])
        lost = min(reach - cap - r, n)
        if lost > 0:
            r += lost
            data = data[lost:]
        _put(buf, _OFFSET_READ, r + len(data))
        return r, data

    def seek(self, cursor: int) -> None:
        """Move the read cursor (reader only), clamped to the bytes present.

        On reattach: ``ring.seek(ring.committed)``.
        """
        w: int = _get(self._buf, _OFFSET_WRITE)[0]
        _put(self._buf, _OFFSET_READ, min(max(cursor, w - self._capacity, 0), w))

    def arrival(self, cursor: int) -> tuple[int, int] | None:
        """``(recv_ns, commit_ns)`` of the frame holding byte ``cursor``.

        None if that frame is not written yet or has left the table; the oldest two slots count as left, since
        the writer may be recycling the slot that holds the older one's start.
        """
        buf = self._buf
        slots = self._slots
        frames: int = _get(buf, _OFFSET_FRAMES)[0]
        if not frames:
            return None
        # end_cursor is monotonic: find the first retained frame ending past cursor.
        lo, hi = max(frames - slots, 0), frames - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if _get(buf, _OFFSET_TABLE + mid % slots * _SLOT_SIZE)[0] > cursor:
                hi = mid
            else:
                lo = mid + 1
        end, recv_ns, commit_ns = _SLOT.unpack_from(buf, _OFFSET_TABLE + lo % slots * _SLOT_SIZE)
        # The frame starts where its predecessor ended (a recycled slot ends past cursor or fails the check below).
        begin = _get(buf, _OFFSET_TABLE + (lo - 1) % slots * _SLOT_SIZE)[0] if lo else 0
        # No lock: the writer may be recycling the slot of frame (frames - slots); trust only newer slots.
        if not (begin <= cursor < end) or max(lo - 1, 0) <= _get(buf, _OFFSET_FRAMES)[0] - slots:
            return None
        return recv_ns, commit_ns

    def request_finalize(self) -> int:
        """Ask the reader to end the utterance in progress where the audio written so far ends
        (writer only); returns that cursor. A later request replaces an earlier one."""
        cursor: int = _get(self._buf, _OFFSET_WRITE)[0]
        _put(self._buf, _OFFSET_FINALIZE, cursor + 1)
        return cursor

    @property
    def finalize_at(self) -> int | None:
        """The cursor of the latest :meth:`request_finalize`, None if there was none."""
        value: int = _get(self._buf, _OFFSET_FINALIZE)[0]
        return value - 1 if value else None

    def request_amd(self) -> int:
        """Ask the reader to run answering-machine detection from where the audio written so
        far ends (writer only; the call was answered now); returns that cursor. Once per call:
        a later request is ignored."""
        value: int = _get(self._buf, _OFFSET_AMD)[0]
        if value:
            return value - 1
        cursor: int = _get(self._buf, _OFFSET_WRITE)[0]
        _put(self._buf, _OFFSET_AMD, cursor + 1)
        return cursor

    @property
    def amd_at(self) -> int | None:
        """The cursor of :meth:`request_amd`, None if there was none."""
        value: int = _get(self._buf, _OFFSET_AMD)[0]
        return value - 1 if value else None

    def mark_closed(self, reason: int = 0, detail: str = "") -> None:
        """Tell the reader that no more audio will come, and why (writer only).

        Args:
            reason: A code the reader knows; 0 says nothing.
            detail: Text saying more, cut to 120 bytes of UTF-8.
        """
        raw = detail.encode()[:_END_DETAIL_BYTES].decode(errors="ignore").encode()  # whole characters only
        _put(self._buf, _OFFSET_END_REASON, reason)
        _put(self._buf, _OFFSET_END_DETAIL_LEN, len(raw))
        self._buf[_OFFSET_END_DETAIL : _OFFSET_END_DETAIL + len(raw)] = raw
        # CLOSED last: a reader that sees it also sees why.
        flags = _get(self._buf, _OFFSET_WRITER_FLAGS)[0]
        _put(self._buf, _OFFSET_WRITER_FLAGS, flags | _WRITER_CLOSED)

    @property
    def end(self) -> tuple[int, str]:
        """``(reason, detail)`` as given to :meth:`mark_closed`; ``(0, "")`` before it."""
        n = min(_get(self._buf, _OFFSET_END_DETAIL_LEN)[0], _END_DETAIL_BYTES)
        detail = bytes(self._buf[_OFFSET_END_DETAIL : _OFFSET_END_DETAIL + n]).decode(errors="replace")
        return _get(self._buf, _OFFSET_END_REASON)[0], detail

    def close(self) -> None:
        """Drop this process's mapping; the segment itself stays. Idempotent."""
        # Both idempotent. Our view pins the mmap: release it first, or BufferError.
        self._payload.release()
        self._shm.close()

    def unlink(self) -> None:
        """Remove the segment's name (creator only); attached readers keep working.

        Raises:
            RingError: Called on an attached (reader) ring.
        """
        if not self._owner:
            raise RingError("only the creator may unlink a ring; readers only close()")
        # Before 3.13 unlink() always sends UNREGISTER; an unmatched one makes the tracker print a KeyError.
        tracked = self._shm._name  # type: ignore[attr-defined]
        if _TRACKED:  # pragma: no branch - fixed per Python version
            resource_tracker.register(tracked, "shared_memory")
        try:
            self._shm.unlink()
        except FileNotFoundError:  # already unlinked, or swept: the goal is met
            if _TRACKED:  # pragma: no branch
                resource_tracker.unregister(tracked, "shared_memory")

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close; the creator also unlinks (its with-block is the call's lifetime)."""
        self.close()
        if self._owner:
            self.unlink()

    def __del__(self) -> None:
        self.close()

    @property
    def name(self) -> str:
        """Segment name."""
        return self._name

    @property
    def closed(self) -> bool:
        """Whether the writer has finished the call (see mark_closed())."""
        return bool(_get(self._buf, _OFFSET_WRITER_FLAGS)[0] & _WRITER_CLOSED)

    @property
    def writer_gone(self) -> bool:
        """Whether the process that created (and writes) this ring has died."""
        pid = self.writer_pid
        return bool(pid) and _dead(pid)

    @property
    def playing(self) -> bool:
        """Whether the call is hearing audio we play (writer sets it; workers barge in on it)."""
        return bool(_get(self._buf, _OFFSET_WRITER_FLAGS)[0] & _WRITER_PLAYING)

    @playing.setter
    def playing(self, value: bool) -> None:
        flags = _get(self._buf, _OFFSET_WRITER_FLAGS)[0] & ~_WRITER_PLAYING
        _put(self._buf, _OFFSET_WRITER_FLAGS, flags | (_WRITER_PLAYING if value else 0))

    @property
    def in_speech(self) -> bool:
        """Whether the reader is inside an utterance (outlives the reader)."""
        return bool(_get(self._buf, _OFFSET_READER_FLAGS)[0] & _READER_IN_SPEECH)

    @in_speech.setter
    def in_speech(self, value: bool) -> None:
        flags = _get(self._buf, _OFFSET_READER_FLAGS)[0] & ~_READER_IN_SPEECH
        _put(self._buf, _OFFSET_READER_FLAGS, flags | (_READER_IN_SPEECH if value else 0))


def _dead(pid: int) -> bool:
    """Whether process ``pid`` is provably gone (EPERM: another user's; overflow: not a pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):
        return False
    return False


def sweep_stale(shm_dir: str = "/dev/shm") -> list[str]:
    """Remove ``farm-<pid>-*`` entries whose pid is dead AND that start with MAGIC.

    Args:
        shm_dir: Where the system keeps POSIX shared memory.

    Returns:
        The names removed.
    """
    removed: list[str] = []
    try:
        entries = sorted(os.listdir(shm_dir))
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = _SEGMENT_RE.fullmatch(entry)
        pid = int(match.group(1)) if match else 0
        if pid <= 0:
            continue  # not a ring name (and kill(0, 0) would probe our own group)
        if not _dead(pid):
            continue  # alive (its ring is live), or not provably dead
        path = os.path.join(shm_dir, entry)
        try:
            with open(path, "rb") as fh:
                if fh.read(len(MAGIC)) != MAGIC:
                    continue
            os.unlink(path)
        except OSError:
            continue  # vanished meanwhile, a directory, or not ours to read
        removed.append(entry)
    return removed
