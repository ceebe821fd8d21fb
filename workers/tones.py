"""Tone and beep detection on a call's audio: voicemail beeps, SIT, busy, reorder, fax.

Sans-I/O and numpy only: feed int16 mono samples in chunks of any size, get
:class:`ToneEvent` s back. Times are milliseconds of audio fed (plus ``start_ms``).

Method. The audio is cut into 20 ms frames; each ``feed`` analyses all its whole frames
at once with one Hann-windowed ``rfft`` (bins are 50 Hz wide at any rate). Per frame it
keeps the two strongest spectral peaks between 200 and 3000 Hz, their frequencies by
parabolic interpolation of the log power (error under 5 Hz down to 10 dB SNR), and
*purity*: the energy within +-1 bin of a peak (of both peaks, for a dual tone) over the
frame's whole energy. A pure sine scores 0.96-0.98 (0.86 at 10 dB SNR); speech never
reached 0.88 on any committed fixture (espeak and recorded, 8 and 16 kHz), because
voiced speech spreads its energy over harmonics 100-250 Hz apart. A frame is *single
tonal* if it is loud enough and one peak holds ``purity`` of its energy, *dual tonal* if
two peaks within ``max_twist_db`` of each other hold it together. Consecutive tonal
frames whose peaks stay within max(``drift_hz``, ``drift_frac`` x f) of the run's mean
form a *segment*. Its edges are refined below one frame from the energy of the edge
frames (a half-filled frame has half the energy), so ends are accurate to ~5 ms on
clean tones and within 20 ms otherwise.

Decisions, all on segments:

- ``beep``: a single-tone segment in ``beep_low_hz``..``beep_high_hz`` lasting
  ``min_beep_ms``..``max_beep_ms``. It is reported on the first frame that does not
  continue it if that frame is quiet (10 dB down), else up to two frames later: a tone
  followed within 40 ms by another tone makes a *chain* (SIT, a two-tone beep, a
  melody), which gives a beep for its last segment only, and none if it has more than
  two segments (music) or is a SIT. Same-frequency segments <= 50 ms apart are joined,
  so a concealed lost packet or a crackle does not split a beep (a fully silent gap
  does); more than one join per second of tone is no beep (the 440 + 480 Hz US
  ringback beats at 40 Hz and reads as a 460 Hz tone that breaks up every 100 ms).
- ``sit``: three chained segments of 913.8/985.2, 1370.6/1428.5 and 1776.7 Hz (+-tolerance),
  each 200-450 ms (nominally 274 or 380 ms); reported at the end of the third.
- ``fax_ced``: a single tone at 2100 +- 21 Hz (run mean) lasting ``ced_min_ms``, joined
  pieces included (ANSam's phase reversals break it every 450 ms); reported as soon as
  that is reached (``end_ms`` is then the confirmation time); it and its later pieces
  are never a beep.
- ``fax_cng``: 1100 +- 38 Hz bursts of 350-700 ms, starts 2.9-4.3 s apart (0.5 s on, 3 s
  off). An 1100 Hz burst looks exactly like a beep, and answering machines do use
  1000-1100 Hz beeps. A dialer must drop its message right after a real beep, and a
  calling fax (CNG) is rare on an outbound call (an answering fax sends CED). So the
  first burst *is* reported as a ``beep`` at once; the second burst, 3.5 s later, gives
  ``fax_cng`` (``start_ms`` = first burst) instead of a second beep, and later bursts
  give nothing: the dialer can then cancel its message.
- ``busy`` / ``reorder``: dual 480 + 620 Hz on-segments of 400-650 ms (busy) or 180-350 ms
  (reorder) separated by offs of the same range; reported once two on/off cycles are
  seen, i.e. when the second off has lasted its minimum (~1.9 s / ~0.95 s after the
  first on). ``end_ms`` is the decision time. A dual segment under 90 ms is ignored:
  where a tone ends 10-16 ms into a frame, that frame's smeared pair is off-frequency.

Each of sit, fax_ced, fax_cng, busy and reorder is reported at most once per detector.

``is_tonal(offset_ms)`` tells whether one frame of the last ``TONAL_HISTORY_MS`` was
single or dual tonal (loud enough and pure), whatever the segment made of it, so that
a VAD's voicing of a beep or a busy tone can be set aside (webrtcvad voices most
tones). A lone frame means little: nasal murmurs dominated by their fundamental
(150-300 Hz) read tonal for 1-4 frames (12 % of one recorded fixture's frames).

Limits: single-frequency call-progress tones (Europe's 425 Hz busy and ringback) are
beeps; a beep split by a fully silent 20 ms gap or by loud speech over it gives two
beeps; a beep gliding faster than the drift tolerance is a chain of short tones.

Cost: one rfft and ~20 numpy calls per ``feed`` plus a short Python step per frame.
``python -m workers.tones`` prints the CPU per 20 ms frame: ~30 us fed 20 ms at a time,
~13 us in 60 ms chunks and ~9 us in 100 ms chunks (8 and 16 kHz alike).
A call's analysis (workers/analysis.py) feeds it 100 ms at a time.
"""

from __future__ import annotations


__all__ = ["TONAL_HISTORY_MS", "TONE_KINDS", "ToneConfig", "ToneDetector", "ToneEvent"]

import math
from dataclasses import asdict, dataclass
from typing import Final, NamedTuple

import numpy as np
import numpy.fft  # now, not on a call's first tone: a lazy import can fail (EMFILE) mid-call
import numpy.typing as npt


TONE_KINDS: Final = ("beep", "sit", "busy", "reorder", "fax_cng", "fax_ced")
TONAL_HISTORY_MS: Final = 3000  # is_tonal answers for this much of the latest audio

_FRAME_MS: Final = 20
_BIN_HZ: Final = 1000.0 / _FRAME_MS  # 50 Hz, whatever the rate
_SEARCH_HZ: Final = (200.0, 3000.0)  # peaks are looked for in this band
_FULL_SCALE_SINE: Final = 32768.0**2 / 2  # mean square of a full-scale sine: 0 dBFS
_QUIET_RATIO: Final = 0.1  # a frame 10 dB below a tone's level: the tone is over
_CHAIN_GAP_FRAMES: Final = 2  # tones at most this many frames apart form a chain
_JOIN_MS: Final = 50  # same-frequency tones this close are one tone with a glitch
_SIT: Final = ((913.8, 985.2), (1370.6, 1428.5), (1776.7,))
_SIT_MS: Final = (200, 450)
_CED_HZ: Final = (2100.0, 21.0)
_CNG_HZ: Final = (1100.0, 38.0)
_CNG_MS: Final = (350, 700)
_CNG_PERIOD_MS: Final = (2900, 4300)
_BUSY_HZ: Final = (480.0, 620.0)
_CADENCE_MS: Final = {"busy": (400, 650), "reorder": (180, 350)}  # on and off


@dataclass(frozen=True)
class ToneConfig:
    """Tuning for one ToneDetector; validated on creation.

    Attributes:
        min_beep_ms: shortest beep reported (durations are measured to ~10 ms).
        max_beep_ms: longest beep; a longer steady tone is something else (CED, a
            dial or ringing tone, a test tone) and is not reported as a beep.
        beep_low_hz: lowest beep frequency (voicemail beeps are ~400-2200 Hz); both
            ends are widened by the drift tolerance, so a 400 Hz beep measured as
            399 Hz is in.
        beep_high_hz: highest beep frequency; at most 3000 Hz (the search band).
        min_level_dbfs: quieter frames (RMS, a full-scale sine = 0 dBFS) are not tones.
        purity: fraction of a frame's energy within +-1 bin of its peak (or of both
            peaks for a dual tone) that makes it tonal; in (0.5, 1]. Pure tones
            score 0.96-0.98, speech stays below 0.88.
        drift_hz: a frame continues a tone if its peak is within max(drift_hz,
            drift_frac x f) of the tone's mean frequency so far ...
        drift_frac: ... (20 Hz / 2 % split notes a semitone apart from 400 Hz up).
        max_twist_db: a dual-tone frame's weaker peak is at most this far below the
            stronger one.
        ced_min_ms: a 2100 Hz tone this long is fax CED (it is never a beep).

    Raises:
        ValueError: on any invalid value; the message carries the numbers.
    """

    min_beep_ms: int = 80
    max_beep_ms: int = 2000
    beep_low_hz: float = 400.0
    beep_high_hz: float = 2200.0
    min_level_dbfs: float = -40.0
    purity: float = 0.9
    drift_hz: float = 20.0
    drift_frac: float = 0.02
    max_twist_db: float = 6.0
    ced_min_ms: int = 2000

    def __post_init__(self) -> None:
        lo, hi = _SEARCH_HZ
        for ok, message in (
            (0 < self.min_beep_ms, f"min_beep_ms must be > 0, got {self.min_beep_ms}"),
            (self.min_beep_ms <= self.max_beep_ms, f"max_beep_ms must be >= min_beep_ms, got {self.max_beep_ms}"),
            (lo <= self.beep_low_hz, f"beep_low_hz must be >= {lo:g}, got {self.beep_low_hz}"),
            (self.beep_low_hz < self.beep_high_hz, f"beep_high_hz must be > beep_low_hz, got {self.beep_high_hz}"),
            (self.beep_high_hz <= hi, f"beep_high_hz must be <= {hi:g}, got {self.beep_high_hz}"),
            (-100.0 < self.min_level_dbfs < 0.0, f"min_level_dbfs must be in (-100, 0), got {self.min_level_dbfs}"),
            (0.5 < self.purity <= 1.0, f"purity must be in (0.5, 1], got {self.purity}"),
            (self.drift_hz >= 0, f"drift_hz must be >= 0, got {self.drift_hz}"),
            (0 <= self.drift_frac < 0.2, f"drift_frac must be in [0, 0.2), got {self.drift_frac}"),
            (self.max_twist_db >= 0, f"max_twist_db must be >= 0, got {self.max_twist_db}"),
            (self.ced_min_ms >= 500, f"ced_min_ms must be at least 500, got {self.ced_min_ms}"),
        ):
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class ToneEvent:
    """A tone decision. ``kind`` is one of TONE_KINDS.

    Attributes:
        kind: "beep", "sit", "busy", "reorder", "fax_cng" or "fax_ced".
        start_ms: where the tone (for cadences and SIT: the first segment) began.
        end_ms: beep and sit: where the tone ended (start a voicemail drop here);
            fax_ced, fax_cng, busy, reorder: where the pattern was confirmed.
        freq_hz: the main frequency; the lower one of a dual tone, the last of a SIT.
        level_dbfs: the tone's level (RMS; a full-scale sine is 0 dBFS).
    """

    kind: str
    start_ms: int
    end_ms: int
    freq_hz: float
    level_dbfs: float

    def to_dict(self) -> dict[str, object]:
        """JSON-ready members for an event."""
        return {**asdict(self), "freq_hz": round(self.freq_hz, 1), "level_dbfs": round(self.level_dbfs, 1)}


class _Segment(NamedTuple):
    """A closed run of matching tonal frames; times refined below one frame."""

    freq: float
    freq2: float
    start: float
    end: float
    energy: float  # mean sum of squares of its inner frames
    joins: int = 0  # glitches bridged inside it (see _close)

    @property
    def ms(self) -> float:
        return self.end - self.start


def _peak_hz(i: float, a: float, b: float, c: float) -> float:
    """Frequency of a spectral peak at bin i with power a, b, c at bins i-1, i, i+1:
    the vertex of a parabola through the log powers (exact for a Gaussian, ~2 Hz for Hann)."""
    la, lb, lc = math.log(a + 1e-9), math.log(b + 1e-9), math.log(c + 1e-9)
    den = la - 2.0 * lb + lc
    delta = 0.5 * (la - lc) / den if den < 0.0 else 0.0
    return (i + max(-0.5, min(0.5, delta))) * _BIN_HZ


class ToneDetector:
    """Streaming tone detector for one mono audio stream.

    Args:
        rate: sample rate in Hz; 20 ms must be whole samples and Nyquist above 3 kHz
            (8000 and 16000 are the usual).
        config: tuning; see ToneConfig.
        start_ms: the time of the first sample fed; all event times include it.
    """

    def __init__(self, rate: int, config: ToneConfig = ToneConfig(), start_ms: int = 0) -> None:
        if rate < 8000 or rate % (1000 // _FRAME_MS):
            raise ValueError(f"rate must be >= 8000 and a multiple of 50 Hz, got {rate}")
        self._rate, self._cfg, self._start_ms = rate, config, start_ms
        self._n = n = rate * _FRAME_MS // 1000
        self._win = np.hanning(n + 1)[:-1]
        self._lo, self._hi = int(_SEARCH_HZ[0] / _BIN_HZ), int(_SEARCH_HZ[1] / _BIN_HZ) + 1
        self._min_e = n * _FULL_SCALE_SINE * 10.0 ** (config.min_level_dbfs / 10.0)
        self._twist = 10.0 ** (-config.max_twist_db / 10.0)
        self._tri = np.arange(-1, 2)
        self._base = np.zeros((0, 1), np.intp)  # row offsets into a flattened spectrum
        self._rem: npt.NDArray[np.int16] = np.zeros(0, np.int16)
        self._fed = self._frame = 0  # samples fed, index of the next frame
        self._flushed = False
        self._prev_e = 0.0  # energy of the previous frame
        self._run = self._run_start = self._run_n = 0  # the open run: kind (0 none, 1 single, 2 dual), start, length
        self._fsum = self._f2sum = self._esum = self._efirst = self._elast = self._eprev = 0.0
        self._ced_done = False  # the open run was reported as CED
        self._ced_claim: tuple[float, float] | None = None  # frequency and end of the last CED piece
        self._chain: list[_Segment] = []  # closed single tones, maybe continued by the next one
        self._chain_idle = 0  # frames since the chain's last tone
        self._ons: list[tuple[str, _Segment]] = []  # recent busy/reorder on-segments
        self._cng_start: float | None = None  # start of the last CNG-shaped burst
        self._reported: set[str] = set()
        self._tonal = bytearray(TONAL_HISTORY_MS // _FRAME_MS)  # per frame, a ring indexed modulo its size

    @property
    def offset_ms(self) -> int:
        """Milliseconds of audio fed so far, plus ``start_ms``."""
        return self._start_ms + self._fed * 1000 // self._rate

    def feed(self, samples: npt.NDArray[np.int16]) -> list[ToneEvent]:
        """Analyse int16 mono samples of any length; return the events they decided.

        Raises:
            ValueError: if ``samples`` is not a 1-D int16 array.
            RuntimeError: after flush().
        """
        if self._flushed:
            raise RuntimeError("feed after flush: the detector is finished")
        if not isinstance(samples, np.ndarray) or samples.dtype != np.int16 or samples.ndim != 1:
            raise ValueError(f"samples must be a 1-d int16 numpy array, got {type(samples).__name__}")
        self._fed += samples.size
        buf = np.concatenate((self._rem, samples)) if self._rem.size else samples
        k = buf.size // self._n
        self._rem = buf[k * self._n :].copy()
        events: list[ToneEvent] = []
        if k:
            for row in self._analyse(buf[: k * self._n].reshape(k, self._n)):
                self._step(row, events)
        return events

    @property
    def analysed_ms(self) -> int:
        """Where the whole frames analysed so far end (``start_ms`` included): ``is_tonal``
        answers for the frames before it."""
        return self._start_ms + self._frame * _FRAME_MS

    def is_tonal(self, offset_ms: int) -> bool:
        """Was the 20 ms frame holding ``offset_ms`` (event time, ``start_ms`` included) a
        single or dual tone? False for a frame not yet (wholly) fed or older than
        ``TONAL_HISTORY_MS`` before the last frame analysed."""
        frame, ring = (offset_ms - self._start_ms) // _FRAME_MS, self._tonal
        return max(0, self._frame - len(ring)) <= frame < self._frame and bool(ring[frame % len(ring)])

    def flush(self) -> list[ToneEvent]:
        """End of audio (the part below one frame is ignored): close a tone still sounding."""
        events: list[ToneEvent] = []
        if not self._flushed:
            self._flushed = True
            if self._run:
                self._close(0.0, events)
            if self._chain:
                self._finish_chain(events)
        return events

    # -- analysis: vectorised over all frames of one feed -----------------------------

    def _analyse(self, frames: npt.NDArray[np.int16]) -> list[list[float]]:
        """Per frame: energy (sum of squares), spectrum total, the power of the 3 bins
        around each of the two strongest peaks in the search band, and their bins."""
        k, lo, hi = frames.shape[0], self._lo, self._hi
        x = frames.astype(np.float64)
        spec = np.fft.rfft(x * self._win, axis=1)
        p = np.abs(spec)
        p *= p
        band = p[:, lo - 1 : hi + 1]
        mid = band[:, 1:-1]
        peaks = mid * ((mid > band[:, :-2]) & (mid >= band[:, 2:]))  # local maxima only
        top = np.argpartition(peaks, -2, axis=1)[:, -2:] + lo
        if self._base.size < k:
            self._base = np.arange(k * 2)[:, None] * p.shape[1]
        tri = np.take(p, (top + self._base[:k])[:, :, None] + self._tri).reshape(k, 6)
        energy, total = np.einsum("ij,ij->i", x, x)[:, None], p.sum(axis=1)[:, None]
        rows: list[list[float]] = np.concatenate((energy, total, tri, top), axis=1).tolist()
        return rows

    # -- decisions: a short Python step per frame -------------------------------------

    def _tol(self, f: float) -> float:
        return max(self._cfg.drift_hz, self._cfg.drift_frac * f)

    def _joins(self, freq: float, end: float, next_freq: float, next_start: float) -> bool:
        """Is a tone starting at next_start the same tone as one that ended at end, after a glitch?"""
        return abs(freq - next_freq) <= self._tol(next_freq) and next_start - end <= _JOIN_MS

    def _step(self, row: list[float], events: list[ToneEvent]) -> None:
        e, tot, a0, a1, a2, b0, b1, b2, ia, ib = row
        if a1 < b1:  # a: the stronger peak
            a0, a1, a2, b0, b1, b2, ia, ib = b0, b1, b2, a0, a1, a2, ib, ia
        kind, fa, fb = 0, 0.0, 0.0
        if e >= self._min_e:
            e1, need = a0 + a1 + a2, self._cfg.purity * tot
            if e1 >= need:
                kind, fa = 1, _peak_hz(ia, a0, a1, a2)
            else:
                e2 = b0 + b1 + b2
                shared = (a2 if ib > ia else a0) if abs(ia - ib) == 2 else 0.0  # +-1 windows overlap
                if e1 + e2 - shared >= need and e2 >= e1 * self._twist:
                    kind, fa, fb = 2, _peak_hz(ia, a0, a1, a2), _peak_hz(ib, b0, b1, b2)
                    fa, fb = min(fa, fb), max(fa, fb)
        if self._run:
            n = self._run_n
            if (
                kind == self._run
                and abs(fa - self._fsum / n) <= self._tol(fa)
                and (kind == 1 or abs(fb - self._f2sum / n) <= self._tol(fb))
            ):
                self._run_n, self._esum, self._elast = n + 1, self._esum + e, e
                self._fsum, self._f2sum = self._fsum + fa, self._f2sum + fb
            else:
                self._close(e, events)
        if kind and not self._run:
            self._run, self._run_start, self._run_n, self._ced_done = kind, self._frame, 1, False
            self._fsum, self._f2sum, self._esum, self._efirst, self._elast = fa, fb, e, e, e
            self._eprev = self._prev_e
        self._tonal[self._frame % len(self._tonal)] = kind
        self._frame += 1
        if self._run == 1 and not self._ced_done:
            self._check_ced(events)
        if self._chain and self._run != 1:
            self._chain_idle += 1
            if self._chain_idle > _CHAIN_GAP_FRAMES or e < _QUIET_RATIO * self._chain[-1].energy:
                self._finish_chain(events)
        if self._ons and self._run != 2:
            self._check_cadence(events)
        self._prev_e = e

    def _t(self, frame: float) -> float:
        return self._start_ms + _FRAME_MS * frame

    def _level(self, energy: float) -> float:
        return 10.0 * math.log10(max(energy / self._n / _FULL_SCALE_SINE, 1e-12))

    def _close(self, e_next: float, events: list[ToneEvent]) -> None:
        """Close the open run at the current frame (which does not continue it)."""
        n, first, last = self._run_n, self._run_start, self._run_start + self._run_n - 1
        ref = (self._esum - self._efirst - self._elast) / (n - 2) if n >= 3 else max(self._efirst, self._elast)
        ref = max(ref, 1e-9)
        # an edge frame holding part of the tone has that part of its energy
        r = min(self._efirst / ref, 1.0)
        start = self._t(first + 1) - _FRAME_MS * r if r < 0.9 else self._t(first) - self._edge(self._eprev / ref)
        r = min(self._elast / ref, 1.0)
        end = self._t(last) + _FRAME_MS * r if r < 0.9 else self._t(last + 1) + self._edge(e_next / ref)
        seg = _Segment(self._fsum / n, self._f2sum / n, start, end, ref)
        dual, self._run = self._run == 2, 0
        if dual:
            self._on_dual(seg)
            return
        if self._ced_done or (self._ced_claim and self._joins(*self._ced_claim, seg.freq, seg.start)):
            self._ced_claim = (seg.freq, seg.end)  # a CED and its pieces are no beep, nor part of a chain
            self._chain.clear()
            return
        prev = self._chain[-1] if self._chain else None
        if prev and self._joins(prev.freq, prev.end, seg.freq, seg.start):
            w = prev.ms / max(prev.ms + seg.ms, 1.0)
            freq, joins = w * prev.freq + (1 - w) * seg.freq, prev.joins + 1
            seg = seg._replace(start=prev.start, freq=freq, energy=max(prev.energy, ref), joins=joins)
            self._chain[-1] = seg
        else:
            self._chain.append(seg)
        self._chain_idle = 0
        if len(self._chain) >= 3 and self._is_sit(self._chain[-3:]):
            start = self._chain[-3].start
            self._chain.clear()
            if "sit" not in self._reported:
                self._emit(events, "sit", start, seg.end, seg.freq, seg.energy)

    @staticmethod
    def _edge(r: float) -> float:
        """Tone in the frame beside a full edge frame: its share of the energy if clearly partial."""
        return _FRAME_MS * r if r < 0.75 else 0.0

    def _is_sit(self, segs: list[_Segment]) -> bool:
        for seg, freqs in zip(segs, _SIT, strict=True):
            if not _SIT_MS[0] <= seg.ms <= _SIT_MS[1]:
                return False
            if not any(abs(seg.freq - f) <= self._tol(f) for f in freqs):
                return False
        return True

    def _check_ced(self, events: list[ToneEvent]) -> None:
        n, start, freq = self._run_n, self._t(self._run_start), self._fsum / self._run_n
        prev = self._chain[-1] if self._chain else None
        if prev and self._joins(prev.freq, prev.end, freq, start):
            start = prev.start  # ANSam's phase reversals every 450 ms split a CED into joined pieces
        if self._t(self._frame) - start >= self._cfg.ced_min_ms and abs(freq - _CED_HZ[0]) <= _CED_HZ[1]:
            self._ced_done = True
            if "fax_ced" not in self._reported:
                self._emit(events, "fax_ced", start, self._t(self._frame), freq, self._esum / n)

    def _finish_chain(self, events: list[ToneEvent]) -> None:
        chain, self._chain = self._chain, []
        seg, cfg = chain[-1], self._cfg
        low, high = cfg.beep_low_hz - self._tol(cfg.beep_low_hz), cfg.beep_high_hz + self._tol(cfg.beep_high_hz)
        if len(chain) > 2 or not low <= seg.freq <= high:
            return
        if not cfg.min_beep_ms <= round(seg.ms) <= cfg.max_beep_ms or seg.joins > 1 + seg.ms // 1000:
            return
        if len(chain) == 1 and abs(seg.freq - _CNG_HZ[0]) <= _CNG_HZ[1] and _CNG_MS[0] <= seg.ms <= _CNG_MS[1]:
            prev, self._cng_start = self._cng_start, seg.start
            if "fax_cng" in self._reported:
                return
            if prev is not None and _CNG_PERIOD_MS[0] <= seg.start - prev <= _CNG_PERIOD_MS[1]:
                self._emit(events, "fax_cng", prev, seg.end, seg.freq, seg.energy)
                return
        self._emit(events, "beep", seg.start, seg.end, seg.freq, seg.energy)

    def _on_dual(self, seg: _Segment) -> None:
        if seg.ms < _CADENCE_MS["reorder"][0] / 2:
            return  # a tone's edge frame (a partial frame smears the pair's peaks) or a blip: no on, no break
        kind = next((k for k, (lo, hi) in _CADENCE_MS.items() if lo <= seg.ms <= hi), None)
        low, high = (abs(f - ref) <= self._tol(ref) for f, ref in zip((seg.freq, seg.freq2), _BUSY_HZ, strict=True))
        self._ons = [*self._ons[-1:], (kind, seg)] if kind and low and high else []

    def _check_cadence(self, events: list[ToneEvent]) -> None:
        (kind, last), now = self._ons[-1], self._t(self._frame)
        lo, hi = _CADENCE_MS[kind]
        if now - last.end > hi:
            self._ons.clear()
            return
        if len(self._ons) < 2 or now - last.end < lo:
            return
        kind0, first = self._ons[0]
        if kind0 == kind and lo <= last.start - first.end <= hi:
            self._ons.clear()
            if kind not in self._reported:
                self._emit(events, kind, first.start, now, last.freq, last.energy)

    def _emit(self, events: list[ToneEvent], kind: str, start: float, end: float, freq: float, energy: float) -> None:
        if kind != "beep":
            self._reported.add(kind)
        events.append(ToneEvent(kind, round(start), round(end), freq, self._level(energy)))


if __name__ == "__main__":  # CPU per 20 ms frame: loud noise, beeps, harmonic "vowels" and silence
    import time

    for rate in (8000, 16000):
        t = np.arange(rate) / rate
        noise, beep = np.random.default_rng(0).normal(0, 3000, rate), 3000 * np.sin(2 * np.pi * 1000 * t) * (t < 0.5)
        vowel = sum(2000 / h * np.sin(2 * np.pi * h * (140 + 20 * t) * t) for h in range(1, 12))
        audio = np.concatenate([noise, beep, vowel] * 20).astype(np.int16)
        for chunk_ms in (20, 60, 100):
            step, det, t0 = rate * chunk_ms // 1000, ToneDetector(rate), time.process_time()
            for i in range(0, audio.size, step):
                det.feed(audio[i : i + step])
            us = (time.process_time() - t0) / (audio.size // (rate // 50)) * 1e6
            print(f"{rate} Hz, {chunk_ms:3d} ms chunks: {us:5.1f} us CPU per 20 ms frame")
