import pytest
import torch

from trimodal.models.chat import IGNORE_INDEX, IMAGE_MARKER, IMAGE_TOKEN_ID, Turn, encode_conversation
from trimodal.models.multimodal import FeatureCountError, MultimodalLM, merge_image_embeds
from trimodal.models.projector import build_projector


def _targets(tok, enc):
    return [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]


def test_only_answer_tokens_and_eos_are_targets(tiny_lm):
    _, tok = tiny_lm
    turns = [Turn("user", IMAGE_MARKER + "What color is the circle?"), Turn("assistant", "The circle is red.")]
    enc = encode_conversation(tok, turns, num_patches=4, image_end_id=3)
    answer = tok("The circle is red.", add_special_tokens=False)["input_ids"]
    assert _targets(tok, enc) == answer + [tok.eos_token_id]
    assert enc.input_ids.count(IMAGE_TOKEN_ID) == 4 and enc.num_images == 1
    # the image is followed by the end-of-image marker, and the question is not a target
    first = enc.input_ids.index(IMAGE_TOKEN_ID)
    assert enc.input_ids[first + 4] == 3
    assert all(lab == IGNORE_INDEX for lab in enc.labels[: first + 5])


def test_multi_turn_keeps_history_and_targets_every_answer(tiny_lm):
    _, tok = tiny_lm
    turns = [Turn("user", IMAGE_MARKER + "How many shapes are there?"), Turn("assistant", "There is one shape."),
             Turn("user", "What shape is the red object?"), Turn("assistant", "It is a circle.")]
    enc = encode_conversation(tok, turns, num_patches=2, image_end_id=3)
    ans = [tok(a, add_special_tokens=False)["input_ids"] for a in ("There is one shape.", "It is a circle.")]
    assert _targets(tok, enc) == ans[0] + [tok.eos_token_id] + ans[1] + [tok.eos_token_id]
    text = tok.decode([t for t in enc.input_ids if t >= 0])
    assert "How many shapes" in text and "What shape is the red object?" in text  # history kept


def test_generation_prompt_has_no_targets_and_ends_with_assistant_header(tiny_lm):
    _, tok = tiny_lm
    enc = encode_conversation(tok, [Turn("user", "hi")], 0, 3, add_generation_prompt=True)
    assert set(enc.labels) == {IGNORE_INDEX}
    assert tok.decode(enc.input_ids).endswith("<|im_start|>assistant\n")


def test_max_length_truncates_but_never_cuts_an_image(tiny_lm):
    _, tok = tiny_lm
    turns = [Turn("user", IMAGE_MARKER + "q"), Turn("assistant", "a long answer " * 5)]
    enc = encode_conversation(tok, turns, 4, 3, max_length=30)
    assert len(enc.input_ids) == len(enc.labels) == 30
    with pytest.raises(ValueError, match="would cut an image"):
        encode_conversation(tok, turns, 40, 3, max_length=30)


def test_placeholder_feature_mismatch_raises_clear_error(tiny_lm):
    lm, tok = tiny_lm
    model = MultimodalLM(lm, build_projector(8, lm.config.hidden_size))
    turns = [Turn("user", IMAGE_MARKER + IMAGE_MARKER + "compare"), Turn("assistant", "same")]
    enc = encode_conversation(tok, turns, num_patches=3, image_end_id=3)
    ids = torch.tensor([enc.input_ids])
    labels = torch.tensor([enc.labels])
    mask = torch.ones_like(ids)
    loss, n = model(ids, mask, torch.randn(2, 3, 8), labels)  # two images: matches
    assert torch.isfinite(loss) and n == len(tok("same", add_special_tokens=False)["input_ids"]) + 1
    with pytest.raises(FeatureCountError, match="6 placeholder positions, 3 feature vectors \\(1 images\\)"):
        model(ids, mask, torch.randn(1, 3, 8), labels)
    with pytest.raises(FeatureCountError, match="0 feature vectors"):
        merge_image_embeds(torch.zeros(1, ids.shape[1], 4), ids, None)


def test_image_features_land_exactly_at_placeholders(tiny_lm):
    _, tok = tiny_lm
    ids = torch.tensor([[5, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 3, 7]])
    embeds = torch.zeros(1, 5, 4)
    images = torch.arange(8.0).view(1, 2, 4)
    merged = merge_image_embeds(embeds, ids, images)
    assert torch.equal(merged[0, 1:3], images[0]) and merged[0, [0, 3, 4]].abs().sum() == 0


def test_target_only_logits_give_the_same_loss_as_full_logits(tiny_lm):
    lm, tok = tiny_lm
    model = MultimodalLM(lm, build_projector(8, lm.config.hidden_size))
    convs = [[Turn("user", IMAGE_MARKER + "q one"), Turn("assistant", "answer one")],
             [Turn("user", IMAGE_MARKER + "a longer question two"), Turn("assistant", "a2"),
              Turn("user", "more"), Turn("assistant", "final answer")]]
    encs = [encode_conversation(tok, c, 3, 3) for c in convs]
    from trimodal.training.collate import pad_batch

    ids, mask, labels = pad_batch(encs, tok.pad_token_id)
    feats = torch.randn(2, 3, 8)
    loss, n = model(ids, mask, feats, labels)
    full = lm(inputs_embeds=model.embed(ids, model.project(feats)), attention_mask=mask, labels=labels)
    assert n == int((labels != IGNORE_INDEX).sum())
    assert torch.allclose(loss, full.loss, atol=1e-5)


def test_tiny_tokenizer_ids_are_the_same_in_every_process():
    import subprocess
    import sys

    code = ("from trimodal.models.language import build_tiny_tokenizer;"
            "print(build_tiny_tokenizer()('Describe the image.')['input_ids'])")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={"PYTHONHASHSEED": str(seed), "PATH": ""}).stdout for seed in (1, 2, 3)}
    assert len(runs) == 1 and runs.pop().startswith("[")


@pytest.fixture()
def instruct_tok(tiny_lm):
    """The test tokenizer with Phi-2's instruct template ("Instruct: ...\\nOutput: ...")."""
    import copy

    from trimodal.models.language import set_chat_template

    tok = copy.deepcopy(tiny_lm[1])
    set_chat_template(tok, "instruct")
    return tok


def test_instruct_template_trains_every_answer_of_a_multi_turn_conversation(instruct_tok):
    """The generation prompt ends "Output:" and a finished turn reads "Output: answer": the space is the answer's
    first target, as the model generates it after the prompt."""
    tok = instruct_tok
    turns = [Turn("user", IMAGE_MARKER + "How many shapes are there?"), Turn("assistant", "There is one shape."),
             Turn("user", "What shape is the red object?"), Turn("assistant", "It is a circle.")]
    enc = encode_conversation(tok, turns, num_patches=2, image_end_id=3)
    ans = [tok(" " + a, add_special_tokens=False)["input_ids"] for a in ("There is one shape.", "It is a circle.")]
    assert _targets(tok, enc) == ans[0] + [tok.eos_token_id] + ans[1] + [tok.eos_token_id]
    prompt = encode_conversation(tok, turns[:3], num_patches=2, image_end_id=3, add_generation_prompt=True)
    assert tok.decode([t for t in prompt.input_ids if t >= 0]).endswith("What shape is the red object?\nOutput:")
    assert enc.input_ids[:len(prompt.input_ids)] == prompt.input_ids  # training sees the prompt it is served


def test_answers_lose_the_templates_leading_separator(instruct_tok):
    from trimodal.inference.generation import TextTracker

    tracker = TextTracker(instruct_tok)
    ids = instruct_tok(" It is a circle.", add_special_tokens=False)["input_ids"]
    assert "".join(tracker.add(i) for i in ids) + tracker.finish() == "It is a circle."
