"""``farm bench --rtf``: the model's single-stream CPU cost and accuracy, per decoder setting.

Decodes the fixtures with Vosk in this process, the way a worker feeds it (20 ms
chunks, a partial every 200 ms of audio, the model loaded with dither 0), and divides
CPU time by audio time, separately for speech (the Korean sentences of the corpus:
tests/data/ko_*, pause_*) and for silence (line noise at the level of the call scripts).
The physical limit follows: a node with ``C`` cores can decode at most
``C / (RTF_speech x f)`` calls with a fraction ``f`` of caller speech when silence is
not decoded (the farm's VAD gating), and ``C / (RTF_speech x f + RTF_silence x (1 - f))``
when every sample is (vosk-server). A bench capacity reads as a fraction of that.

With ``--decoder`` (repeatable, e.g. ``--decoder beam=8 --decoder beam=8,max-active=2000``)
the same audio is decoded under each setting in the same run, the model's own first,
and the character error rate against the spoken text (``orthographic`` in texts.json and
pauses.json, spaces ignored) is given beside the CPU: an on/off pair per lever. The
espeak-ng corpus is recognized poorly whatever the setting (CER ~0.6), so read the CER
as the setting's *change* in accuracy, not as the model's accuracy on real callers.

Each run uses a fresh recognizer, warmed up on other speech (tests/data/en_sentence:
a new recognizer's first seconds cost several times more): measured here, a
recognizer decodes a sentence it has already heard about 3x cheaper (0.06 instead of
0.19 CPU s per audio s), and a caller never repeats the bench's sentences to it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from bench.audio import DATA, PAUSE_SENTENCES, SENTENCES, read_mono, sentence
from bench.stats import cer
from farm.native import describe, loaded_core, loaded_malloc


__all__ = ["measure_rtf", "limits", "parse_decoder", "to_model_rate", "main"]

_PARTIAL_EVERY = 10  # chunks: the farm's default partial interval (200 ms)


def parse_decoder(spec: str) -> dict[str, float]:
    """``"beam=8,max-active=2000"`` -> ``{"beam": 8.0, "max-active": 2000.0}``."""
    out: dict[str, float] = {}
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        if key.strip() not in ("beam", "max-active", "lattice-beam") or not value:
            raise ValueError(f"decoder option {part!r}: expected beam=, max-active= or lattice-beam=")
        out[key.strip()] = float(value)
    return out


def _decode(rec: Any, pcm: bytes, rate: int) -> tuple[float, str]:
    """CPU seconds to decode ``pcm`` as one utterance, and what it said."""
    step = rate // 50 * 2
    t0 = time.thread_time()
    for i, start in enumerate(range(0, len(pcm), step)):
        rec.AcceptWaveform(pcm[start : start + step])
        if i % _PARTIAL_EVERY == _PARTIAL_EVERY - 1:
            rec.PartialResult()
    text = str(json.loads(rec.FinalResult()).get("text", ""))
    return time.thread_time() - t0, text


def to_model_rate(samples: np.ndarray, rate: int, model_rate: int, quality: str) -> bytes:
    """What a worker feeds Vosk: the call's audio resampled with soxr as a stream of 20 ms
    blocks (``quality`` QQ, the farm's, or LQ/MQ/HQ/VHQ); ``none`` leaves it to Kaldi."""
    if rate == model_rate or quality == "none":
        return samples.tobytes()
    import soxr

    stream = soxr.ResampleStream(rate, model_rate, 1, dtype="int16", quality=quality)
    block = rate // 50
    whole = len(samples) - len(samples) % block
    parts = [stream.resample_chunk(samples[i : i + block]) for i in range(0, whole, block)]
    parts.append(stream.resample_chunk(samples[whole:], last=True))
    return np.concatenate(parts).astype("<i2").tobytes()


def _references(rate: int) -> list[tuple[np.ndarray, str]]:
    texts = json.loads((DATA / "texts.json").read_text())
    pauses = json.loads((DATA / "pauses.json").read_text())
    out = []
    for name in SENTENCES:
        out.append((sentence(name, rate), str(texts[f"{name}.wav"]["orthographic"])))
    for name in PAUSE_SENTENCES:
        out.append((sentence(name, rate), " ".join(pauses[f"{name}.wav"]["orthographic"])))
    return out


def measure_rtf(
    model_dir: str,
    rate: int,
    repeats: int = 3,
    seed: int = 1,
    decoder: dict[str, float] | None = None,
    resampler: str = "QQ",
) -> dict[str, Any]:
    import vosk

    from workers.engines.vosk import model_rate, model_view

    vosk.SetLogLevel(-1)
    with tempfile.TemporaryDirectory(prefix="farm-bench-rtf-") as view:
        model = vosk.Model(model_view(model_dir, view, decoder=decoder))  # read whole at load: the view can go
    fed = rate if resampler == "none" else model_rate(model_dir)
    speech = [(to_model_rate(s, rate, fed, resampler), ref) for s, ref in _references(rate)]
    warm_up, warm_rate = read_mono(DATA / ("en_sentence_8k.wav" if rate == 8000 else "en_sentence_16k.wav"))
    warm = to_model_rate(warm_up, warm_rate, fed, resampler)
    noise_peak = int(0.002 * 32767)
    silence = to_model_rate(
        np.random.default_rng(seed).integers(-noise_peak, noise_peak + 1, 10 * rate).astype("<i2"), rate, fed, resampler
    )
    speech_s = sum(len(p) for p, _ in speech) / (2 * fed)
    silence_s = len(silence) / (2 * fed)
    runs_speech, runs_silence, errors, texts = [], [], [], []
    for r in range(repeats):
        rec = vosk.KaldiRecognizer(model, fed)
        _decode(rec, warm, fed)
        cpu = 0.0
        for pcm, reference in speech:
            spent, said = _decode(rec, pcm, fed)
            cpu += spent
            if r == 0:
                errors.append(cer(said, reference))
                texts.append(said)
        runs_speech.append(cpu / speech_s)
        runs_silence.append(_decode(rec, silence, fed)[0] / silence_s)
    return {
        "rate": rate,
        "resampler": resampler,
        "decoder": decoder or {},
        "speech_audio_s": round(speech_s, 2),
        "silence_audio_s": round(silence_s, 2),
        "repeats": repeats,
        "rtf_speech": round(statistics.median(runs_speech), 4),
        "rtf_silence": round(statistics.median(runs_silence), 4),
        "rtf_speech_runs": [round(x, 4) for x in runs_speech],
        "rtf_silence_runs": [round(x, 4) for x in runs_silence],
        "cer": round(statistics.mean(errors), 4),
        "texts": texts,
    }


def limits(rtf_speech: float, rtf_silence: float, cores: int, speech_fraction: float) -> dict[str, float]:
    """Calls a node of ``cores`` can decode in real time at ``speech_fraction`` speech."""
    gated = cores / (rtf_speech * speech_fraction)
    ungated = cores / (rtf_speech * speech_fraction + rtf_silence * (1 - speech_fraction))
    return {
        "cores": cores,
        "speech_fraction": speech_fraction,
        "gated_calls": round(gated, 1),
        "ungated_calls": round(ungated, 1),
    }


def main(args: argparse.Namespace) -> int:
    from farm.config import default_model_dir

    model = getattr(args, "model", "") or os.environ.get("FARM_MODEL") or default_model_dir() or ""
    decoders: list[dict[str, float]] = [{}] + [parse_decoder(spec) for spec in getattr(args, "decoder", None) or []]
    others = (getattr(args, "resampler", None) or []) if args.rate != 16000 else []
    settings = [(model, d, "QQ") for d in decoders] + [(model, {}, q) for q in others]
    settings += [(graph, {}, "QQ") for graph in getattr(args, "graph", None) or []]
    cores = len(os.sched_getaffinity(0))
    rows: list[dict[str, Any]] = []
    print(f"model {model}, {args.rate} Hz, one stream, 3 runs each (median), same run for every setting")
    for model_dir, decoder, resampler in settings:
        r = measure_rtf(model_dir, args.rate, seed=args.seed, decoder=decoder, resampler=resampler)
        lim = limits(r["rtf_speech"], r["rtf_silence"], cores, args.speech_fraction)
        rows.append({"model": model_dir, "rtf": r, "limits": lim})
        name = ",".join(f"{k}={v:g}" for k, v in decoder.items()) or "the model's own"
        if args.rate != 16000:
            name += f", soxr {resampler}" if resampler != "none" else ", Kaldi resamples"
        if model_dir != model:
            same = "the same transcripts" if r["texts"] == rows[0]["rtf"]["texts"] else "OTHER transcripts"
            name = f"{model_dir} ({same})"
        print(
            f"  {name:28s} speech {r['rtf_speech']:.3f} CPU s/audio s, silence {r['rtf_silence']:.3f}, "
            f"CER {r['cer']:.3f}; limit at {args.speech_fraction:.0%} speech on {cores} cores: "
            f"{lim['gated_calls']:.1f} calls (farm), {lim['ungated_calls']:.1f} (silence decoded too)"
        )
    native = describe(loaded_core(), loaded_malloc())
    print(f"on {native} (a node preloads jemalloc where it is installed: farm/native.py)")
    if args.out:
        from bench.report import write_json
        from bench.run import machine_info

        write_json(args.out, {"machine": machine_info(), "model": model, "native": native, "settings": rows})
    return 0
