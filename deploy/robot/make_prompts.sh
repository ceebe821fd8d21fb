#!/usr/bin/env bash
# The example scenarios' prompts (deploy/robot/prompts/*.wav), made with espeak-ng + sox:
# Korean, 8 kHz mono 16-bit, short. Stand-ins for a campaign's recorded prompts: any
# 16-bit WAV at any rate works (farm converts it for the call's module).
# Voice and processing as tests/make_fixtures.sh (espeak-ng 1.51, SoX 14.4.2).
set -euo pipefail
cd "$(dirname "$0")/prompts"
say() {  # say NAME TEXT
    espeak-ng -v ko+klatt2 -s 200 -p 65 -g 0 -w "/tmp/prompt-$1.wav" "$2"
    sox -R -D -V1 "/tmp/prompt-$1.wav" -r 8000 -c 1 -b 16 "$1.wav" gain -3
    rm -f "/tmp/prompt-$1.wav"
}
say ask "예약 확인 전화임니다 마즈세요"            # 예약 확인 전화입니다, 맞으세요?
say again "다시 한번 말씀해 주세요"                # 다시 한번 말씀해 주세요
say transfer "상담원 연결해 드리겓씀니다"           # 상담원 연결해 드리겠습니다
say callback "나중에 다시 연락 드리겓씀니다"        # 나중에 다시 연락 드리겠습니다
say goodbye "감사함니다"                          # 감사합니다
say voicemail "예약 확인 전화엳씀니다 다시 연락 드리겓씀니다"  # 예약 확인 전화였습니다, 다시 연락 드리겠습니다
