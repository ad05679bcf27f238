"""LLDif (SPEC 2): LA-CLIP -> PNET_S1 -> prior Z (stages 0-1), PNET_S2 + 4-step diffusion -> prior Z-hat (stage 2
and inference), and the LLformer (DTNet + DLNet + fusion head) that classifies an image under a prior."""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lldif_kernels.nn import GatedDepthwiseFeedForward, ModulatedLayerNorm, TransposedAttention, WindowCrossAttention
from lldif_kernels.profiling import nvtx_range

from ..data.face_layout import five_from_68, mean_shape
from ..data.loader import IMAGENET_MEAN, IMAGENET_STD
from .config import LLDifConfig, lldif_base
from .diffusion import PriorDiffusion
from .dlnet import DLNet
from .dtnet import DTNet
from .fusion import FusionHead
from .la_clip import LAClip
from .losses import classification_loss, prior_loss
from .pnet import PNetS1, PNetS2
from .pretrained import read_checkpoint, read_model_folder, save_model_folder

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
STAGES = (0, 1, 2)
LABEL_EMBEDDINGS = ("centered", "raw")


class StageLosses(NamedTuple):
    """A training stage's loss (`total`, the one to back-propagate) and its parts (None: not computed)."""

    total: torch.Tensor
    classification: torch.Tensor | None
    prior: torch.Tensor


def _batch_field(batch: Any, name: str) -> Any:
    return batch[name] if isinstance(batch, dict) else getattr(batch, name)


class LLDif(nn.Module):
    """The LLDif model. Images are (B, 3, S, S) with S = `config.image_size`, normalised with ImageNet's mean and
    std (as `lldif.data.loader` gives them); landmarks, when the landmark features are heatmaps, are (B, P, 2) in
    pixels of those images. `forward` is the inference path and needs neither labels nor LA-CLIP."""

    def __init__(self, config: LLDifConfig | None = None) -> None:
        super().__init__()
        self.config = config = lldif_base() if config is None else config
        if config.in_channels != 3:
            raise ValueError(f"config.in_channels must be 3 (the backbones take RGB), got {config.in_channels}")
        if config.prior.label_embedding not in LABEL_EMBEDDINGS:
            raise ValueError(f"config.prior.label_embedding must be one of {LABEL_EMBEDDINGS}, got "
                             f"{config.prior.label_embedding!r}")
        if not 0.0 <= config.prior.label_dropout <= 1.0:
            raise ValueError(f"config.prior.label_dropout must be in [0, 1], got {config.prior.label_dropout}")
        side = config.internal_size
        self.la_clip = LAClip(config.la_clip)
        self.pnet_s1 = PNetS1(config.prior, config.la_clip.embed_dim, config.la_clip.embed_dim)
        self.pnet_s2 = PNetS2(config.prior, config.in_channels)
        self.diffusion = PriorDiffusion(config.prior)
        self.dtnet = DTNet(config.dtnet, config.prior.dim, config.in_channels, backend=config.backend)
        self.dlnet = DLNet(config.dlnet, side, backend=config.backend)
        self.head = FusionHead(config.fusion, self.dtnet.tap_channels, self.dlnet.out_channels, config.num_classes,
                               (side // 4, side // 8, side // 16))
        # Frozen text-encoder embeddings of the K label prompts (`set_label_prompts`), saved with the weights.
        self.register_buffer("label_prompt_embeddings", torch.zeros(config.num_classes, config.la_clip.text_dim))
        self.stage = 2

    # ---------------------------------------------------------------------------------------------------------
    # inputs

    @property
    def landmark_points(self) -> int | None:
        """How many landmark points per face the model reads (heatmap landmark features), None when it reads none
        (MobileFaceNet computes its landmark features from the image)."""
        dlnet = self.config.dlnet
        return dlnet.landmark_points if dlnet.landmark_features == "heatmap" else None

    def _check_images(self, images: torch.Tensor) -> None:
        size, channels = self.config.image_size, self.config.in_channels
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != channels \
                or tuple(images.shape[2:]) != (size, size):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be (B, {channels}, {size}, {size}) (config.image_size = {size}), "
                             f"got {shape}")

    def _internal(self, images: torch.Tensor, landmarks: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The images at the LLformer's resolution (nearest, as POSTER++) and the landmarks scaled to match. Heatmap
        landmark features without given landmarks get the mean face shape (as for an aligned crop), and 68 points
        are reduced to the 5 a 5-point model wants."""
        self._check_images(images)
        side, size = self.config.internal_size, self.config.image_size
        dlnet = self.config.dlnet
        if landmarks is None and dlnet.landmark_features == "heatmap":
            landmarks = torch.from_numpy(mean_shape(size, size, dlnet.landmark_points)).to(images)
            landmarks = landmarks.expand(images.shape[0], -1, -1)
        if landmarks is not None:
            if landmarks.dim() != 3 or landmarks.shape[0] != images.shape[0] or landmarks.shape[2] != 2:
                raise ValueError(f"landmarks must be (B, P, 2) pixels with B = {images.shape[0]}, "
                                 f"got {tuple(landmarks.shape)}")
            if landmarks.shape[1] == 68 and dlnet.landmark_points == 5:
                landmarks = five_from_68(landmarks)
            landmarks = landmarks * (side / size)
        if side != size:
            images = F.interpolate(images, size=(side, side), mode="nearest")
        return images, landmarks

    def _clip_view(self, images: torch.Tensor) -> torch.Tensor:
        """The images as LA-CLIP sees them: its input size, CLIP's normalisation."""
        def stats(values: tuple[float, ...]) -> torch.Tensor:
            return images.new_tensor(values).view(1, 3, 1, 1)

        pixels = images * stats(IMAGENET_STD) + stats(IMAGENET_MEAN)
        side = self.config.la_clip.image_size
        if pixels.shape[-1] != side:
            pixels = F.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        return (pixels - stats(CLIP_MEAN)) / stats(CLIP_STD)

    def set_label_prompts(self, embeddings: torch.Tensor) -> None:
        """Stores the frozen text embeddings (K, text_dim) of the label prompts (`lldif.data.text.label_prompts`)."""
        expected = tuple(self.label_prompt_embeddings.shape)
        if tuple(embeddings.shape) != expected:
            raise ValueError(f"embeddings must be {expected} (num_classes, la_clip.text_dim), "
                             f"got {tuple(embeddings.shape)}")
        self.label_prompt_embeddings.copy_(embeddings.detach())

    # ---------------------------------------------------------------------------------------------------------
    # the model's paths

    def llformer(self, images: torch.Tensor, landmarks: torch.Tensor | None, prior: torch.Tensor, *,
                 features: bool = False) -> torch.Tensor:
        """Logits of images at the internal size under a prior (B, prior.dim): DTNet, DLNet, fusion head; with
        `features`, the fused features before the classifier instead (`FusionHead.features`)."""
        with nvtx_range("lldif::dtnet"):
            restoration = self.dtnet(images, prior)
        with nvtx_range("lldif::dlnet"):
            landmark = self.dlnet(images, landmarks)
        with nvtx_range("lldif::fusion"):
            return (self.head.features if features else self.head)(restoration, landmark)

    def teacher_prior(self, images: torch.Tensor, labels: torch.Tensor,
                      drop_label: torch.Tensor | None = None) -> torch.Tensor:
        """Z = PNET_S1(LA-CLIP(images), label embedding) (Eq. 1); LA-CLIP runs without gradient. Samples where the
        (B,) bool `drop_label` is True get the null label: the mean of the label prompts' embeddings."""
        with nvtx_range("lldif::la_clip"), torch.no_grad():
            image_embedding, predicted_label = self.la_clip.encode(self._clip_view(images))
            prompts = self.la_clip.embed_text(self.label_prompt_embeddings)
            if self.config.prior.pnet_s1_label == "ground_truth":
                label_embedding = prompts[labels]
            else:
                label_embedding = predicted_label
            if drop_label is not None:
                label_embedding = torch.where(drop_label[:, None], prompts.mean(0), label_embedding)
            if self.config.prior.label_embedding == "centered":
                # The K prompts share most of their embedding ("a photo of a ... face"): only what tells them
                # apart is kept, at unit length, so the label is as visible in Z as the image (the null label is 0).
                label_embedding = F.normalize(label_embedding - prompts.mean(0), dim=-1)
        with nvtx_range("lldif::pnet_s1"):
            return self.pnet_s1(image_embedding, label_embedding)

    def inference_prior(self, images: torch.Tensor, *, generator: torch.Generator | None = None,
                        steps: int | None = None) -> torch.Tensor:
        """Z-hat_0 (B, prior.dim) of the inference path: PNET_S2, then `steps` (default T) reverse steps from
        N(0, I) (`generator` makes them repeatable)."""
        internal, _ = self._internal(images, None)
        return self._diffusion_prior(internal, generator, steps)

    def _diffusion_prior(self, internal: torch.Tensor, generator: torch.Generator | None,
                         steps: int | None) -> torch.Tensor:
        with nvtx_range("lldif::pnet_s2"):
            condition = self.pnet_s2(internal)
        with nvtx_range("lldif::diffusion"):
            return self.diffusion.sample(condition, generator, steps=steps)

    def forward(self, images: torch.Tensor, landmarks: torch.Tensor | None = None, *,
                generator: torch.Generator | None = None, steps: int | None = None,
                features: bool = False) -> torch.Tensor:
        """Inference logits (B, num_classes): PNET_S2, `steps` (default T) reverse steps from N(0, I) (`generator`
        makes them repeatable), then the LLformer. With `features`, the fused features before the classifier
        instead of the logits ((B, fusion.embed_dim), or every token's with `fusion.readout="tokens"`)."""
        internal, landmarks = self._internal(images, landmarks)
        prior = self._diffusion_prior(internal, generator, steps)
        return self.llformer(internal, landmarks, prior, features=features)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of fused features (what `forward(..., features=True)` returns)."""
        return self.head.head(features)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, landmarks: torch.Tensor | None = None, *,
                generator: torch.Generator | None = None, steps: int | None = None) -> torch.Tensor:
        """Class probabilities (B, num_classes) of the inference path, without gradient."""
        return self.forward(images, landmarks, generator=generator, steps=steps).softmax(dim=-1)

    # ---------------------------------------------------------------------------------------------------------
    # training

    def la_clip_loss(self, batch: Any) -> torch.Tensor:
        """Stage 0: LA-CLIP's loss on a batch with `image`, `label` and `caption_embedding`."""
        images = _batch_field(batch, "image")
        self._check_images(images)
        return self.la_clip.loss(self._clip_view(images), _batch_field(batch, "caption_embedding"),
                                 _batch_field(batch, "label"), self.label_prompt_embeddings)

    def la_clip_logits(self, images: torch.Tensor) -> torch.Tensor:
        """LA-CLIP's label head as a classifier: cosine similarities (B, num_classes) of e_l to the label prompts."""
        self._check_images(images)
        _, label_embedding = self.la_clip.encode(self._clip_view(images))
        return label_embedding @ self.la_clip.embed_text(self.label_prompt_embeddings).T

    def prior_logits(self, images: torch.Tensor, landmarks: torch.Tensor | None, prior: torch.Tensor, *,
                     features: bool = False) -> torch.Tensor:
        """The LLformer's logits for images under a given prior (B, prior.dim), e.g. a teacher's or a mean one; with
        `features`, the fused features before the classifier instead."""
        internal, landmarks = self._internal(images, landmarks)
        return self.llformer(internal, landmarks, prior, features=features)

    def teacher_logits(self, images: torch.Tensor, labels: torch.Tensor,
                       landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """Stage 1's logits: the LLformer under the teacher prior Z, which sees the label text (ground truth by
        default), so they measure how well the prior can guide the LLformer, not inference accuracy."""
        return self.prior_logits(images, landmarks, self.teacher_prior(images, labels))

    def stage1_loss(self, batch: Any) -> StageLosses:
        """Stage 1: cross-entropy (Eq. 13) of the LLformer under the teacher prior Z (PNET_S1 trains with it); in
        training, each sample's label is replaced by the null label with probability `prior.label_dropout`, so
        the LLformer also learns to classify from the image when the prior carries no label."""
        images, labels = _batch_field(batch, "image"), _batch_field(batch, "label")
        dropout = self.config.prior.label_dropout if self.training else 0.0
        drop = torch.rand(labels.shape, device=labels.device) < dropout if dropout > 0 else None
        logits = self.prior_logits(images, _batch_field(batch, "landmarks"), self.teacher_prior(images, labels, drop))
        loss = classification_loss(logits, labels, self.config.loss.label_smoothing)
        return StageLosses(loss, loss, loss.new_zeros(()))

    def stage2_loss(self, batch: Any, generator: torch.Generator | None = None, *,
                    prior_only: bool = False) -> StageLosses:
        """Stage 2 (Eq. 18): cross-entropy of the LLformer under the diffusion prior Z-hat_0 plus the prior loss
        between Z-hat_0 and the frozen teacher's Z (Eq. 17). With `prior_only` (the warm-up of PNET_S2 and the
        denoiser) the LLformer does not run: the loss is the prior term and `classification` is None."""
        images, labels = _batch_field(batch, "image"), _batch_field(batch, "label")
        internal, landmarks = self._internal(images, _batch_field(batch, "landmarks"))
        with torch.no_grad():
            teacher = self.teacher_prior(images, labels)
        with nvtx_range("lldif::pnet_s2"):
            condition = self.pnet_s2(internal)
        with nvtx_range("lldif::diffusion"):
            prior = self.diffusion.training_prior(teacher, condition, generator)
        prior_term = prior_loss(teacher, prior, self.config.loss)
        if prior_only:
            return StageLosses(prior_term, None, prior_term)
        logits = self.llformer(internal, landmarks, prior)
        classification = classification_loss(logits, labels, self.config.loss.label_smoothing)
        return StageLosses(classification + prior_term, classification, prior_term)

    def _trainable_parts(self, stage: int) -> tuple[nn.Module, ...]:
        llformer = (self.dtnet, self.dlnet, self.head)
        return {0: (self.la_clip,), 1: (self.pnet_s1, *llformer), 2: (self.pnet_s2, self.diffusion, *llformer)}[stage]

    def freeze_for_stage(self, stage: int) -> None:
        """Makes trainable exactly what the stage trains (SPEC 5): 0 LA-CLIP; 1 PNET_S1 and the LLformer; 2 PNET_S2,
        the denoiser and the LLformer. Pretrained parts loaded as frozen (MobileFaceNet, a CLIP image tower) stay
        frozen, and frozen parts run in eval mode."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.stage = stage
        self.requires_grad_(False)
        for part in self._trainable_parts(stage):
            part.requires_grad_(True)
        for module in self.modules():
            if getattr(module, "frozen", False):
                module.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> LLDif:
        super().train(mode)
        if mode:
            trainable = self._trainable_parts(self.stage)
            for part in (self.la_clip, self.pnet_s1, self.pnet_s2, self.diffusion, self.dtnet, self.dlnet, self.head):
                if part not in trainable:
                    part.eval()
        return self

    # ---------------------------------------------------------------------------------------------------------
    # backends and files

    def set_backend(self, backend: str | None) -> None:
        """Runs every fused op of this model on `backend` ("reference", "cpp", "cuda", "triton"; None: the global
        choice of `lldif_kernels.use_backend` / LLDIF_BACKEND / automatic)."""
        self.config.backend = backend
        for module in self.modules():
            if isinstance(module, ModulatedLayerNorm | TransposedAttention | GatedDepthwiseFeedForward
                          | WindowCrossAttention):
                module.backend = backend

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes `config.json` and `model.safetensors` into `directory`, each atomically."""
        save_model_folder(directory, self.config.to_dict(), self, {"lldif_stage": str(self.stage)})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> LLDif:
        """The model `save_pretrained` wrote into `directory`."""
        config, weights = read_model_folder(directory, map_location)
        model = cls(LLDifConfig.from_dict(config))
        model.load_state_dict(weights)
        return model.to(map_location)

    def load_pth(self, path: str | os.PathLike, strict: bool = False) -> tuple[list[str], list[str]]:
        """Loads an external `.pth` state dict (torch.load with weights_only=True only; a `module.` prefix and a
        `state_dict` wrapper are undone); returns (missing, unexpected) keys."""
        result = self.load_state_dict(read_checkpoint(path), strict=strict)
        return list(result.missing_keys), list(result.unexpected_keys)
