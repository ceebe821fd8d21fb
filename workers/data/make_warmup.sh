#!/usr/bin/env bash
# Regenerate workers/data/warmup_8k.wav: the speech a worker warms its recognizers with.
#
# A new Vosk recognizer composes its decoding graph as it goes, so its first seconds of
# audio cost several times what later ones do (bench/results/profile-12calls.md). Workers
# pay that at start, before they take calls, on this clip: Korean call-centre sentences
# spoken by espeak-ng, deliberately none of the ones the tests and the bench use (a
# recognizer that has heard the bench's sentences would decode them unfairly cheaply).
# Deterministic (espeak-ng 1.51, SoX 14.4.2, -R -D); needs only espeak-ng and sox.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
SOX=(sox -R -D -V1)
S16=(-e signed-integer -b 16 -c 1)
TEXTS=(
  "여보세요 누구시라고요"
  "지금 통화 가능하세요"
  "제가 지금 운전 중이라서요"
  "그건 이미 해지했는데요"
  "주소는 서울시 마포구 입니다"
  "내일 오전 열 시에 방문해 주세요"
  "카드 번호는 불러 드릴 수 없어요"
  "아 그래요 몰랐네요"
  "상담원 연결해 주세요"
  "다음 주 월요일에 다시 연락 주세요"
)
parts=()
for i in "${!TEXTS[@]}"; do
  espeak-ng -v ko+klatt2 -s 200 -p 65 -g 0 -a 100 -w "$TMP/raw_$i.wav" "${TEXTS[$i]}"
  "${SOX[@]}" "$TMP/raw_$i.wav" -r 16000 "${S16[@]}" "$TMP/s_$i.wav" gain -3
  parts+=("$TMP/s_$i.wav")
done
"${SOX[@]}" "${parts[@]}" "${S16[@]}" "$TMP/speech.wav"
# a white-noise floor over all of it, as on a phone line (vol 0.002, as the bench's)
"${SOX[@]}" -r 16000 -n "${S16[@]}" "$TMP/noise.wav" synth "$(soxi -s "$TMP/speech.wav")s" whitenoise vol 0.002
"${SOX[@]}" -m -v1 "$TMP/speech.wav" -v1 "$TMP/noise.wav" "${S16[@]}" "$TMP/warmup_16k.wav"
# 8 kHz in the tree (half the size; a worker resamples it to the model's rate)
"${SOX[@]}" "$TMP/warmup_16k.wav" -r 8000 "${S16[@]}" "$HERE/warmup_8k.wav"
echo "wrote $HERE/warmup_8k.wav ($(soxi -D "$HERE/warmup_8k.wav") s)"
