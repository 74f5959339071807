"""The path of an image into the LM: CLIP patch features -> projector -> LM-space embeddings, merged into the
LM's input embeddings with one masked scatter.

`project_image_features` is the one place tower features meet the projector (cast to its device and dtype); the
`ImageEncoder` (tower + projector, for serving and the CLI), `MultimodalLM` (training, on precomputed features) and
evaluation all project through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from trimodal.models.chat import IGNORE_INDEX, IMAGE_TOKEN_ID
from trimodal.models.projector import Projector
from trimodal.models.vision import VisionTower


class FeatureCountError(ValueError):
    """Image placeholders and image features disagree."""


def project_image_features(projector: Projector, features: torch.Tensor) -> torch.Tensor:
    """CLIP patch features [n, N, Dv] (any device, any float dtype) -> LM-space embeddings [n, N, H]."""
    param = next(projector.parameters())
    return projector(features.to(param.device, param.dtype))


class ImageEncoder:
    """Frozen CLIP tower + projector: PIL images -> LM-space embeddings [n, N, H]."""

    def __init__(self, tower: VisionTower, projector: Projector, trained: bool):
        self.tower = tower
        self.projector = projector.eval().requires_grad_(False)
        self.trained = trained  # the projector holds a finished run's weights (False: freshly initialised)

    @property
    def num_patches(self) -> int:
        return self.tower.info.num_patches

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        return project_image_features(self.projector, self.tower.encode_images(images))  # [n, N, Dv] -> [n, N, H]


def merge_image_embeds(token_embeds: torch.Tensor, input_ids: torch.Tensor,
                       image_embeds: torch.Tensor | None) -> torch.Tensor:
    """Write `image_embeds` [n_images, N, H] into the IMAGE_TOKEN_ID positions of `token_embeds` [B, T, H]."""
    mask = input_ids == IMAGE_TOKEN_ID  # [B, T]
    n_positions = int(mask.sum())
    n_features = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
    if n_positions != n_features:
        n_images = 0 if image_embeds is None else image_embeds.shape[0]
        raise FeatureCountError(f"image placeholders and features differ: {n_positions} placeholder positions, "
                                f"{n_features} feature vectors ({n_images} images)")
    if n_positions == 0:
        return token_embeds
    flat = image_embeds.reshape(-1, image_embeds.shape[-1]).to(token_embeds.dtype)  # [n, N, H] -> [n*N, H]
    return token_embeds.masked_scatter(mask.unsqueeze(-1).expand_as(token_embeds), flat)


class MultimodalLM(nn.Module):
    """LM + projector. Image features arrive precomputed (CLIP patch features [n_images, N, vision_dim])."""

    def __init__(self, lm: nn.Module, projector: Projector):
        super().__init__()
        self.lm = lm
        self.projector = projector

    def train(self, mode: bool = True) -> "MultimodalLM":
        """Training mode for what trains: the projector and the LoRA adapters' own dropout (lora.dropout).

        The LM's weights are frozen in both stages, so its own dropout (Phi-2: resid_pdrop 0.1) stays off: it would
        only add noise to the gradients of the projector and adapters, and the LM is served without it.
        """
        from peft.tuners.lora import LoraLayer  # here: the vllm environment imports this module and has no peft

        super().train(mode)
        if mode:
            self.lm.eval()
            for module in self.lm.modules():
                if isinstance(module, LoraLayer):
                    module.lora_dropout.train()
        return self

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """CLIP features [n, N, Dv] -> LM-space embeddings [n, N, H]."""
        return project_image_features(self.projector, features)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token ids with image placeholders + projected images -> inputs_embeds [B, T, H]."""
        table = self.lm.get_input_embeddings()
        token_embeds = table(input_ids.clamp(min=0))  # placeholders look up id 0, then get overwritten
        return merge_image_embeds(token_embeds, input_ids, image_embeds)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_features: torch.Tensor | None,
                labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Mean next-token loss over target tokens, and their count.

        The vocabulary projection runs only on the hidden states whose next token is a target: answers are a small
        part of each sequence, and they sit at different positions in each row of a batch.
        """
        image_embeds = None if image_features is None else self.project(image_features)
        inputs_embeds = self.embed(input_ids, image_embeds)
        hidden = self.lm.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                       use_cache=False).last_hidden_state  # [B, T, H]
        targets = labels[:, 1:]  # position p predicts token p + 1
        rows, positions = (targets != IGNORE_INDEX).nonzero(as_tuple=True)  # [n], [n]
        logits = self.lm.get_output_embeddings()(hidden[rows, positions]).float()  # [n, H] -> [n, V]
        loss = F.cross_entropy(logits, targets[rows, positions], reduction="sum")
        return loss / max(len(rows), 1), len(rows)
