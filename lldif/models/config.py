"""LLDif's configuration: every size and switch of the model, the two presets, and JSON round trips.

Numbers and tags refer to ../shared/LLDIF_SPEC.md; [L] choices are defaults with their alternative as a field.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DTNetConfig:
    """DiffIR/Restormer U-Net with EPD-modulated LayerNorms (SPEC 3.3)."""

    dim: int = 48                                   # level-1 width; level l has dim * 2**(l-1) channels
    encoder_blocks: tuple[int, ...] = (4, 6, 6, 8)  # levels 1-3 and the latent (level 4)
    decoder_blocks: tuple[int, ...] = (6, 6)        # decoder levels 3 and 2 (level 1 is omitted, SPEC 3.3)
    heads: tuple[int, ...] = (1, 2, 4, 8)
    ffn_expansion: float = 2.66
    bias: bool = False
    bias_free_norm: bool = False                    # Restormer's BiasFree LayerNorm instead of WithBias
    modulation: str = "adaln"                       # (1 + s) LN(x) + h, zero-init kernel; "diffir": s LN(x) + h
    taps: str = "decoder"                           # dec-L2, dec-L3, latent; "encoder": enc-L2, enc-L3, latent


@dataclass
class DLNetConfig:
    """POSTER++ landmark/image window cross-attention at three scales (SPEC 3.4)."""

    dims: tuple[int, ...] = (64, 128, 256)
    heads: tuple[int, ...] = (2, 4, 8)
    mlp_ratio: float = 4.0
    layer_scale: float = 1e-5
    drop_path: float = 0.5                          # rates linspace(0, drop_path, 5)[:3] -> 0, 0.125, 0.25
    query_projection: bool = False                  # the paper's W_Q (the POSTER++ code has none)
    landmark_features: str = "mobilefacenet"        # or "heatmap": Gaussian heatmaps of given points, encoded
    landmark_points: int = 68                       # points per face for "heatmap" (68 or MTCNN's 5)
    heatmap_sigma: float = 2.0                      # pixels at the model's internal resolution
    image_backbone: str = "ir50"                    # or "resnet": a light ResNet (small configs)
    resnet_widths: tuple[int, ...] = (32, 64, 128)  # widths of the light ResNet's three stages


@dataclass
class FusionConfig:
    """Per-scale fusion, POSTER++'s embedding convs, a small ViT, SE gate and head (SPEC 3.5, Eq. 10-12)."""

    embed_dim: int = 768
    depth: int = 2
    heads: int = 8
    mlp_ratio: float = 4.0
    concat: str = "channel"                         # or "token": 294 tokens instead of 147 (SPEC 7.5)
    readout: str = "cls"                            # the class token (POSTER++), "mean" of the others, or "tokens"


@dataclass
class PriorConfig:
    """The 256-d prior (EPD): PNET_S1 (Eq. 1), PNET_S2 (Eq. 15), the denoiser and diffusion (Eq. 14, 16)."""

    dim: int = 256
    pnet_s1: str = "cross_attention"                # or "mlp": LRDif's concat + MLP (SPEC 3.2)
    pnet_s1_label: str = "ground_truth"             # or "predicted": LA-CLIP's e_l instead of the label text
    normalize: str = "batch"                        # Z standardised per dimension (BatchNorm, no affine); "none"
    label_embedding: str = "centered"               # label embeddings minus the prompts' mean, unit length; "raw"
    label_dropout: float = 0.5                      # stage 1: share of samples given the null (mean) label
    pnet_s2_feats: int = 64
    pnet_s2_res_blocks: int = 6
    denoiser_blocks: int = 1
    steps: int = 4                                  # T, the number of reverse steps (Fig. 7/8)
    beta_start: float = 0.1
    beta_end: float = 0.99
    prediction: str = "x0"                          # or "eps"
    use_diffusion: bool = True                      # Table 5: False feeds PNET_S2's c straight to the LLformer
    insert_noise: bool = True                       # Table 5: training starts the chain from q_sample(Z, T-1)
    stochastic_reverse: bool = False                # add sigma_t * noise in each reverse step


@dataclass
class LossConfig:
    """Stage losses (Eq. 13, 17, 18)."""

    prior_loss: str = "kl"                          # "kl", "l1", "kl+l1", or "none" (Table 5: CE only)
    kl_temperature: float = 0.15
    label_smoothing: float = 0.0


@dataclass
class LAClipConfig:
    """LA-CLIP (SPEC 3.1): a trainable image tower and label head aligned with frozen text embeddings."""

    width: int = 768
    layers: int = 12
    heads: int = 12
    patch_size: int = 32
    image_size: int = 224
    embed_dim: int = 512                            # joint image/text space
    text_dim: int = 384                             # MiniLM's width (a user's open_clip text tower: 512)
    label_loss: str = "cross_entropy"               # 7-way CE over label prompts, or "contrastive" (DA-CLIP)


@dataclass
class LLDifConfig:
    """The whole model. `image_size` is the input side the model expects; the LLformer runs at `internal_size`
    (nearest resize, as POSTER++), which must be divisible by 16."""

    image_size: int = 224
    internal_size: int = 112
    num_classes: int = 7
    in_channels: int = 3
    dtnet: DTNetConfig = field(default_factory=DTNetConfig)
    dlnet: DLNetConfig = field(default_factory=DLNetConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    la_clip: LAClipConfig = field(default_factory=LAClipConfig)
    backend: str | None = None                      # fused-op backend for this model (None: global choice)

    def __post_init__(self) -> None:
        if self.internal_size % 16:
            raise ValueError(f"internal_size must be divisible by 16, got {self.internal_size}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LLDifConfig:
        """Inverse of `to_dict`; unknown keys raise naming them."""
        return _build(cls, values, "config")


def apply_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config's `to_dict()` with the fields named by dotted keys replaced, e.g. {"prior.steps": 8}."""
    result = copy.deepcopy(values)
    for key, value in overrides.items():
        node, (*path, last) = result, key.split(".")
        for part in path:
            node = node.get(part) if isinstance(node.get(part), dict) else None
            if node is None:
                break
        if node is None or last not in node or isinstance(node[last], dict):
            raise ValueError(f"overrides: {key!r} names no config field")
        node[last] = value
    return result


def _build(kind: type, values: dict[str, Any], where: str):
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    built = {}
    for name, value in values.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            built[name] = _build(type(default), value, f"{where}.{name}")
        else:
            built[name] = tuple(value) if isinstance(value, list) else value
    return kind(**built)


def lldif_base() -> LLDifConfig:
    """The paper-sized model of the spec (about 81 M parameters for inference)."""
    return LLDifConfig()


def lldif_tiny() -> LLDifConfig:
    """Same structure, small enough to train on two CPU cores in minutes. Its DLNet has no LayerScale damping and
    no DropPath: POSTER++'s 1e-5 layer scale keeps the landmark branch silent for the first thousand-odd steps,
    which is all a few-minute run has (measured: no learning in 140 steps with it, loss 1.95 -> 1.4 without). Its
    classifier reads every fusion token with its position instead of the cls token, which in a few hundred steps
    neither follows the prior nor the image (docs/experiments.md, section 1)."""
    return LLDifConfig(
        image_size=64,
        internal_size=64,
        dtnet=DTNetConfig(dim=16, encoder_blocks=(1, 1, 1, 1), decoder_blocks=(1, 1), heads=(1, 1, 2, 2)),
        dlnet=DLNetConfig(dims=(32, 32, 64), heads=(1, 1, 2), layer_scale=1.0, drop_path=0.0,
                          landmark_features="heatmap", image_backbone="resnet", resnet_widths=(16, 32, 64)),
        fusion=FusionConfig(embed_dim=64, depth=1, heads=2, readout="tokens"),
        prior=PriorConfig(dim=64, pnet_s2_feats=16, pnet_s2_res_blocks=1),
        la_clip=LAClipConfig(width=64, layers=2, heads=2, patch_size=8, image_size=64, embed_dim=64),
    )
