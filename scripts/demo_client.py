"""Ask the served models three questions with the official openai client: text, image, spoken (about the image).

Each question goes to the server's trained run and to the base model (no adapter, an untrained projector) side by
side, chosen per request with `model`: the ids come from /v1/models.
"""

import argparse
import base64
import time
from pathlib import Path

from openai import OpenAI


def side_by_side(client: OpenAI) -> list[tuple[str, str]]:
    """(label, model id) of the trained run (the server's default) and of the base model, from /v1/models."""
    models = client.models.list().data
    default, details = models[0], models[0].model_extra["trimodal"]
    base = next(m for m in models if m.model_extra["trimodal"].get("base"))
    return [(details.get("run") or default.id, default.id), ("base", base.id)]


def one_line(text: str) -> str:
    """An answer as one printable line: line breaks and control characters (an untrained model emits any) become
    spaces, so each model's answer stays on its own line."""
    return "".join(ch if ch.isprintable() else " " for ch in text).strip()


def ask(client: OpenAI, models: list[tuple[str, str]], title: str, content) -> None:
    print(f"\n[{title}]")
    for label, model in models:
        start = time.perf_counter()
        reply = client.chat.completions.create(model=model, max_tokens=48, temperature=0.0,
                                               messages=[{"role": "user", "content": content}])
        for transcript in (reply.model_extra or {}).get("transcripts", []):  # trimodal adds what the audio said
            print(f"  transcript used: {transcript!r}")
        answer = one_line(reply.choices[0].message.content)
        shown = answer or f"(an empty answer; finish reason {reply.choices[0].finish_reason})"
        print(f"  {label:>16} ({time.perf_counter() - start:.1f} s): {shown}")


def held_out_image_with_one_circle(shapes: Path) -> Path:
    """The first held-out image showing exactly one circle (the spoken question asks about "the circle")."""
    from trimodal.data.shapes.dataset import read_shapes_meta

    for truth in read_shapes_meta(shapes / "shapes_meta.json"):
        if truth.split == "val" and [o.shape for o in truth.objects].count("circle") == 1:
            return shapes / "val2017" / truth.file_name
    raise SystemExit(f"no held-out image with one circle in {shapes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--shapes", required=True, type=Path, help="the shapes set (a held-out image is picked)")
    parser.add_argument("--audio", required=True, type=Path)
    parser.add_argument("--api-key", default="none", help="the server's TRIMODAL_API_KEY, if one is set")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    args.image = held_out_image_with_one_circle(args.shapes)
    image = {"type": "image_url",
             "image_url": {"url": "data:image/png;base64," + base64.b64encode(args.image.read_bytes()).decode()}}
    audio = {"type": "input_audio",
             "input_audio": {"data": base64.b64encode(args.audio.read_bytes()).decode(), "format": "wav"}}
    models = side_by_side(client)
    ask(client, models, "text: What is the capital of France?",
        "What is the capital of France? Answer in one sentence.")
    ask(client, models, f"image {args.image.name}: Describe the image.",
        [image, {"type": "text", "text": "Describe the image."}])
    ask(client, models, f"spoken question ({args.audio.name}) about {args.image.name}", [image, audio])


if __name__ == "__main__":
    main()
