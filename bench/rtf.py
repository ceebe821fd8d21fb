"""``farm bench --rtf``: the model's single-stream CPU real-time factor on this machine.

Decodes the fixtures with Vosk in this process, the way a worker feeds it (20 ms
chunks, a partial every 200 ms of audio, the model loaded with dither 0), and divides
CPU time by audio time, separately for
speech (the ten sentences, trimmed) and for silence (line noise at the level of the
call scripts). The physical limit follows: a node with ``C`` cores can decode at most
``C / (RTF_speech x f)`` calls with a fraction ``f`` of caller speech when silence is
not decoded (the farm's VAD gating), and ``C / (RTF_speech x f + RTF_silence x (1 - f))``
when every sample is (vosk-server). A bench capacity reads as a fraction of that.

Each run uses a fresh recogniser, warmed up on other speech (tests/data/en_sentence:
a new recogniser's first seconds cost several times more): measured here, a
recogniser decodes a sentence it has already heard about 3x cheaper (0.06 instead of
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

from bench.audio import DATA, SENTENCES, read_mono, sentence


__all__ = ["measure_rtf", "limits", "main"]

_PARTIAL_EVERY = 10  # chunks: the farm's default partial interval (200 ms)


def _decode(rec: Any, pcm: bytes, rate: int) -> float:
    """CPU seconds to decode ``pcm`` as one utterance."""
    step = rate // 50 * 2
    t0 = time.process_time()
    for i, start in enumerate(range(0, len(pcm), step)):
        rec.AcceptWaveform(pcm[start : start + step])
        if i % _PARTIAL_EVERY == _PARTIAL_EVERY - 1:
            rec.PartialResult()
    rec.FinalResult()
    return time.process_time() - t0


def measure_rtf(model_dir: str, rate: int, repeats: int = 3, seed: int = 1) -> dict[str, Any]:
    import vosk

    from workers.engines.vosk import model_view

    vosk.SetLogLevel(-1)
    with tempfile.TemporaryDirectory(prefix="farm-bench-rtf-") as view:
        model = vosk.Model(model_view(model_dir, view))  # read whole at load: the view can go
    speech = [sentence(name, rate).tobytes() for name in SENTENCES]
    warm_up = read_mono(DATA / ("en_sentence_8k.wav" if rate == 8000 else "en_sentence_16k.wav"))[0].tobytes()
    noise_peak = int(0.002 * 32767)
    silence = np.random.default_rng(seed).integers(-noise_peak, noise_peak + 1, 10 * rate).astype("<i2").tobytes()
    speech_s = sum(len(p) for p in speech) / (2 * rate)
    silence_s = len(silence) / (2 * rate)
    runs_speech, runs_silence = [], []
    for _ in range(repeats):
        rec = vosk.KaldiRecognizer(model, rate)
        _decode(rec, warm_up, rate)
        runs_speech.append(sum(_decode(rec, p, rate) for p in speech) / speech_s)
        runs_silence.append(_decode(rec, silence, rate) / silence_s)
    return {
        "rate": rate,
        "speech_audio_s": round(speech_s, 2),
        "silence_audio_s": round(silence_s, 2),
        "repeats": repeats,
        "rtf_speech": round(statistics.median(runs_speech), 4),
        "rtf_silence": round(statistics.median(runs_silence), 4),
        "rtf_speech_runs": [round(x, 4) for x in runs_speech],
        "rtf_silence_runs": [round(x, 4) for x in runs_silence],
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
    r = measure_rtf(model, args.rate, seed=args.seed)
    cores = len(os.sched_getaffinity(0))
    lim = limits(r["rtf_speech"], r["rtf_silence"], cores, args.speech_fraction)
    print(f"model {model}, {args.rate} Hz, one stream, {r['repeats']} runs (median)")
    print(f"  speech : {r['rtf_speech']:.3f} CPU s per audio s ({r['speech_audio_s']:.1f} s of speech per run)")
    print(f"  silence: {r['rtf_silence']:.3f} CPU s per audio s ({r['silence_audio_s']:.1f} s of line noise per run)")
    print(
        f"physical limit on {cores} cores at {args.speech_fraction:.0%} speech: "
        f"{lim['gated_calls']:.1f} calls when only speech is decoded = cores / (RTF x speech fraction) (farm), "
        f"{lim['ungated_calls']:.1f} when silence is decoded too (vosk-server)"
    )
    if args.out:
        from bench.report import write_json
        from bench.run import machine_info

        write_json(args.out, {"machine": machine_info(), "model": model, "rtf": r, "limits": lim})
    return 0


if __name__ == "__main__":
    print(json.dumps(measure_rtf(os.environ.get("FARM_MODEL", ""), 8000), indent=1))
