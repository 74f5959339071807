"""Stage 0's image pooling: CLIP's CLS token, or the mean of the patch tokens the LM receives."""

import torch
import torch.nn.functional as F

from trimodal.config import load_config
from trimodal.models.vision import build_random_clip
from trimodal.training.clip import contrastive_loss, pooled_image_embeds


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
