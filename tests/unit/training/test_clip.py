"""Stage 0's losses: the image pooling (CLIP's CLS token, or the mean of the patch tokens the LM receives), the
phrase-grounding term, and both over several workers."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trimodal.config import load_config
from trimodal.models.vision import build_random_clip
from trimodal.training.clip import (
    ClipCollator,
    build_caption_tokenizer,
    caption_phrases,
    contrastive_loss,
    phrase_grounding_loss,
    pooled_image_embeds,
)
from trimodal.training.process_group import loopback_interface


def _clip_and_batch():
    cfg = load_config("test")
    clip = build_random_clip(cfg.model.vision.random_shape, cfg.model.vision.image_size, vocab_size=64).eval()
    torch.manual_seed(0)
    size = cfg.model.vision.image_size
    batch = {"pixel_values": torch.randn(4, 3, size, size), "input_ids": torch.randint(4, 64, (4, 6)),
             "attention_mask": torch.ones(4, 6, dtype=torch.long), "texts": ["a", "b", "c", "a"]}
    return clip, batch


def test_cls_pooling_is_clips_own_image_features():
    clip, batch = _clip_and_batch()
    with torch.no_grad():
        hidden = clip.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state  # [B, 1 + N, D]
        own = clip.get_image_features(pixel_values=batch["pixel_values"])
        own = getattr(own, "pooler_output", own)
        assert torch.allclose(pooled_image_embeds(clip, hidden, "cls"), own, atol=1e-5)


def test_mean_pooling_averages_the_patch_tokens_only():
    clip, batch = _clip_and_batch()
    with torch.no_grad():
        hidden = clip.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
        mean = pooled_image_embeds(clip, hidden, "mean")
        expected = clip.visual_projection(clip.vision_model.post_layernorm(hidden[:, 1:].mean(1)))
        assert torch.allclose(mean, expected, atol=1e-6)
        changed_cls = hidden.clone()
        changed_cls[:, 0] += 5.0
        assert torch.allclose(pooled_image_embeds(clip, changed_cls, "mean"), mean)
        cls = pooled_image_embeds(clip, hidden, "cls")
        assert not torch.allclose(pooled_image_embeds(clip, changed_cls, "cls"), cls)


def test_contrastive_loss_uses_the_chosen_pooling():
    clip, batch = _clip_and_batch()
    with torch.no_grad():
        out = clip(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"])
        image = F.normalize(pooled_image_embeds(clip, out.vision_model_output.last_hidden_state, "mean"), dim=-1)
        logits = clip.logit_scale.exp() * image @ out.text_embeds.t()  # [B, B]
        targets = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.float32)
        targets = targets / targets.sum(-1, keepdim=True)
        expected = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
        assert torch.allclose(contrastive_loss(clip, batch, "mean"), expected, atol=1e-5)
        assert not torch.allclose(contrastive_loss(clip, batch, "cls"), expected, atol=1e-3)


def test_caption_phrases_split_at_and():
    assert caption_phrases("a red circle and a blue square on a plain background") == [
        "a red circle", "a blue square on a plain background"]
    assert caption_phrases("a picture of a green triangle") == ["a picture of a green triangle"]
    assert caption_phrases(" and ") == [" and "]  # never empty: the caption itself stands as its phrase


def test_collator_tokenises_the_phrases_after_the_captions():
    tokenizer = build_caption_tokenizer(["a red circle and a blue square", "a green triangle"])
    batch = {"captions": [json.dumps(["a red circle and a blue square"]), json.dumps(["a green triangle"])],
             "pixels": np.zeros((2, 8, 8, 3), np.uint8)}
    plain = ClipCollator(tokenizer, seed=0)(batch)
    assert plain["input_ids"].shape[0] == 2 and plain["phrases"] == [[], []]
    out = ClipCollator(tokenizer, seed=0, phrases=True)(batch)
    assert out["texts"] == ["a red circle and a blue square", "a green triangle"]
    assert out["phrases"] == [["a red circle", "a blue square"], ["a green triangle"]]
    assert out["input_ids"].shape[0] == 5  # 2 captions, then 3 phrases
    decoded = tokenizer.batch_decode(out["input_ids"][2:], skip_special_tokens=True)
    assert decoded == ["a red circle", "a blue square", "a green triangle"]


def _loop_phrase_loss(clip, hidden, phrase_embeds, phrases):
    """The phrase-grounding loss written out pair by pair, as an independent check of the batched one."""
    patches = F.normalize(clip.visual_projection(clip.vision_model.post_layernorm(hidden[:, 1:])), dim=-1)
    flat = [p for ps in phrases for p in ps]
    logits = torch.zeros(len(phrases), len(flat))
    for b in range(len(phrases)):
        for k in range(len(flat)):
            weights = torch.softmax(10.0 * patches[b] @ phrase_embeds[k], 0)  # [N]
            pooled = F.normalize((weights[:, None] * patches[b]).sum(0), dim=0)  # [P]
            logits[b, k] = clip.logit_scale.exp() * pooled @ phrase_embeds[k]
    positive = torch.tensor([[float(p in ps) for p in flat] for ps in phrases])
    image_to_phrase = -(F.log_softmax(logits, 1) * positive / positive.sum(1, keepdim=True)).sum(1).mean()
    phrase_to_image = -(F.log_softmax(logits, 0) * positive / positive.sum(0, keepdim=True)).sum(0).mean()
    return 0.5 * (image_to_phrase + phrase_to_image)


def test_phrase_grounding_loss_matches_a_pair_by_pair_computation():
    clip, batch = _clip_and_batch()
    phrases = [["a red circle", "a blue square"], ["a red circle"], ["a green triangle"], ["a blue square"]]
    with torch.no_grad():
        hidden = clip.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
        embeds = F.normalize(torch.randn(5, clip.config.projection_dim), dim=-1)
        expected = _loop_phrase_loss(clip, hidden, embeds, phrases)
        assert torch.allclose(phrase_grounding_loss(clip, hidden, embeds, phrases), expected, atol=1e-5)
        with pytest.raises(ValueError, match="6 phrase embeddings for 5 phrases"):
            phrase_grounding_loss(clip, hidden, torch.cat([embeds, embeds[:1]]), phrases)


def test_contrastive_loss_adds_the_phrase_term_when_the_batch_has_phrases():
    clip, batch = _clip_and_batch()
    phrases = [["x"], ["y", "z"], ["w"], ["x"]]
    with_phrases = {**batch, "input_ids": torch.randint(4, 64, (9, 6)),
                    "attention_mask": torch.ones(9, 6, dtype=torch.long), "phrases": phrases}
    with torch.no_grad():
        out = clip(input_ids=with_phrases["input_ids"], attention_mask=with_phrases["attention_mask"],
                   pixel_values=batch["pixel_values"])
        hidden = out.vision_model_output.last_hidden_state
        captions_only = {**batch, "input_ids": with_phrases["input_ids"][:4],
                         "attention_mask": with_phrases["attention_mask"][:4], "phrases": [[]] * 4}
        for pool in ("cls", "mean"):
            expected = (contrastive_loss(clip, captions_only, pool)
                        + phrase_grounding_loss(clip, hidden, out.text_embeds[4:], phrases))
            assert torch.allclose(contrastive_loss(clip, with_phrases, pool), expected, atol=1e-5)


def test_the_eager_attention_kernel_gives_stage_0_the_same_loss_and_gradients_as_sdpa():
    """`model.vision.stage0_attn` changes how fast stage 0 runs, not what it trains: padded captions and phrases,
    both towers, float32."""
    cfg = load_config("test")
    tokenizer = build_caption_tokenizer(["a red circle and a blue square", "a green triangle"])
    batch = ClipCollator(tokenizer, seed=0, phrases=True)(
        {"captions": [json.dumps(["a red circle and a blue square"]), json.dumps(["a green triangle"])] * 2,
         "pixels": np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)})
    assert (batch["attention_mask"] == 0).any()  # some rows are padded, so the kernels' masking is compared too
    results = {}
    for attn in ("sdpa", "eager"):
        clip = build_random_clip(cfg.model.vision.random_shape, cfg.model.vision.image_size, len(tokenizer))
        clip.set_attn_implementation(attn)
        loss = contrastive_loss(clip, batch, "cls")
        loss.backward()
        results[attn] = (loss.detach(), {n: p.grad for n, p in clip.named_parameters() if p.grad is not None})
    (sdpa_loss, sdpa_grads), (eager_loss, eager_grads) = results["sdpa"], results["eager"]
    assert torch.allclose(sdpa_loss, eager_loss, atol=1e-5)
    assert sdpa_grads.keys() == eager_grads.keys() and len(sdpa_grads) > 0
    for name, grad in sdpa_grads.items():
        assert torch.allclose(grad, eager_grads[name], atol=1e-5, rtol=1e-4), name


def _two_worker_gradients(rank: int, store: str, out: str) -> None:
    """A spawned worker: half the batch through DDP over Gloo on loopback; rank 0 saves loss and gradients."""
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ["GLOO_SOCKET_IFNAME"] = loopback_interface()
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        clip, batch = _phrase_batch()
        model = DistributedDataParallel(clip)
        loss = contrastive_loss(model, _rows(batch, [0, 1, 2] if rank == 0 else [3, 4]), "cls")
        loss.backward()
        if rank == 0:
            torch.save({"loss": loss.detach(), "grads": {n: p.grad for n, p in clip.named_parameters()}}, out)
    finally:
        dist.destroy_process_group()


def _phrase_batch():
    """A tiny CLIP and five images whose captions share phrases (rows 0 and 4 have the same caption)."""
    cfg = load_config("test")
    captions = ["a red circle and a blue square", "a green triangle", "a blue square",
                "a red circle and a green triangle", "a red circle and a blue square"]
    tokenizer = build_caption_tokenizer(captions)
    torch.manual_seed(0)
    clip = build_random_clip(cfg.model.vision.random_shape, cfg.model.vision.image_size, len(tokenizer))
    pixels = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    return clip, {"captions": [json.dumps([c]) for c in captions], "pixels": pixels, "tokenizer": tokenizer}


def _rows(batch: dict, rows: list[int]) -> dict:
    picked = {"captions": [batch["captions"][i] for i in rows], "pixels": batch["pixels"][rows]}
    return ClipCollator(batch["tokenizer"], seed=0, phrases=True)(picked)


def test_two_workers_train_on_the_loss_of_their_whole_batch(tmp_path):
    """Two DDP workers holding 3 and 2 of 5 images get the loss and the gradients of one worker holding all 5:
    every image is contrasted with both workers' captions and phrases, not only its own worker's."""
    import torch.multiprocessing as mp

    out = tmp_path / "rank0.pt"
    mp.start_processes(_two_worker_gradients, args=(str(tmp_path / "store"), str(out)), nprocs=2,
                       start_method="spawn")
    two = torch.load(out)
    clip, batch = _phrase_batch()
    whole = _rows(batch, [0, 1, 2, 3, 4])
    loss = contrastive_loss(clip, whole, "cls")
    loss.backward()
    assert torch.allclose(two["loss"], loss.detach(), atol=1e-5)
    local_only = contrastive_loss(clip, _rows(batch, [0, 1, 2]), "cls")
    assert not torch.allclose(two["loss"], local_only.detach(), atol=1e-3)  # the gathered loss is not rank 0's own
    for name, param in clip.named_parameters():
        assert torch.allclose(two["grads"][name], param.grad, atol=1e-5, rtol=1e-4), name
