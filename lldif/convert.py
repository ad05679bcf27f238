"""`lldif convert`: DiffIR and POSTER++ checkpoints into the matching parts of an LLDif model.

DTNet is DiffIR's stage-2 DIRformer up to its level-2 decoder, and DLNet is POSTER++'s landmark/image window
attention, with their module names; two renames remain for DiffIR, whose LayerNorms keep their weights in a
``body`` submodule and whose ``kernel`` Linear lives in the attention and feed-forward modules rather than in the
LayerNorm it modulates. Parts a checkpoint has and LLDif does not (DiffIR's level-1 decoder, refinement and
output, its CPEN and denoiser; POSTER++'s embeddings and ViT) are reported as unused, never guessed into place.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models.lldif import LLDif
from .models.pretrained import read_checkpoint
from .run import write_json
from .train import TrainSettings, model_config, parse_override

SOURCES = ("diffir", "poster")
REPORT_FILE = "conversion.json"
# DiffIR name -> LLDif name, applied in order to every DIRformer key.
DIFFIR_RENAMES = (
    (re.compile(r"\.norm([12])\.body\."), r".norm\1."),
    (re.compile(r"\.attn\.kernel\.0\."), ".norm1.kernel."),
    (re.compile(r"\.ffn\.kernel\.0\."), ".norm2.kernel."),
)
DIFFIR_GENERATOR = "G."  # DiffIRS2 keeps its DIRformer as `G`; a bare DIRformer state dict has no prefix


@dataclasses.dataclass
class LoadReport:
    """What one checkpoint gave one part of the model: keys loaded, the part's keys it lacked, its unused keys."""

    source: str
    path: str
    part: str
    loaded: list[str]
    missing: list[str]
    unused: list[str]

    def summary(self) -> str:
        """One paragraph for a terminal: counts, then the missing and unused keys grouped by their first name."""
        def grouped(keys: list[str]) -> str:
            counts = Counter(key.split(".")[0] for key in keys)
            return ", ".join(f"{name}.* ({count})" for name, count in counts.items()) or "none"

        return (f"{self.source} {self.path} -> {self.part}: {len(self.loaded)} tensors loaded; missing from the "
                f"checkpoint: {grouped(self.missing)}; unused: {grouped(self.unused)}")


def diffir_to_dtnet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DiffIR stage-2 (DiffIRS2, `G.*`) or bare DIRformer state dict under DTNet's names; other DiffIRS2 parts
    (`condition`, `denoise`, `diffusion`) keep a `-` prefix so they are reported, not loaded."""
    generator = any(key.startswith(DIFFIR_GENERATOR) for key in state)
    renamed = {}
    for key, value in state.items():
        if generator and not key.startswith(DIFFIR_GENERATOR):
            renamed[f"-{key}"] = value
            continue
        key = key.removeprefix(DIFFIR_GENERATOR) if generator else key
        for pattern, replacement in DIFFIR_RENAMES:
            key = pattern.sub(replacement, key)
        renamed[key] = value
    return renamed


def load_part(module: nn.Module, weights: dict[str, torch.Tensor], *, source: str, path: str, part: str
              ) -> LoadReport:
    """Loads the `weights` whose names `module` has; a weight of another shape is an error (the checkpoint was
    trained with another configuration, and a partial load would hide it)."""
    own = module.state_dict()
    mismatched = [f"{key}: checkpoint {tuple(value.shape)}, model {tuple(own[key].shape)}"
                  for key, value in weights.items() if key in own and own[key].shape != value.shape]
    if mismatched:
        raise ValueError(f"path: {path} was trained with another {part} configuration than this model; "
                         f"{len(mismatched)} weights differ in shape, e.g. {'; '.join(mismatched[:3])}")
    loaded = {key: value for key, value in weights.items() if key in own}
    if not loaded:
        raise ValueError(f"path: {path} has no weight of {part} (is it a {source} checkpoint?)")
    missing = module.load_state_dict(loaded, strict=False).missing_keys
    unused = [key.removeprefix("-") for key in weights if key not in own]
    return LoadReport(source, str(path), part, sorted(loaded), list(missing), unused)


def load_diffir(model: LLDif, path: str | Path) -> LoadReport:
    """Loads a DiffIR stage-2 checkpoint's DIRformer into `model.dtnet`, which must use DiffIR's modulation."""
    if model.config.dtnet.modulation != "diffir":
        raise ValueError("model: DiffIR's kernel weights mean s * LN(x) + h; build the model with "
                         f"dtnet.modulation='diffir' to load them (it has {model.config.dtnet.modulation!r})")
    weights = diffir_to_dtnet(read_checkpoint(path))
    return load_part(model.dtnet, weights, source="diffir", path=str(path), part="dtnet")


def load_poster(model: LLDif, path: str | Path) -> LoadReport:
    """Loads a POSTER++ checkpoint's backbones and window attention into `model.dlnet`; a loaded landmark
    MobileFaceNet is frozen, as POSTER++ trains it."""
    report = load_part(model.dlnet, read_checkpoint(path), source="poster", path=str(path), part="dlnet")
    if any(key.startswith("face_landback.") for key in report.loaded):
        model.dlnet.face_landback.freeze()
    return report


LOADERS = {"diffir": load_diffir, "poster": load_poster}


def convert(checkpoints: dict[str, str | Path], out: str | Path, config: str = "base",
            overrides: dict[str, Any] | None = None) -> list[LoadReport]:
    """Builds LLDif from the preset or JSON file `config` with `overrides` (DiffIR's modulation when a DiffIR
    checkpoint is given and the overrides do not choose one), loads each of `checkpoints` (source -> path) into
    its part, and writes the model folder `out` (`LLDif.from_pretrained`, `lldif train --init`) with the
    reports in `out/conversion.json`."""
    unknown = sorted(set(checkpoints) - set(SOURCES))
    if unknown or not checkpoints:
        raise ValueError(f"checkpoints: give one or more of {', '.join(SOURCES)}, got {sorted(checkpoints)}")
    overrides = dict(overrides or {})
    if "diffir" in checkpoints:
        overrides.setdefault("dtnet.modulation", "diffir")
    settings = TrainSettings(data="", config=config, overrides=overrides)
    model = LLDif(model_config(settings))
    reports = [LOADERS[source](model, path) for source, path in checkpoints.items()]
    out = Path(out)
    model.save_pretrained(out)
    write_json(out / REPORT_FILE, {"config": config, "overrides": overrides,
                                   "reports": [dataclasses.asdict(report) for report in reports]})
    return reports


def add_convert_command(commands: argparse._SubParsersAction) -> None:
    """Registers `lldif convert`."""
    parser = commands.add_parser(
        "convert", help="DiffIR and POSTER++ checkpoints into an LLDif model folder",
        description="Loads a DiffIR stage-2 checkpoint (its DIRformer -> DTNet) and/or a POSTER++ checkpoint (its "
                    "IR-50, MobileFaceNet and window attention -> DLNet) into LLDif and writes a model folder "
                    "for LLDif.from_pretrained or `lldif train --init`. Files are read with weights_only=True; "
                    "what was loaded, missing and unused is printed and kept in OUT/conversion.json.")
    parser.add_argument("--diffir", help="DiffIR stage-2 (DiffIRS2 or DIRformer) .pth")
    parser.add_argument("--poster", help="POSTER++ .pth (pyramid_trans_expr2)")
    parser.add_argument("--config", default="base", help="preset (base, tiny) or JSON config file (default: base)")
    parser.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[],
                        metavar="FIELD=VALUE", help="config field override (repeatable)")
    parser.add_argument("--out", required=True, help="model folder to write")

    def run(args: argparse.Namespace) -> None:
        checkpoints = {source: getattr(args, source) for source in SOURCES if getattr(args, source)}
        if not checkpoints:
            parser.error("give --diffir, --poster or both")
        for report in convert(checkpoints, args.out, args.config, dict(args.overrides)):
            print(report.summary())
        print(f"wrote {args.out}")

    parser.set_defaults(run=run)
