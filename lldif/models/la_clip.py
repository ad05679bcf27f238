"""LA-CLIP (SPEC 3.1): an image tower and a label controller aligned with frozen text embeddings of captions and
label prompts. It exists only for stages 0 and 1; inference never runs it.

DA-CLIP's design with "degradation" replaced by "emotion label": a controller (a second tower of the same shape)
adds zero-initialised projections of its hidden states to the image tower's block outputs, in reverse block order
(the controller's last block feeds the tower's first, SPEC 10.3), and its own pooled output is the label embedding.
No CLIP weights ship offline, so both towers train from scratch by default; with a user's open_clip ViT checkpoint
(`load_open_clip_visual`) the image tower is loaded and frozen, and only the controller, the text projection and
the logit scale train, as in DA-CLIP. Parameter names follow open_clip's `VisionTransformer`.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from .config import LAClipConfig


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block with open_clip's names (ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of blocks (open_clip's `transformer.resblocks`)."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))


class VisionTransformer(nn.Module):
    """CLIP's image tower: patches, class token, pre-LN transformer, pooled class token projected to `embed_dim`."""

    def __init__(self, config: LAClipConfig) -> None:
        super().__init__()
        if config.image_size % config.patch_size:
            raise ValueError(f"la_clip.image_size ({config.image_size}) must be a multiple of patch_size "
                             f"({config.patch_size})")
        width, tokens = config.width, (config.image_size // config.patch_size) ** 2 + 1
        self.image_size = config.image_size
        self.conv1 = nn.Conv2d(3, width, config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(width**-0.5 * torch.randn(width))
        self.positional_embedding = nn.Parameter(width**-0.5 * torch.randn(tokens, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, config.layers, config.heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(width**-0.5 * torch.randn(width, config.embed_dim))

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1 + patches, width) input tokens of (B, 3, S, S) images."""
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2:] != (self.image_size, self.image_size):
            raise ValueError(f"images must be (B, 3, {self.image_size}, {self.image_size}), got {tuple(images.shape)}")
        x = self.conv1(images).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The projected class token of the last hidden states."""
        return self.ln_post(x[:, 0]) @ self.proj


class LAClip(nn.Module):
    """Label-aware CLIP: `encode(images)` gives the low-light image embedding e_I and the label embedding e_l, both
    unit-norm; `loss(...)` aligns them with the text side (frozen encoder embeddings, projected here)."""

    def __init__(self, config: LAClipConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config)
        self.controller = VisionTransformer(config)
        self.controls = nn.ModuleList(nn.Linear(config.width, config.width) for _ in range(config.layers))
        for control in self.controls:  # zero-initialised: training starts from the plain tower
            nn.init.zeros_(control.weight)
            nn.init.zeros_(control.bias)
        self.text_projection = nn.Linear(config.text_dim, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(e_I, e_l), each (B, embed_dim) and L2-normalised, of (B, 3, S, S) images."""
        hidden = self.controller.tokens(images)
        controls = []
        for block, control in zip(self.controller.transformer.resblocks, self.controls, strict=True):
            hidden = block(hidden)
            controls.append(control(hidden))
        label_embedding = self.controller.pool(hidden)
        x = self.visual.tokens(images)
        for block, control in zip(self.visual.transformer.resblocks, reversed(controls), strict=True):
            x = block(x) + control
        return F.normalize(self.visual.pool(x), dim=-1), F.normalize(label_embedding, dim=-1)

    def embed_text(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Frozen text-encoder embeddings (N, text_dim) projected into the joint space, L2-normalised."""
        if text_embeddings.dim() != 2 or text_embeddings.shape[1] != self.config.text_dim:
            raise ValueError(f"text_embeddings must be (N, {self.config.text_dim}), got {tuple(text_embeddings.shape)}")
        return F.normalize(self.text_projection(text_embeddings), dim=-1)

    def loss(self, images: torch.Tensor, caption_embeddings: torch.Tensor, labels: torch.Tensor,
             prompt_embeddings: torch.Tensor) -> torch.Tensor:
        """L_LA: CLIP's symmetric contrastive loss between e_I and the captions, plus the label term — a K-way
        cross-entropy of e_l against the K label prompts (default; no duplicate positives) or DA-CLIP's
        contrastive form against each sample's own prompt."""
        image_embedding, label_embedding = self.encode(images)
        captions, prompts = self.embed_text(caption_embeddings), self.embed_text(prompt_embeddings)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
        scale = self.logit_scale.exp().clamp(max=100)
        loss = symmetric_contrastive_loss(image_embedding, captions, scale)
        if self.config.label_loss == "cross_entropy":
            return loss + F.cross_entropy(scale * label_embedding @ prompts.T, labels)
        return loss + symmetric_contrastive_loss(label_embedding, prompts[labels], scale)

    def freeze_visual(self) -> None:
        """Freezes the image tower (after loading pretrained CLIP weights into it), also for later stages."""
        self.visual.requires_grad_(False)
        self.visual.frozen = True


def symmetric_contrastive_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's loss: mean of the cross-entropies of s*a*b^T over rows and over columns, positives on the diagonal."""
    logits = scale * a @ b.T
    targets = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def load_open_clip_visual(model: LAClip, path: str | os.PathLike, freeze: bool = True) -> tuple[list[str], list[str]]:
    """Loads the `visual.*` weights of a user's open_clip ViT checkpoint (torch.load with weights_only=True only)
    into the image tower and a copy into the controller, as DA-CLIP initialises it; returns (missing, unexpected)
    keys of the tower. The tower is frozen unless `freeze` is False."""
    from .pretrained import read_checkpoint

    visual = {}
    for key, value in read_checkpoint(path).items():
        if key.startswith("visual."):
            visual[key.removeprefix("visual.")] = value
    if not visual:
        raise ValueError(f"{path}: no visual.* weights (is it an open_clip checkpoint?)")
    result = model.visual.load_state_dict(visual, strict=False)
    model.controller.load_state_dict(model.visual.state_dict())
    if freeze:
        model.freeze_visual()
    return list(result.missing_keys), list(result.unexpected_keys)
