"""One stage-2 training step of the base model, bracketed for Nsight Systems' cudaProfilerApi capture range.

    make profile OUT=dir    # nsys profile --capture-range=cudaProfilerApi ... python benchmarks/profile_step.py

Two warm-up steps run first (autotuning, allocator, cuDNN choices), so the capture holds a steady-state step with
the model's NVTX ranges (lldif::dtnet, lldif::dlnet, ..., and every fused op's lldif::<op>:fwd|bwd).
"""

from __future__ import annotations

import argparse

import torch

from lldif import LLDif, lldif_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="images per step (default 64, the paper's)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step: needs a CUDA GPU (Nsight Systems profiles GPU work)")
    torch.manual_seed(0)
    config = lldif_base()
    model = LLDif(config).cuda()
    model.set_label_prompts(torch.randn(config.num_classes, config.la_clip.text_dim, device="cuda"))
    model.freeze_for_stage(2)
    model.train()
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    size = config.image_size
    batch = {"image": torch.randn(args.batch, 3, size, size, device="cuda"),
             "label": torch.arange(args.batch, device="cuda") % config.num_classes,
             "landmarks": None,
             "caption_embedding": torch.randn(args.batch, config.la_clip.text_dim, device="cuda")}

    def train_step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.stage2_loss(batch).total
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    for _ in range(2):
        train_step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    with torch.cuda.nvtx.range("lldif::train_step"):
        train_step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
