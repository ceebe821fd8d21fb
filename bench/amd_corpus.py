"""A labelled corpus of call answers for answering-machine detection, made locally.

``generate(out_dir, count=200, seed=1)`` writes ``count`` 8 kHz mono int16 WAV files
and ``manifest.jsonl`` (one JSON object per case: file, kind, expected human / machine
/ unknown, the tones with their exact start/end ms, the speech spans and the texts
spoken). Everything is synthetic and made here: speech by espeak-ng (Korean
``ko+klatt2`` in pronunciation spelling as ``tests/make_fixtures.sh`` does, a few
English cases with ``en``), tones and noise by numpy. Nothing is downloaded.

Each distinct text is spoken by espeak-ng once per rendition (two renditions per text,
speed 150-220 and pitch 40-80 drawn from the seed), then every case varies it with
SoX (``tempo``, ``pitch`` in cents, resampled to 8 kHz) and numpy (peak level), places
it on a timeline with tones, adds white line noise at -50..-40 dBFS RMS and makes a
G.711 µ-law round trip. A case's content depends only on (seed, its index), so the
first N cases are the same whatever ``count`` is.

Kinds, in a fixed 20-slot pattern (per 200: 70 / 30 / 40 / 10 / 10 / 10 / 10 / 10 / 10):

- ``human``: a short greeting (여보세요, 네 여보세요, 네 말씀하세요, 누구세요, 안녕하세요,
  some English) after 0.3-1.5 s of silence, then silence; 30 % say a second short
  phrase 1.5-2 s later. Expected human.
- ``machine``: a voicemail greeting of 3-8 s, no beep. Expected machine.
- ``machine_beep``: the same, then a beep of 400-2000 Hz lasting 100-1500 ms.
- ``short_machine_beep``: a short voicemail prompt (메시지를 남겨 주세요) then a beep:
  speech with a tone after it. Expected machine; a cadence alone calls it human.
- ``silence``: line noise only. Expected machine, as Asterisk's AMD() labels it
  (INITIALSILENCE: nobody spoke within 2.5 s of answer).
- ``sit``: the special information tones (913.8 / 1370.6 / 1776.7 Hz, 274 / 274 / 380 ms),
  half of them followed by an intercept announcement. Expected unknown.
- ``busy`` (480+620 Hz 0.5 s on / 0.5 s off), ``reorder`` (0.25 / 0.25): unknown.
- ``fax``: alternately CNG (1100 Hz, 0.5 s on / 3 s off) and CED (2100 Hz, 3 s): machine.

CLI: ``python -m bench.amd_corpus OUT_DIR [--count N] [--seed S]``.
"""

from __future__ import annotations


__all__ = ["RATE", "KINDS", "Case", "SpeechSpan", "ToneSpan", "generate", "load", "main", "mulaw_round_trip"]

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import wave
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt


RATE: Final = 8000
VERSION: Final = 1  # bump when the generation changes: cached corpora are then rebuilt
MAX_MS: Final = 12000
MANIFEST: Final = "manifest.jsonl"
_PATTERN: Final = (
    "human", "machine", "human", "machine_beep", "silence", "human", "machine_beep", "sit", "human",
    "machine", "human", "busy", "machine_beep", "human", "short_machine_beep", "reorder", "human",
    "machine_beep", "machine", "fax",
)  # fmt: skip
KINDS: Final = tuple(dict.fromkeys(_PATTERN))
_EXPECTED: Final = {
    "human": "human", "machine": "machine", "machine_beep": "machine", "short_machine_beep": "machine",
    "silence": "machine", "sit": "unknown", "busy": "unknown", "reorder": "unknown", "fax": "machine",
}  # fmt: skip

# (text given to espeak in pronunciation spelling, normal spelling)
_HUMAN: Final = (
    ("여보세요", "여보세요"),
    ("네 여보세요", "네 여보세요"),
    ("네 말쓰마세요", "네 말씀하세요"),
    ("누구세요", "누구세요"),
    ("안녕하세요", "안녕하세요"),
    ("예 여보세요", "예 여보세요"),
)
_HUMAN_EN: Final = (("Hello?", "Hello?"), ("Hello, who is this?", "Hello, who is this?"))
_SECOND: Final = (("누구세요", "누구세요"), ("네 말쓰마세요", "네 말씀하세요"), ("여보세요", "여보세요"),
                  ("무슨 니리세요", "무슨 일이세요"))  # fmt: skip
_MACHINE: Final = (
    ("지그믄 저나를 바들 쑤 업씀니다 삐 소리가 나면 메시지를 남겨 주세요",
     "지금은 전화를 받을 수 없습니다 삐 소리가 나면 메시지를 남겨 주세요"),
    ("고객님의 저나가 꺼져 이써 음성 사서하므로 연결됨니다", "고객님의 전화가 꺼져 있어 음성 사서함으로 연결됩니다"),
    ("연결이 되지 아나 음성 사서하므로 연결됨니다 삐 소리 후에 메시지를 남겨 주십씨오",
     "연결이 되지 않아 음성 사서함으로 연결됩니다 삐 소리 후에 메시지를 남겨 주십시오"),
    ("안녕하세요 김민수임니다 지그믄 부재중이오니 메시지를 남겨 주시면 연락 드리겓씀니다",
     "안녕하세요 김민수입니다 지금은 부재중이오니 메시지를 남겨 주시면 연락 드리겠습니다"),
    ("안녕하세요 고객쎈터임니다 지그믄 상담 시가니 아님니다 나중에 다시 저나해 주십씨오",
     "안녕하세요 고객센터입니다 지금은 상담 시간이 아닙니다 나중에 다시 전화해 주십시오"),
    ("지금 거신 저나는 음성 사서하므로 연결되며 통화료가 부과됨니다",
     "지금 거신 전화는 음성 사서함으로 연결되며 통화료가 부과됩니다"),
)  # fmt: skip
_MACHINE_EN: Final = (
    ("Hi, you have reached Alex. I can not take your call right now. Please leave a message after the tone.",) * 2,
    ("The person you are calling is not available. Please leave your message after the beep.",) * 2,
)
_SHORT_MACHINE: Final = (
    ("메시지를 남겨 주세요", "메시지를 남겨 주세요"),
    ("Please leave a message.", "Please leave a message."),
)
_INTERCEPT: Final = ("지금 거신 버노는 엄는 버니오니 다시 화긴하시고 거러 주십씨오",
                     "지금 거신 번호는 없는 번호이오니 다시 확인하시고 걸어 주십시오")  # fmt: skip
_SIT: Final = ((913.8, 274), (1370.6, 274), (1776.7, 380))


@dataclass(frozen=True)
class ToneSpan:
    kind: str  # beep | sit | busy | reorder | fax_cng | fax_ced
    start_ms: int
    end_ms: int
    freq_hz: float  # the first (lowest) frequency for sit and busy/reorder pairs


@dataclass(frozen=True)
class SpeechSpan:
    start_ms: int
    end_ms: int
    text: str  # what espeak-ng was given
    orthographic: str
    voice: str


@dataclass(frozen=True)
class Case:
    file: str  # relative to the corpus directory
    kind: str
    expected: str  # human | machine | unknown
    tones: tuple[ToneSpan, ...]
    speech: tuple[SpeechSpan, ...]
    text: str  # the orthographic texts spoken, " / "-joined
    duration_ms: int
    note: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)

    @staticmethod
    def from_dict(d: dict[str, object]) -> Case:
        tones = tuple(ToneSpan(**t) for t in d["tones"])  # type: ignore[attr-defined]
        speech = tuple(SpeechSpan(**s) for s in d["speech"])  # type: ignore[attr-defined]
        return Case(**{**d, "tones": tones, "speech": speech})  # type: ignore[arg-type]


# ---- the plan of a case: pure, from (seed, index) --------------------------------


@dataclass(frozen=True)
class _Say:
    text: str
    ortho: str
    voice: str
    rendition: int  # which espeak rendition of the text
    tempo: float
    cents: int
    peak_db: float


@dataclass(frozen=True)
class _Tone:
    kind: str
    freqs: tuple[float, ...]
    ms: int
    level_db: float


@dataclass(frozen=True)
class _Gap:
    ms: int


_Seg = _Say | _Tone | _Gap


@dataclass(frozen=True)
class _Plan:
    index: int
    kind: str
    segments: tuple[_Seg, ...]
    tail_ms: int  # silence after the last segment
    noise_db: float
    note: str


def _say(rng: random.Random, pair: tuple[str, str], human: bool) -> _Say:
    voice = "ko+klatt2" if any("\uac00" <= c <= "\ud7a3" for c in pair[0]) else "en"
    tempo = rng.uniform(0.9, 1.15) if human else rng.uniform(0.85, 1.1)
    return _Say(pair[0], pair[1], voice, rng.randrange(2), round(tempo, 3), rng.randint(-200, 200),
                round(rng.uniform(-10, -2), 1))  # fmt: skip


def _plan(seed: int, index: int) -> _Plan:
    rng = random.Random(f"amd-corpus:{seed}:{index}")
    kind = _PATTERN[index % len(_PATTERN)]
    segs: list[_Seg] = []
    note = ""
    tail = rng.randint(1000, 2000)
    if kind == "human":
        greetings = _HUMAN_EN if rng.random() < 0.15 else _HUMAN
        segs += [_Gap(rng.randint(300, 1500)), _say(rng, rng.choice(greetings), True)]
        if rng.random() < 0.3:
            segs += [_Gap(rng.randint(1500, 2000)), _say(rng, rng.choice(_SECOND), True)]
        tail = rng.randint(3000, 4000)
    elif kind in ("machine", "machine_beep"):
        texts = _MACHINE_EN if rng.random() < 0.2 else _MACHINE
        segs += [_Gap(rng.randint(200, 1000)), _say(rng, rng.choice(texts), False)]
        if kind == "machine_beep":
            segs += [_Gap(rng.randint(200, 800)), _beep(rng)]
    elif kind == "short_machine_beep":
        segs += [_Gap(rng.randint(300, 1000)), _say(rng, rng.choice(_SHORT_MACHINE), False)]
        segs += [_Gap(rng.randint(300, 700)), _beep(rng)]
    elif kind == "silence":
        tail = rng.randint(6000, 8000)
        note = "nobody speaks: Asterisk's AMD() says MACHINE (INITIALSILENCE) after 2.5 s"
    elif kind == "sit":
        level = rng.uniform(-20, -10)
        segs.append(_Gap(rng.randint(200, 600)))
        segs += [_Tone("sit", (f,), ms, level) for f, ms in _SIT]
        if rng.random() < 0.5:
            segs += [_Gap(rng.randint(100, 300)), _say(rng, _INTERCEPT, False)]
        note = "special information tones: the number is not in service; a dialer marks it"
    elif kind in ("busy", "reorder"):
        on = 500 if kind == "busy" else 250
        level = rng.uniform(-20, -10)
        segs.append(_Gap(rng.randint(200, 600)))
        for _ in range(6000 // (2 * on)):
            segs += [_Tone(kind, (480.0, 620.0), on, level), _Gap(on)]
    elif kind == "fax":
        level = rng.uniform(-18, -10)
        segs.append(_Gap(rng.randint(200, 1000)))
        if (index // len(_PATTERN)) % 2 == 0:
            for _ in range(3):
                segs += [_Tone("fax_cng", (1100.0,), 500, level), _Gap(3000)]
            tail = 0
        else:
            segs.append(_Tone("fax_ced", (2100.0,), 3000, level))
            tail = rng.randint(2000, 3000)
    return _Plan(index, kind, tuple(segs), tail, round(rng.uniform(-50, -40), 1), note)


def _beep(rng: random.Random) -> _Tone:
    return _Tone("beep", (float(rng.randint(400, 2000)),), rng.randint(100, 1500), rng.uniform(-12, -4))


# ---- audio ---------------------------------------------------------------------------


def mulaw_round_trip(x: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
    """G.711 µ-law encode then decode (the segment tables of ITU-T G.711, in numpy)."""
    v = x.astype(np.int32)
    sign = v < 0
    mag = np.minimum(np.abs(v), 32635) + 0x84
    exponent = np.floor(np.log2(mag)).astype(np.int32) - 7
    mantissa = (mag >> (exponent + 3)) & 0x0F
    # decode: ((mantissa << 3) + bias) << exponent, minus the bias
    out = (((mantissa << 3) + 0x84) << exponent) - 0x84
    decoded: npt.NDArray[np.int16] = np.where(sign, -out, out).astype(np.int16)
    return decoded


def _tts(cache: Path, say: _Say, seed: int) -> Path:
    """espeak-ng's rendition of a text (22050 Hz WAV), made once per (text, rendition)."""
    rng = random.Random(f"amd-tts:{seed}:{say.voice}:{say.text}:{say.rendition}")
    speed, pitch = rng.randint(150, 220), rng.randint(40, 80)
    key = hashlib.sha1(f"{say.voice}|{speed}|{pitch}|{say.text}".encode()).hexdigest()[:16]
    path = cache / f"{key}.wav"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        cmd = ["espeak-ng", "-v", say.voice, "-s", str(speed), "-p", str(pitch), "-g", "0", "-a", "100"]
        subprocess.run([*cmd, "-w", str(tmp), say.text], check=True, capture_output=True)
        os.replace(tmp, path)
    return path


def _tts_key(say: _Say) -> tuple[str, str, int]:
    return say.voice, say.text, say.rendition


def _speech(path: Path, say: _Say) -> npt.NDArray[np.float64]:
    """The rendition at 8 kHz with the case's tempo and pitch, cut to its audible edges, at its peak level."""
    cmd = ["sox", "-R", "-D", "-V1", str(path), "-t", "raw", "-r", str(RATE), "-e", "signed-integer", "-b", "16",
           "-c", "1", "-", "tempo", "-s", str(say.tempo), "pitch", str(say.cents)]  # fmt: skip
    raw = subprocess.run(cmd, check=True, capture_output=True).stdout
    x = np.frombuffer(raw, dtype="<i2").astype(np.float64)
    loud = np.flatnonzero(np.abs(x) > 0.01 * max(float(np.abs(x).max()), 1.0))
    x = x[loud[0] : loud[-1] + 1] if len(loud) else x[:0]
    peak = float(np.abs(x).max()) if len(x) else 1.0
    return x * (32767 * 10 ** (say.peak_db / 20) / peak)


def _tone(t: _Tone) -> npt.NDArray[np.float64]:
    n = RATE * t.ms // 1000
    time = np.arange(n) / RATE
    amp = 32767 * 10 ** (t.level_db / 20) / len(t.freqs)
    x = sum((amp * np.sin(2 * np.pi * f * time) for f in t.freqs), np.zeros(n))
    ramp = min(40, n // 2)  # 5 ms edges: no click, the span stays exact
    env = np.ones(n)
    env[:ramp] = np.linspace(0, 1, ramp)
    env[n - ramp :] = np.linspace(1, 0, ramp)
    return np.asarray(x * env, dtype=np.float64)


def _render(plan: _Plan, tts: dict[tuple[str, str, int], Path], out: Path) -> Case:
    parts: list[npt.NDArray[np.float64]] = []
    speech: list[SpeechSpan] = []
    tones: list[ToneSpan] = []
    t = 0  # samples
    for seg in plan.segments:
        if isinstance(seg, _Gap):
            x = np.zeros(RATE * seg.ms // 1000)
        elif isinstance(seg, _Say):
            x = _speech(tts[_tts_key(seg)], seg)
            speech.append(SpeechSpan(_ms(t), _ms(t + len(x)), seg.text, seg.ortho, seg.voice))
        else:
            x = _tone(seg)
            span = ToneSpan(seg.kind, _ms(t), _ms(t + len(x)), seg.freqs[0])
            if seg.kind == "sit" and tones and tones[-1].kind == "sit" and tones[-1].end_ms == span.start_ms:
                span = ToneSpan("sit", tones.pop().start_ms, span.end_ms, _SIT[0][0])  # one event for the triple
            tones.append(span)
        parts.append(x)
        t += len(x)
    parts.append(np.zeros(RATE * plan.tail_ms // 1000))
    clean = np.concatenate(parts)[: RATE * MAX_MS // 1000]
    noise = np.random.default_rng([plan.index, 7919]).standard_normal(len(clean)) * 32768 * 10 ** (plan.noise_db / 20)
    pcm = mulaw_round_trip(np.clip(np.round(clean + noise), -32768, 32767).astype(np.int16))
    name = f"amd_{plan.index:04d}_{plan.kind}.wav"
    tmp = out / f".{name}.{os.getpid()}.tmp"
    with wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.astype("<i2").tobytes())
    os.replace(tmp, out / name)
    text = " / ".join(s.orthographic for s in speech)
    return Case(name, plan.kind, _EXPECTED[plan.kind], tuple(tones), tuple(speech), text, _ms(len(pcm)), plan.note)


def _ms(samples: int) -> int:
    return samples * 1000 // RATE


# ---- the corpus ------------------------------------------------------------------------


def _stamp(count: int, seed: int, kinds: Sequence[str] | None) -> dict[str, object]:
    return {"version": VERSION, "count": count, "seed": seed, "kinds": list(kinds) if kinds else None, "rate": RATE}


def load(out_dir: Path) -> list[Case]:
    """The cases of a generated corpus, from its manifest."""
    lines = (Path(out_dir) / MANIFEST).read_text(encoding="utf-8").splitlines()
    return [Case.from_dict(json.loads(line)) for line in lines if line.strip()]


def generate(out_dir: Path, count: int = 200, seed: int = 1, kinds: Sequence[str] | None = None) -> list[Case]:
    """Write (or find already written) ``count`` cases and their manifest in ``out_dir``.

    ``kinds`` keeps only cases of those kinds (the same cases the full corpus has, in
    its order). A directory whose ``corpus.json`` matches (count, seed, kinds, version)
    and has every file is reused as it is. Files are written atomically, so concurrent
    generators into one directory only repeat work.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    unknown = sorted(set(kinds or ()) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; known: {list(KINDS)}")
    out = Path(out_dir)
    stamp = _stamp(count, seed, kinds)
    stamp_file = out / "corpus.json"
    if stamp_file.exists() and (out / MANIFEST).exists():
        try:
            if json.loads(stamp_file.read_text()) == stamp:
                cases = load(out)
                if len(cases) == count and all((out / c.file).exists() for c in cases):
                    return cases
        except (ValueError, TypeError, KeyError):
            pass  # a damaged corpus is made again
    (out / "tts").mkdir(parents=True, exist_ok=True)
    plans: list[_Plan] = []
    i = 0
    while len(plans) < count:
        if kinds is None or _PATTERN[i % len(_PATTERN)] in kinds:
            plans.append(_plan(seed, i))
        i += 1
    says = list({_tts_key(s): s for p in plans for s in p.segments if isinstance(s, _Say)}.values())
    workers = max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # the work is in espeak-ng, sox and numpy, not the GIL
        tts = dict(zip(map(_tts_key, says), pool.map(lambda s: _tts(out / "tts", s, seed), says), strict=True))
        cases = list(pool.map(lambda p: _render(p, tts, out), plans))
    tmp = out / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text("".join(c.to_json() + "\n" for c in cases), encoding="utf-8")
    os.replace(tmp, out / MANIFEST)
    stamp_file.write_text(json.dumps(stamp) + "\n")
    return cases


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.amd_corpus", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    cases = generate(args.out_dir, args.count, args.seed)
    by_kind: dict[str, int] = {}
    for c in cases:
        by_kind[c.kind] = by_kind.get(c.kind, 0) + 1
    print(f"{len(cases)} cases in {args.out_dir}: " + ", ".join(f"{k} {n}" for k, n in by_kind.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
