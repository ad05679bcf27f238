"""The whole model: base-preset inference (batch 1 and 8) and a tiny-preset stage-2 training step.

Providers: `reference` (every fused op on its plain-PyTorch reference), `fused` (the automatic backend: cpp on
CPU, triton on CUDA), `compile` (torch.compile of the reference model). `extra_info` carries images/s and the
peak memory of one call. On CUDA the stage-2 step runs the base preset at B=64 in bf16 autocast (the H200 target).

    python -m pytest benchmarks/test_bench_model.py --benchmark-only
"""

from __future__ import annotations

import copy

import pytest
import torch
from bench_utils import CUDA, DEVICE, peak_memory_bytes

from lldif import LLDif, lldif_base, lldif_tiny

PROVIDERS = ("reference", "fused", "compile")


def model_for(provider: str, config) -> LLDif:
    """The model as `provider` runs it, the same weights for every provider."""
    torch.manual_seed(0)
    model = LLDif(config).to(DEVICE)
    model.set_label_prompts(torch.randn(7, config.la_clip.text_dim, device=DEVICE))
    model.set_backend(None if provider == "fused" else "reference")
    return model


def run(benchmark, provider: str, call, images: int) -> None:
    call()  # compilation and first touch stay outside the timing
    benchmark.group = benchmark.name.split("[")[0].removeprefix("test_") + f" B={images}"
    benchmark.pedantic(call, rounds=3, warmup_rounds=1)
    benchmark.extra_info["images_per_s"] = round(images / benchmark.stats.stats.median, 2)
    benchmark.extra_info["peak_MB"] = round(peak_memory_bytes(call) / 2**20, 1)
    benchmark.extra_info["provider"] = provider


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", [1, 8])
def test_base_inference(benchmark, provider, batch):
    model = model_for(provider, lldif_base()).eval()
    forward = torch.compile(model, dynamic=False) if provider == "compile" else model
    images = torch.randn(batch, 3, 224, 224, device=DEVICE)

    def call():
        with torch.no_grad():
            out = forward(images)
        if CUDA:
            torch.cuda.synchronize()
        return out

    run(benchmark, provider, call, batch)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_stage2_step(benchmark, provider):
    config, batch = (lldif_base(), 64) if CUDA else (lldif_tiny(), 16)
    model = model_for(provider, config)
    model.freeze_for_stage(2)
    model.train()
    loss_of = torch.compile(model.stage2_loss, dynamic=False) if provider == "compile" else model.stage2_loss
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    size = config.image_size
    data = {"image": torch.randn(batch, 3, size, size, device=DEVICE),
            "label": torch.arange(batch, device=DEVICE) % 7,
            "landmarks": torch.rand(batch, config.dlnet.landmark_points, 2, device=DEVICE) * size,
            "caption_embedding": torch.randn(batch, config.la_clip.text_dim, device=DEVICE)}

    def call():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA):
            loss = loss_of(copy.copy(data)).total
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if CUDA:
            torch.cuda.synchronize()

    run(benchmark, provider, call, batch)
