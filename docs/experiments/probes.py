"""The probes of docs/experiments.md: short runs that train one part of LLDif-tiny (or the baseline CNN) directly,
and ridge classifiers that measure how much expression the landmarks carry.

Research tooling, not part of the library: nothing in `lldif` imports it, and the library's tests do not cover it.
It exists so that every probe row of the experiment log can be rerun with one command. Run it from the repository
root, e.g.

    .venv/bin/python docs/experiments/probes.py llformer --prior code --set fusion.readout=mean
    .venv/bin/python docs/experiments/probes.py SUBCOMMAND --help

Unless an option says otherwise every probe trains on `synthetic:700` darkened with the `paper` preset (seed 0),
in batches of 16 with Adam at a constant lr of 3e-4 (no per-epoch decay, unlike `lldif train`), with the data's
own landmarks: for synthetic faces the generator's exact points, an oracle no detector reaches. The subcommands:

- `llformer`: the tiny preset's LLformer (DTNet, DLNet, fusion head) under a given prior (section 1);
- `baseline`: the baseline CNN in the same loop (section 1, the image read-out table);
- `pooled`: DTNet's taps or DLNet's outputs, each globally pooled, into one Linear (section 1);
- `pnet-s2`: PNET_S2 with a Linear classifier on top, trained with cross-entropy (section 3);
- `landmarks`: ridge classifiers on exact and detected landmarks (section 2);
- `prior`: what the teacher prior carries at the start of stage 1, and stage-1 runs without it (sections 1, 2).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.linear_model import RidgeClassifier
from torch import nn

from lldif.argtypes import integer_at_least, non_negative_int, positive_int
from lldif.data.face_layout import mean_shape
from lldif.data.labels import EXPRESSIONS
from lldif.data.landmarks import LandmarkDetector, contrast_stretch, detector_for
from lldif.data.loader import FaceBatch, FaceDataModule, open_dataset
from lldif.data.lowlight import LowLight
from lldif.models.baseline import BaselineCNN, baseline_tiny
from lldif.models.config import LLDifConfig, apply_overrides, lldif_tiny
from lldif.models.lldif import LLDif
from lldif.models.pnet import PNetS2, ResBlock
from lldif.run import CHECKPOINTS, Run
from lldif.train import TrainSettings, build_model, parse_override

TRAIN_DATA, TEST_DATA = "synthetic:700", "synthetic:350"
BATCH_SIZE = 16
LR = 3e-4
STEPS_PER_EPOCH = 700 // BATCH_SIZE  # 43: the loader drops the incomplete last batch
DEFAULT_STEPS = 4 * STEPS_PER_EPOCH
# The faces the data module gives (and the tiny preset expects); the landmark probe reads the generator's own size.
IMAGE_SIZE = lldif_tiny().image_size
NUM_CLASSES = lldif_tiny().num_classes


# -------------------------------------------------------------------------------------------------------------
# data and training loops shared by the probes


def darkening(normal: bool) -> LowLight | None:
    """The darkening of every probe: the `paper` preset with a fixed seed, so each face is darkened the same way in
    every epoch and every probe (as `lldif train --lowlight paper` does); None with `normal`."""
    return None if normal else LowLight("paper", seed=0)


def face_data(normal: bool, seed: int = 0, batch_size: int = BATCH_SIZE, image_size: int = IMAGE_SIZE,
              detect_landmarks: str | None = None,
              landmark_cache: str | os.PathLike | None = None) -> FaceDataModule:
    """`synthetic:700` for training and `synthetic:350` for testing, at the tiny preset's image size; with
    `detect_landmarks`, the detector's landmarks read from (or, for faces not there yet, written to)
    `landmark_cache` instead of the generator's."""
    return FaceDataModule(open_dataset(TRAIN_DATA, "train"), open_dataset(TEST_DATA, "test"), image_size=image_size,
                          batch_size=batch_size, seed=seed, lowlight=darkening(normal), progress=False,
                          detect_landmarks=detect_landmarks, landmark_cache=landmark_cache)


def optimizer_step(probe: nn.Module, batch: FaceBatch, optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """One cross-entropy step of `probe(batch)` (logits); returns (loss, accuracy) of the batch."""
    logits = probe(batch)
    loss = F.cross_entropy(logits, batch.label)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item(), (logits.argmax(-1) == batch.label).float().mean().item()


def trainable(probe: nn.Module) -> list[nn.Parameter]:
    return [parameter for parameter in probe.parameters() if parameter.requires_grad]


def train_steps(probe: nn.Module, data: FaceDataModule, steps: int, window: int, lr: float = LR) -> None:
    """Trains `probe` for `steps` optimizer steps (epochs of the data in turn) and prints, every `window` steps, the
    last loss and the running training accuracy over the last `window` steps. The running accuracy, not a test
    accuracy: these probes ask whether a part of the model can learn at all within a few dozen steps."""
    optimizer = torch.optim.Adam(trainable(probe), lr=lr)
    probe.train()
    accuracies: list[float] = []
    epoch = 0
    while len(accuracies) < steps:
        for batch in data.train_dataloader(epoch):
            loss, accuracy = optimizer_step(probe, batch, optimizer)
            accuracies.append(accuracy)
            if len(accuracies) % window == 0:
                running = sum(accuracies[-window:]) / window
                print(f"step {len(accuracies):4d}  loss {loss:.3f}  running acc({window}) {running:.3f}", flush=True)
            if len(accuracies) == steps:
                break
        epoch += 1


@torch.no_grad()
def test_accuracy(probe: nn.Module, data: FaceDataModule) -> float:
    probe.eval()
    correct = total = 0
    for batch in data.test_dataloader():
        correct += (probe(batch).argmax(-1) == batch.label).sum().item()
        total += len(batch.label)
    return correct / total


def train_epochs(probe: nn.Module, data: FaceDataModule, epochs: int, lr: float) -> None:
    """Trains `probe` for whole epochs and prints after each the mean training loss and the test accuracy."""
    optimizer = torch.optim.Adam(trainable(probe), lr=lr)
    for epoch in range(epochs):
        probe.train()
        losses = [optimizer_step(probe, batch, optimizer)[0] for batch in data.train_dataloader(epoch)]
        print(f"epoch {epoch + 1:3d}  train loss {sum(losses) / len(losses):.3f}  "
              f"test acc {test_accuracy(probe, data):.3f}", flush=True)


def add_loop_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--normal", action="store_true", help="normal-light faces instead of darkened ones")
    parser.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                        help=f"optimizer steps (default {DEFAULT_STEPS}: 4 epochs of 700 faces)")
    parser.add_argument("--window", type=positive_int, default=10,
                        help="print every this many steps the running accuracy over as many steps (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="torch's seed and the data order's (default 0)")


# -------------------------------------------------------------------------------------------------------------
# llformer: the LLformer under a given prior


class PriorProbe(nn.Module):
    """LLDif's LLformer (`LLDif.prior_logits`) under one of three priors: `code`, a fixed random code per class
    (what an ideal prior would carry: the label and nothing else), `teacher`, the stage-1 teacher prior Z (PNET_S1
    on LA-CLIP's embeddings and the label text, trained with the LLformer), or `zero`, no prior at all (the LLformer
    as a plain image classifier)."""

    def __init__(self, model: LLDif, prior: str, seed: int) -> None:
        super().__init__()
        self.model, self.prior = model, prior
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("code", torch.randn(model.config.num_classes, model.config.prior.dim,
                                                 generator=generator))

    def forward(self, batch: FaceBatch) -> torch.Tensor:
        if self.prior == "code":
            prior = self.code[batch.label]
        elif self.prior == "teacher":
            prior = self.model.teacher_prior(batch.image, batch.label)
        else:
            prior = batch.image.new_zeros(len(batch.label), self.model.config.prior.dim)
        return self.model.prior_logits(batch.image, batch.landmarks, prior)


def stage1_model(la_clip: str, overrides: dict[str, Any]) -> LLDif:
    """A stage-1 model started from an LA-CLIP run exactly as `lldif train --stage 1 --init RUN --config tiny`
    starts it: LA-CLIP and the label prompts from the run, the rest as the run left it (fresh), or built anew from
    torch's generator with `overrides`."""
    settings = TrainSettings(data=TRAIN_DATA, stage="1", config="tiny", init=la_clip, overrides=overrides)
    return build_model(settings)


def run_llformer(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    overrides = dict(args.overrides)
    if args.prior == "teacher":
        # The teacher prior needs a trained LA-CLIP.
        model = stage1_model(args.la_clip, overrides)
    else:
        model = LLDif(LLDifConfig.from_dict(apply_overrides(lldif_tiny().to_dict(), overrides)))
        # Stage 1's trainable parts: PNET_S1 and the LLformer (PNET_S1 gets no gradient without the teacher prior).
        model.freeze_for_stage(1)
    train_steps(PriorProbe(model, args.prior, args.seed), face_data(args.normal, args.seed), args.steps, args.window)


# -------------------------------------------------------------------------------------------------------------
# baseline: the baseline CNN in the same loop


class ImageProbe(nn.Module):
    """A classifier of the images alone."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: FaceBatch) -> torch.Tensor:
        return self.model(batch.image)


def run_baseline(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    probe = ImageProbe(BaselineCNN(baseline_tiny(IMAGE_SIZE)))
    train_steps(probe, face_data(args.normal, args.seed), args.steps, args.window)


# -------------------------------------------------------------------------------------------------------------
# pooled: one LLformer branch, globally pooled


class PooledProbe(nn.Module):
    """DTNet's three taps (under a zero prior) or DLNet's three outputs, each averaged over its positions and
    concatenated into one Linear: the branch without the fusion ViT, with a read-out that drops the positions."""

    def __init__(self, model: LLDif, branch: str) -> None:
        super().__init__()
        self.model, self.branch = model, branch
        channels = model.dtnet.tap_channels if branch == "dtnet" else model.dlnet.out_channels
        self.classifier = nn.Linear(sum(channels), model.config.num_classes)

    def forward(self, batch: FaceBatch) -> torch.Tensor:
        # The LLformer's own input preparation: its internal resolution, the landmarks scaled to it.
        images, landmarks = self.model._internal(batch.image, batch.landmarks)
        if self.branch == "dtnet":
            features = self.model.dtnet(images, images.new_zeros(len(images), self.model.config.prior.dim))
        else:
            features = self.model.dlnet(images, landmarks)
        return self.classifier(torch.cat([feature.mean((2, 3)) for feature in features], 1))


def run_pooled(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    probe = PooledProbe(LLDif(lldif_tiny()), args.branch)
    train_steps(probe, face_data(args.normal, args.seed), args.steps, args.window)


# -------------------------------------------------------------------------------------------------------------
# pnet-s2: PNET_S2 as an image classifier


def add_batch_norm(pnet: PNetS2) -> None:
    """A BatchNorm after every convolution of PNET_S2, the residual blocks' included."""
    layers: list[nn.Module] = []
    for module in pnet.E:
        layers.append(module)
        if isinstance(module, nn.Conv2d):
            layers.append(nn.BatchNorm2d(module.out_channels))
        elif isinstance(module, ResBlock):
            first, activation, second = module.body
            module.body = nn.Sequential(first, nn.BatchNorm2d(first.out_channels), activation, second,
                                        nn.BatchNorm2d(second.out_channels))
    pnet.E = nn.Sequential(*layers)


def pool_on_grid(pnet: PNetS2, grid: int) -> None:
    """Average over a grid x grid grid of cells instead of the whole image, so the MLP sees where features are."""
    if not isinstance(pnet.E[-1], nn.AdaptiveAvgPool2d):
        raise TypeError("PNET_S2's encoder no longer ends in its global pool")
    pnet.E[-1] = nn.AdaptiveAvgPool2d(grid)
    dim = pnet.mlp[0].out_features
    pnet.mlp[0] = nn.Linear(dim * grid * grid, dim)


def kaiming_init(pnet: PNetS2) -> None:
    """He initialisation for the LeakyReLU(0.1) that follows every layer, zero biases, and residual branches that
    start at zero (each residual block starts as the identity)."""
    for module in pnet.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(module.weight, a=0.1, nonlinearity="leaky_relu")
            nn.init.zeros_(module.bias)
    for module in pnet.modules():
        if isinstance(module, ResBlock):
            last = [layer for layer in module.body if isinstance(layer, nn.Conv2d)][-1]
            nn.init.zeros_(last.weight)


def standardise(images: torch.Tensor) -> torch.Tensor:
    """Each image at zero mean and unit standard deviation (a darkened face is nearly constant and near the
    normalisation's minimum; this removes its overall level and contrast)."""
    mean, std = images.mean((1, 2, 3), keepdim=True), images.std((1, 2, 3), keepdim=True)
    return (images - mean) / (std + 1e-3)


class PNetS2Probe(nn.Module):
    """PNET_S2 (a variant of it) and a Linear classifier on its condition vector."""

    def __init__(self, pnet: PNetS2, features: int, standardise_input: bool) -> None:
        super().__init__()
        self.pnet, self.standardise_input = pnet, standardise_input
        self.classifier = nn.Linear(features, NUM_CLASSES)

    def condition(self, images: torch.Tensor) -> torch.Tensor:
        return self.pnet(standardise(images) if self.standardise_input else images)

    def forward(self, batch: FaceBatch) -> torch.Tensor:
        return self.classifier(self.condition(batch.image))


def run_pnet_s2(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    config = lldif_tiny().prior
    config.pnet_s2_feats, config.pnet_s2_res_blocks = args.feats, args.res_blocks
    pnet = PNetS2(config)
    if args.batch_norm:
        add_batch_norm(pnet)
    if args.pool > 1:
        pool_on_grid(pnet, args.pool)
    if args.kaiming_init:
        kaiming_init(pnet)
    features = config.dim
    if args.no_mlp:
        pnet.mlp = nn.Identity()
        features *= args.pool * args.pool
    probe = PNetS2Probe(pnet, features, args.standardise_input)
    data = face_data(args.normal)
    # How much of PNET_S2's output depends on the image at all, before training: the spread over a batch of
    # faces against the output's size (DiffIR's init on dark faces: 0.0005 of 0.035).
    with torch.no_grad():
        images = next(iter(face_data(args.normal, batch_size=64).train_dataloader(0))).image
        probe.train()
        output = probe.condition(images)
    print(f"PNET_S2 output before training: std over a batch of 64 {output.std(0).mean().item():.4g} (mean over "
          f"dimensions), mean |value| {output.abs().mean().item():.4g}", flush=True)
    train_epochs(probe, data, args.epochs, args.lr)


# -------------------------------------------------------------------------------------------------------------
# landmarks: how much expression exact and detected landmarks carry

# The fixed-box predictor runs on the contrast-stretched face enlarged this many times (112 -> 224 pixels), in a
# box of the mean face's extent widened by this many pixels of the enlarged image on each side: dlib's boxes reach
# from the brows to the chin, beyond the mean shape's outermost points.
FIXED_BOX_ZOOM = 2
FIXED_BOX_MARGIN = 10
RIDGE_ALPHAS = (0.01, 0.1)


def aligned(points: np.ndarray) -> np.ndarray:
    """(P, 2) points centered and scaled to unit norm, flattened: the shape without position and size."""
    centered = points - points.mean(0)
    return (centered / np.sqrt((centered ** 2).sum())).ravel()


class LandmarkFeatures:
    """The aligned landmarks of `faces` synthetic faces of a split, darkened: the generator's exact points
    (`exact`), dlib's 68 points found by the project's detector with the mean shape where it finds no face
    (`detected`, `found` saying where it found one), and dlib's shape predictor on a fixed box around the mean
    face (`fixed_box`)."""

    def __init__(self, split: str, faces: int, detector: LandmarkDetector, darken: LowLight) -> None:
        import dlib  # an optional dependency of the library (lldif[dlib]); only this probe needs it

        source = open_dataset(f"synthetic:{faces}", split)
        exact, detected, fixed_box, labels, found = [], [], [], [], []
        box = None
        for index in range(faces):
            face = source[index]
            image = darken(face.image, key=face.key)
            side = image.shape[0]
            mean = mean_shape(image.shape[1], side, 68)
            if box is None:
                (x0, y0), (x1, y1) = mean.min(0) * FIXED_BOX_ZOOM, mean.max(0) * FIXED_BOX_ZOOM
                box = dlib.rectangle(int(x0 - FIXED_BOX_MARGIN), int(y0 - FIXED_BOX_MARGIN),
                                     int(x1 + FIXED_BOX_MARGIN), int(y1 + FIXED_BOX_MARGIN))
            detection = detector.detect(image)
            found.append(detection is not None)
            detected.append(aligned(mean if detection is None else detection.points))
            enlarged = Image.fromarray(contrast_stretch(image)).resize(
                (image.shape[1] * FIXED_BOX_ZOOM, side * FIXED_BOX_ZOOM), Image.Resampling.BICUBIC)
            # The detector's own predictor: `LandmarkDetector` exposes no way to skip its face search.
            shape = detector._dlib_predictor(np.asarray(enlarged), box)
            points = np.array([(p.x + 0.5, p.y + 0.5) for p in shape.parts()], np.float32) / FIXED_BOX_ZOOM
            fixed_box.append(aligned(points))
            exact.append(aligned(face.landmarks))
            labels.append(face.label)
        self.exact, self.detected, self.fixed_box = np.array(exact), np.array(detected), np.array(fixed_box)
        self.labels, self.found = np.array(labels), np.array(found)


def ridge_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                   alpha: float) -> float:
    """Test accuracy of a ridge classifier, NaN where the training faces hold fewer than two classes."""
    if len(np.unique(train_y)) < 2 or len(test_y) == 0:
        return float("nan")
    return float(RidgeClassifier(alpha=alpha).fit(train_x, train_y).score(test_x, test_y))


def count_mtcnn_faces(faces: int, darken: LowLight) -> None:
    """In how many of the first `faces` training faces MTCNN finds a face, darkened and at normal light."""
    detector = LandmarkDetector("mtcnn")
    source = open_dataset(f"synthetic:{faces}", "train")
    samples = [source[index] for index in range(faces)]
    dark = sum(detector.detect(darken(face.image, key=face.key)) is not None for face in samples)
    normal = sum(detector.detect(face.image) is not None for face in samples)
    print(f"MTCNN (5 points) on {faces} training faces: found {dark} darkened, {normal} normal")


def run_landmarks(args: argparse.Namespace) -> None:
    darken = darkening(normal=False)
    detector = LandmarkDetector("dlib68")
    train = LandmarkFeatures("train", args.faces, detector, darken)
    test = LandmarkFeatures("test", args.faces // 2, detector, darken)
    print(f"dlib68 found a face in {train.found.sum()} of {len(train.found)} training and {test.found.sum()} of "
          f"{len(test.found)} test faces (darkened)")
    print("alpha   exact  dlib68+mean-shape  dlib68-found-only  fixed-box")
    for alpha in RIDGE_ALPHAS:
        accuracies = [
            ridge_accuracy(train.exact, train.labels, test.exact, test.labels, alpha),
            ridge_accuracy(train.detected, train.labels, test.detected, test.labels, alpha),
            ridge_accuracy(train.detected[train.found], train.labels[train.found], test.detected[test.found],
                           test.labels[test.found], alpha),
            ridge_accuracy(train.fixed_box, train.labels, test.fixed_box, test.labels, alpha),
        ]
        print(f"{alpha:<6}  {accuracies[0]:.3f}  {accuracies[1]:17.3f}  {accuracies[2]:17.3f}  {accuracies[3]:9.3f}")
    if args.mtcnn_faces:
        count_mtcnn_faces(args.mtcnn_faces, darken)


# -------------------------------------------------------------------------------------------------------------
# prior: what the teacher prior carries at the start of stage 1, and what stage-1 runs read without it

# Parameter groups (substrings of parameter names) whose gradient norms the probe prints.
GRADIENT_GROUPS = ("norm1.kernel", "norm2.kernel", "pnet_s1", "dtnet.patch_embed", "dlnet", "head.head",
                   "head.blocks", "head.embed_q")
DECOMPOSITION_FACES = 112
ACCURACY_BATCH_SIZE = 50


def print_cosines(title: str, embeddings: torch.Tensor) -> None:
    """The range of the pairwise cosines of (K, D) label-prompt embeddings (off the diagonal), then all of them
    as a K x K table."""
    unit = F.normalize(embeddings.detach().float(), dim=-1)
    cosines = unit @ unit.T
    off_diagonal = cosines[~torch.eye(len(cosines), dtype=torch.bool)]
    print(f"{title}: pairwise cosines {off_diagonal.min().item():.2f} to {off_diagonal.max().item():.2f}")
    names = [name[:9] for name in EXPRESSIONS]
    print(" " * 11 + "".join(f"{name:>10}" for name in names))
    for name, row in zip(names, cosines.tolist(), strict=True):
        print(f"  {name:<9}" + "".join(f"{value:10.2f}" for value in row))


def gradient_norm(model: nn.Module, group: str) -> float:
    """The norm of the gradients of all parameters whose name contains `group`."""
    norms = [parameter.grad.norm() for name, parameter in model.named_parameters()
             if group in name and parameter.grad is not None]
    return torch.stack(norms).norm().item() if norms else 0.0


def class_variances(values: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(between-class, within-class) variance of (N, D) values with each dimension standardised over the N
    samples, averaged over dimensions: the variance of the class means, and the mean of the variances within a
    class."""
    standard = (values - values.mean(0)) / (values.std(0) + 1e-6)
    classes = [standard[labels == label] for label in labels.unique()]
    between = torch.stack([members.mean(0) for members in classes]).var(0).mean()
    within = torch.stack([members.var(0).mean() for members in classes]).mean()
    return between.item(), within.item()


def print_step0(model: LLDif, batch: FaceBatch) -> None:
    """The teacher prior Z of one training batch and the gradients of the stage-1 loss there, in train mode (as
    stage 1's first step sees them: Z standardised over the batch, label dropout drawn from torch's generator)."""
    model.train()
    prior = model.teacher_prior(batch.image, batch.label)
    next_class = model.teacher_prior(batch.image, (batch.label + 1) % model.config.num_classes)
    print(f"  teacher prior Z: std over the batch {prior.std(0).mean().item():.4g} (mean over dimensions), "
          f"per-sample std {prior.std(1).mean().item():.4g} (mean over samples)")
    print(f"  every label replaced by the next class: Z moves by {(prior - next_class).pow(2).mean().sqrt().item():.4g}"
          " (rms)")
    model.zero_grad()
    model.stage1_loss(batch).total.backward()
    print("  gradient norms of the stage-1 loss at step 0:")
    for group in GRADIENT_GROUPS:
        print(f"    {group:<18} {gradient_norm(model, group):.3g}")


@torch.no_grad()
def print_class_variances(model: LLDif, batch: FaceBatch) -> None:
    """Between- and within-class variance of the teacher prior Z and of LA-CLIP's image embedding e_I, in eval
    mode (a per-dimension BatchNorm of Z in its running statistics changes nothing after the standardisation)."""
    model.eval()
    prior = model.teacher_prior(batch.image, batch.label)
    image_embedding, _ = model.la_clip.encode(model._clip_view(batch.image))
    for name, values in (("Z", prior), ("e_I", image_embedding)):
        between, within = class_variances(values, batch.label)
        print(f"  {name:<4} between-class variance {between:.4g}, within-class {within:.4g}")


@torch.no_grad()
def print_stage1_accuracies(path: str, checkpoint: str) -> None:
    """A stage-1 run's test accuracy under the null label (the teacher prior with every label dropped) and under a
    zero prior, with the run's own landmarks: the data's, or its detector's from its landmark cache."""
    run = Run(path)
    settings = run.settings
    model = run.load_model(checkpoint)
    detector = detector_for(settings["landmarks"], model.landmark_points)
    cache = settings.get("landmark_cache") or run.path / "landmarks"
    data = face_data(False, batch_size=ACCURACY_BATCH_SIZE, image_size=model.config.image_size,
                     detect_landmarks=detector, landmark_cache=cache)
    null_label = zero_prior = total = 0
    for batch in data.test_dataloader():
        dropped = torch.ones_like(batch.label, dtype=torch.bool)
        null_prior = model.teacher_prior(batch.image, batch.label, dropped)
        null_label += (model.prior_logits(batch.image, batch.landmarks, null_prior).argmax(-1) == batch.label).sum()
        zero = torch.zeros_like(null_prior)
        zero_prior += (model.prior_logits(batch.image, batch.landmarks, zero).argmax(-1) == batch.label).sum()
        total += len(batch.label)
    if detector is None:
        landmarks = "the data's own landmarks"
    else:
        landmarks = f"{detector} landmarks from {cache}, found in {data.detected['test'].found} of {total}"
    print(f"{path} ({checkpoint} checkpoint, {total} darkened test faces, {landmarks}):")
    print(f"  null-label acc {null_label.item() / total:.3f}, zero-prior acc {zero_prior.item() / total:.3f}")


def run_prior(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    model = stage1_model(args.la_clip, dict(args.overrides))
    with torch.no_grad():
        print_cosines("label prompts after LA-CLIP's text projection",
                      model.la_clip.embed_text(model.label_prompt_embeddings))
    print_cosines("raw label-prompt embeddings (the frozen text encoder's)", model.label_prompt_embeddings)
    data = face_data(normal=False, seed=args.seed)
    print(f"\nstage-1 model from {args.la_clip}, one batch of {BATCH_SIZE} darkened training faces:")
    print_step0(model, next(iter(data.train_dataloader(0))))
    test = face_data(normal=False, seed=args.seed, batch_size=DECOMPOSITION_FACES)
    print(f"\n{DECOMPOSITION_FACES} darkened test faces, each dimension standardised over them:")
    print_class_variances(model, next(iter(test.test_dataloader())))
    for path in args.stage1:
        print()
        print_stage1_accuracies(path, args.checkpoint)


# -------------------------------------------------------------------------------------------------------------
# the command


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = main.add_subparsers(dest="command", required=True)
    landmark_note = "Landmarks: the data's own, i.e. the synthetic generator's exact points (an oracle)"

    llformer = commands.add_parser(
        "llformer", help="the tiny preset's LLformer trained under a given prior",
        description="Trains the tiny preset's LLformer (LLDif.prior_logits) under a prior: a fixed random code per "
                    f"class, the real stage-1 teacher prior (no label dropout), or zero (image only). {landmark_note}.")
    llformer.add_argument("--prior", choices=("code", "teacher", "zero"), required=True,
                          help="code: R[label] with R ~ N(0, 1) of shape (7, prior.dim), fixed; teacher: PNET_S1 on "
                               "LA-CLIP's embeddings and the label text (needs --la-clip); zero: a zero prior")
    llformer.add_argument("--la-clip", metavar="RUN",
                          help="LA-CLIP run folder (`lldif train --stage la-clip`) the teacher prior comes from")
    llformer.add_argument("--set", dest="overrides", type=parse_override, action="append", default=[],
                          metavar="FIELD=VALUE",
                          help="change a field of the tiny config (of the LA-CLIP run's with --prior teacher), e.g. "
                               "--set fusion.readout=mean (repeatable; values are JSON, else strings)")
    add_loop_options(llformer)
    llformer.set_defaults(run=run_llformer)

    baseline = commands.add_parser("baseline", help="the tiny baseline CNN in the same loop",
                                   description="Trains BaselineCNN(baseline_tiny()) in the llformer probe's loop.")
    add_loop_options(baseline)
    baseline.set_defaults(run=run_baseline)

    pooled = commands.add_parser(
        "pooled", help="DTNet taps or DLNet outputs, globally pooled into a Linear",
        description="Trains one branch of the tiny LLformer with its three feature maps each averaged over their "
                    f"positions into one Linear: DTNet (under a zero prior) or DLNet. {landmark_note}.")
    pooled.add_argument("--branch", choices=("dtnet", "dlnet"), required=True)
    add_loop_options(pooled)
    pooled.set_defaults(run=run_pooled)

    tiny_prior = lldif_tiny().prior
    pnet = commands.add_parser(
        "pnet-s2", help="PNET_S2 with a Linear classifier, cross-entropy",
        description="Trains the tiny preset's PNET_S2 (or a variant) with a Linear classifier on its output, and "
                    "prints first how much its output depends on the image, then after every epoch the mean "
                    "training loss and the test accuracy on synthetic:350.")
    pnet.add_argument("--batch-norm", action="store_true", help="a BatchNorm after every convolution")
    pnet.add_argument("--standardise-input", action="store_true",
                      help="each image standardised to zero mean and unit std first")
    pnet.add_argument("--pool", type=positive_int, default=1, metavar="G",
                      help="average over a G x G grid instead of the whole image (default 1)")
    pnet.add_argument("--feats", type=positive_int, default=tiny_prior.pnet_s2_feats,
                      help=f"PNET_S2's feature width (default {tiny_prior.pnet_s2_feats}, the tiny preset's)")
    pnet.add_argument("--res-blocks", type=non_negative_int, default=tiny_prior.pnet_s2_res_blocks,
                      help=f"residual blocks (default {tiny_prior.pnet_s2_res_blocks}, the tiny preset's)")
    pnet.add_argument("--kaiming-init", action="store_true",
                      help="He init for LeakyReLU(0.1), zero biases, zero-initialised residual branches")
    pnet.add_argument("--no-mlp", action="store_true", help="without PNET_S2's MLP tail")
    pnet.add_argument("--normal", action="store_true", help="normal-light faces instead of darkened ones")
    pnet.add_argument("--epochs", type=positive_int, default=10, help="epochs of 700 faces (default 10: 430 steps)")
    pnet.add_argument("--lr", type=float, default=LR, help=f"Adam's learning rate (default {LR})")
    pnet.add_argument("--seed", type=int, default=0, help="torch's seed (default 0)")
    pnet.set_defaults(run=run_pnet_s2)

    landmarks = commands.add_parser(
        "landmarks", help="ridge classifiers on exact vs detected landmarks",
        description="Ridge classifiers of the expression from aligned landmarks (centered, unit norm) of darkened "
                    "synthetic faces: the generator's exact points; dlib's 68 points as the project's detector "
                    "finds them (contrast stretch, MTCNN box fallback), with the mean shape where it finds no face; "
                    "the same on the faces it found only; dlib's shape predictor on a fixed box around the mean "
                    "face. Needs dlib (`pip install -e '.[dlib]'`).")
    landmarks.add_argument("--faces", type=integer_at_least(2, "faces"), default=700,
                           help="training faces (default 700); the test split gets half as many")
    landmarks.add_argument("--mtcnn-faces", type=non_negative_int, default=0, metavar="N",
                           help="also count in how many of the first N training faces MTCNN finds a face, darkened "
                                "and normal (default 0: skip)")
    landmarks.set_defaults(run=run_landmarks)

    prior = commands.add_parser(
        "prior", help="what the teacher prior carries at stage 1's start; stage-1 runs without it",
        description="The pairwise cosines of the 7 label-prompt embeddings after LA-CLIP's text "
                    "projection and before it; for a stage-1 model built from the LA-CLIP run (as `lldif train "
                    "--stage 1 --init RUN --config tiny`) on one batch of 16 darkened training faces, in train "
                    "mode, the spread of the teacher prior Z, how far Z moves when every label is replaced by the "
                    "next class, and the gradient norms of the stage-1 loss at step 0; on 112 darkened test faces, "
                    "the between- and within-class variance of Z and of LA-CLIP's image embedding e_I, each "
                    "dimension standardised. With --stage1: each run's accuracy on the 350 darkened test faces "
                    "under the null label (the teacher prior with every label dropped) and under a zero prior, "
                    "with the run's own landmarks (detected ones are read from, or added to, its landmark cache).")
    prior.add_argument("--la-clip", metavar="RUN", required=True,
                       help="LA-CLIP run folder (`lldif train --stage la-clip`)")
    prior.add_argument("--stage1", metavar="RUN", nargs="+", action="extend", default=[],
                       help="stage-1 run folders whose null-label and zero-prior accuracy to measure")
    prior.add_argument("--checkpoint", choices=CHECKPOINTS, default="last",
                       help="the --stage1 runs' checkpoint (default last)")
    prior.add_argument("--set", dest="overrides", type=parse_override, action="append", default=[],
                       metavar="FIELD=VALUE",
                       help="change a field of the stage-1 model built from the LA-CLIP run, e.g. --set "
                            "prior.normalize=none (repeatable; values are JSON, else strings)")
    prior.add_argument("--seed", type=int, default=0, help="torch's seed and the data order's (default 0)")
    prior.set_defaults(run=run_prior)
    return main


def main(argv: list[str] | None = None) -> None:
    command = parser()
    args = command.parse_args(argv)
    if getattr(args, "prior", None) == "teacher" and not args.la_clip:
        command.error("--prior teacher needs --la-clip RUN (an LA-CLIP run folder)")
    args.run(args)


if __name__ == "__main__":
    main()
