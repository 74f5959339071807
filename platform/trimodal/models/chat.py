"""Conversations -> token ids with image placeholders, and labels that train only answers plus EOS.

A turn's text holds `IMAGE_MARKER` where an image goes. Each marker becomes `num_patches` positions of
`IMAGE_TOKEN_ID` (replaced by projected image features in the model) followed by the end-of-image token.
The chat template is rendered turn by turn so that exactly the assistant texts and the EOS closing each
of them are targets; everything else (system text, questions, template scaffolding) gets IGNORE_INDEX. Whitespace
a template writes between its generation prompt and an answer is part of that answer's target.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_MARKER = "<image>"
IMAGE_TOKEN_ID = -200  # never a real token id: replaced by image features before the embedding lookup
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Turn:
    """One message of a conversation."""

    role: str
    """user, assistant or system."""
    text: str
    """The message text; IMAGE_MARKER where an image goes."""


@dataclass
class Encoded:
    """A tokenised conversation."""

    input_ids: list[int]
    """Token ids, IMAGE_TOKEN_ID at image positions."""
    labels: list[int]
    """Target ids, IGNORE_INDEX where no loss is taken."""
    num_images: int
    """Images the ids hold."""


def escape_markers(text: str) -> str:
    """Make user-typed text unable to create image positions."""
    return text.replace(IMAGE_MARKER, "<image >")


def _render(tokenizer, turns: list[Turn], add_generation_prompt: bool) -> str:
    messages = [{"role": t.role, "content": t.text} for t in turns]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _segments(tokenizer, turns: list[Turn], add_generation_prompt: bool) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_target) pieces; EOS pieces are the eos token text."""
    eos = tokenizer.eos_token
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, turn in enumerate(turns):
        if turn.role != "assistant":
            continue
        prefix = _render(tokenizer, turns[:i], add_generation_prompt=True)
        full = _render(tokenizer, turns[: i + 1], add_generation_prompt=False)
        answer = _answer_text(full[len(prefix):], turn.text)
        if not prefix.startswith(done) or not full.startswith(prefix) or answer is None:
            raise ValueError("the chat template does not render turns as a prefix of the conversation")
        pieces += [(prefix[len(done):], False), (answer, True), (eos, True)]
        done = prefix + answer
        if full[len(done):].startswith(eos):
            done += eos  # the template writes EOS itself; it is already a target piece
    final = _render(tokenizer, turns, add_generation_prompt=add_generation_prompt)
    pieces.append((final[len(done):], False))
    return [(text, target) for text, target in pieces if text]


def _answer_text(rendered: str, text: str) -> str | None:
    """The answer as the template renders it after the generation prompt: `text`, or `text` after whitespace the
    template puts between them (Phi-2's "Output:" prompt, then " " + answer). The whitespace belongs to the target,
    so the answer is tokenised as the model generates it after the prompt (" The" is one GPT-2 token, not two)."""
    sep = rendered[: len(rendered) - len(rendered.lstrip())] if not rendered.startswith(text) else ""
    return sep + text if rendered[len(sep):].startswith(text) else None


def _tokenize_piece(tokenizer, text: str, num_patches: int, end_id: int) -> tuple[list[int], int]:
    ids: list[int] = []
    parts = text.split(IMAGE_MARKER)
    for k, part in enumerate(parts):
        if k > 0:
            ids += [IMAGE_TOKEN_ID] * num_patches + [end_id]
        if part:
            ids += tokenizer(part, add_special_tokens=False)["input_ids"]
    return ids, len(parts) - 1


def encode_conversation(tokenizer, turns: list[Turn], num_patches: int, image_end_id: int,
                        add_generation_prompt: bool = False, max_length: int | None = None) -> Encoded:
    """Tokenise `turns`; labels are the assistant answers plus the EOS after each, nothing else.

    Answers must not contain IMAGE_MARKER. `max_length` truncates from the end and refuses to cut an image.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    num_images = 0
    for text, is_target in _segments(tokenizer, turns, add_generation_prompt):
        if is_target and text == tokenizer.eos_token:
            ids, n = [tokenizer.eos_token_id], 0
        else:
            ids, n = _tokenize_piece(tokenizer, text, num_patches, image_end_id)
        if is_target and n:
            raise ValueError("an assistant turn contains an image marker")
        num_images += n
        input_ids += ids
        labels += ids if is_target else [IGNORE_INDEX] * len(ids)
    if max_length is not None and len(input_ids) > max_length:
        if IMAGE_TOKEN_ID in input_ids[max_length - 1:]:
            raise ValueError(f"max_length {max_length} would cut an image; raise data.max_length")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return Encoded(input_ids=input_ids, labels=labels, num_images=num_images)
