#!/usr/bin/env bash
# Regenerate the speech test clips in this folder (needs espeak-ng, sox and the project venv's soundfile).
#   fox.wav / fox.flac / fox.mp3 : 16 kHz mono 16-bit, "The quick brown fox jumps over the lazy dog."
#   fox.ogg                      : the same clip, Vorbis at espeak-ng's native 22050 Hz (exercises resampling)
#   what_color.wav               : 16 kHz mono 16-bit, "What color is the circle?" (speech tests)
#   ../../assets/what_color.wav  : 16 kHz mono 16-bit, "Which color does the circle have?" (the demo's spoken question:
#                                  a held-out colour wording of the shapes set, padded with 0.5 s silence before and
#                                  0.3 s after, without which Whisper base writes "which" in lower case)
# espeak-ng 1.51: voice en-gb-x-rp, 130 words per minute, 60 ms word gap (-g 6), written as 22050 Hz WAV (this
# voice/speed/gap was the most intelligible to Whisper base and tiny.en of those tried); sox resamples to 16 kHz
# (rate -v: very high quality) and writes 16-bit mono. Reruns give identical files, except fox.ogg whose random Ogg
# stream serial number changes (its audio decodes identically). Run from anywhere: ./tests/data/make_audio.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-$here/../../.venv/bin/python}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

say() {  # say TEXT OUT.wav [SOX EFFECT ...] : 16 kHz mono 16-bit speech; leaves the 22050 Hz original in $tmp/raw.wav
  espeak-ng -v en-gb-x-rp -s 130 -g 6 -w "$tmp/raw.wav" "$1"
  sox -D "$tmp/raw.wav" -r 16000 -c 1 -b 16 "$2" rate -v "${@:3}"  # -D: no dither, so reruns give identical files
}

say "The quick brown fox jumps over the lazy dog." "$here/fox.wav"
"$python" - "$here" "$tmp/raw.wav" <<'EOF'
import sys
import soundfile as sf
here, raw = sys.argv[1], sys.argv[2]
audio, rate = sf.read(f"{here}/fox.wav", dtype="float32")
sf.write(f"{here}/fox.flac", audio, rate, format="FLAC", subtype="PCM_16")
sf.write(f"{here}/fox.mp3", audio, rate, format="MP3", subtype="MPEG_LAYER_III", bitrate_mode="VARIABLE",
         compression_level=0.5)  # the default setting writes frames mpg123 complains about
native, native_rate = sf.read(raw, dtype="float32")
sf.write(f"{here}/fox.ogg", native, native_rate, format="OGG", subtype="VORBIS")
EOF
say "What color is the circle?" "$here/what_color.wav"
say "Which color does the circle have?" "$here/../../assets/what_color.wav" pad 0.5 0.3
ls -l "$here"/*.wav "$here"/*.flac "$here"/*.ogg "$here"/*.mp3 "$here/../../assets/what_color.wav"
