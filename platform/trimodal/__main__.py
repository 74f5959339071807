"""Command line: `python -m trimodal ask ...`, `python -m trimodal transcribe ...`, `python -m trimodal presets`,
`python -m trimodal rehearsal-weights --out DIR`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from trimodal.config import ConfigError, load_config, preset_names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trimodal", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ask = sub.add_parser("ask", help="answer a question about optional images and an audio clip")
    ask.add_argument("question", nargs="?", default="", help="the typed question (may be empty with --audio)")
    ask.add_argument("--preset", default="cpu", help=f"preset name ({', '.join(preset_names())}) or YAML path")
    ask.add_argument("--run", default=None, help="a finished training run (its final/ directory or the run dir)")
    ask.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    ask.add_argument("--audio", default=None, help="audio file (wav, flac, ogg, mp3)")
    ask.add_argument("--max-tokens", type=int, default=None)
    ask.add_argument("--temperature", type=float, default=0.0)
    ask.add_argument("--device", default="cpu")
    transcribe = sub.add_parser("transcribe", help="print the transcript of an audio file")
    transcribe.add_argument("file")
    transcribe.add_argument("--preset", default="cpu")
    transcribe.add_argument("--device", default="cpu")
    sub.add_parser("presets", help="list the shipped presets")
    rehearse = sub.add_parser("rehearsal-weights",
                              help="write random offline stand-ins for the phi2 preset's weights (Phi-2's tokenizer, "
                                   "TinyCLIP's shape) and print the --set overrides that use them")
    rehearse.add_argument("--out", required=True, help="directory for the weights (reused when already built)")
    return parser


def _read(path: str, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    return p.read_bytes()


def _ask(args) -> None:
    import base64

    from trimodal.inference.messages import decode_image
    from trimodal.inference.requests import SamplingParams
    from trimodal.runs import load_engine

    cfg = load_config(args.preset)
    images = [_read(f, "image") for f in args.image]
    audio = _read(args.audio, "audio") if args.audio else None
    for f, data in zip(args.image, images):
        decode_image(data, cfg.serving.max_image_pixels, param=f)  # fail early with a clear line
    start = time.perf_counter()
    engine = load_engine(cfg, args.run, args.device, vision=bool(images), speech=audio is not None)
    loaded = time.perf_counter()
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(d).decode()}}
             for d in images]
    if audio is not None:
        fmt = Path(args.audio).suffix.lstrip(".").lower()
        parts.append({"type": "input_audio", "input_audio": {"data": base64.b64encode(audio).decode(), "format": fmt}})
    if args.question:
        parts.append({"type": "text", "text": args.question})
    if engine.image_encoder is not None and not engine.image_encoder.trained:
        print("[note] image answers use an UNTRAINED projector (no finished run given); "
              f"vision tower: {engine.image_encoder.tower.info.model_id}", file=sys.stderr)
    params = SamplingParams(max_tokens=args.max_tokens or cfg.serving.max_tokens_default,
                            temperature=args.temperature)
    result = engine.chat([{"role": "user", "content": parts}], params)
    for t in result.transcripts:
        print(f"[transcript] {t!r}", file=sys.stderr)
    print(result.text.strip())
    print(f"[time] load {loaded - start:.1f}s, answer {time.perf_counter() - loaded:.1f}s, "
          f"{result.completion_tokens} tokens", file=sys.stderr)


def _transcribe(args) -> None:
    from trimodal.audio import decode_audio
    from trimodal.runs import load_transcriber

    cfg = load_config(args.preset)
    audio = decode_audio(_read(args.file, "audio"), max_seconds=None)
    print(load_transcriber(cfg.model.speech, args.device).transcribe(audio))


def _rehearsal_weights(args) -> None:
    from trimodal.models.rehearsal import build_phi2_rehearsal, rehearsal_overrides

    start = time.perf_counter()
    weights = build_phi2_rehearsal(Path(args.out))
    print("\n".join(rehearsal_overrides(weights)))
    print(f"[rehearsal] RANDOM weights for the phi2 preset: {weights.lm}, {weights.vision} "
          f"({time.perf_counter() - start:.1f}s); pass each line above to a job as --set", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "presets":
            print("\n".join(preset_names()))
        elif args.command == "ask":
            if not args.question and not args.audio:
                raise ValueError("give a question, --audio, or both")
            _ask(args)
        elif args.command == "rehearsal-weights":
            _rehearsal_weights(args)
        else:
            _transcribe(args)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"trimodal: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
