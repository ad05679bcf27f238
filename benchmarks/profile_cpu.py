"""Where the time of the tiny stage-2 training step and of base inference at batch 1 goes on the CPU.

    python benchmarks/profile_cpu.py [--workload stage2|inference|both] [--provider fused|reference]

Runs two warm-up calls, then one call under torch.profiler, and prints the share of each kind of op in the
profiled call's self CPU time, forward and backward apart (an op runs in the backward when the autograd engine
called it). Convolutions are told apart by their weight: 3x3 depth-wise, 1x1, and dense (the rest). The GPU
counterpart is `make profile` (Nsight Systems, with the model's NVTX ranges).
"""

from __future__ import annotations

import argparse
import copy
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from lldif import LLDif, lldif_base, lldif_tiny

CONVOLUTIONS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_slow_conv2d_forward",
                "aten::_slow_conv2d_backward", "aten::thnn_conv2d")
FUSED = {"lldif_native::modulated_layer_norm": "modulated_layer_norm",
         "lldif_native::channel_attention": "channel_attention",
         "lldif_native::window_cross_attention": "window_cross_attention",
         "lldif_native::depthwise_conv3x3": "depthwise_conv3x3 (fused dwconv + gate)"}
ELEMENTWISE = {"aten::mul", "aten::add", "aten::add_", "aten::mul_", "aten::sub", "aten::div", "aten::addcmul_",
               "aten::addcdiv_", "aten::sqrt", "aten::exp", "aten::neg", "aten::rsub", "aten::fill_", "aten::zero_",
               "aten::sigmoid", "aten::silu", "aten::threshold_backward", "aten::relu", "aten::clamp", "aten::where",
               "aten::lerp_", "aten::mul_out", "aten::pow", "aten::sum", "aten::mean", "aten::softmax",
               "aten::_softmax", "aten::_softmax_backward_data", "aten::log_softmax", "aten::_log_softmax",
               "aten::_log_softmax_backward_data", "aten::nll_loss_forward", "aten::nll_loss_backward"}
MOVES = {"aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::pixel_shuffle",
         "aten::pixel_unshuffle", "aten::index", "aten::index_put_", "aten::constant_pad_nd", "aten::gather",
         "aten::grid_sampler_2d", "aten::grid_sampler_2d_backward", "aten::_unsafe_index",
         "aten::upsample_bilinear2d", "aten::upsample_bilinear2d_backward", "aten::empty", "aten::empty_strided",
         "aten::zeros", "aten::new_zeros", "aten::stack", "aten::slice_backward"}


def convolution_kind(name: str, shapes: list) -> str:
    """3x3 depth-wise, 1x1 or dense, from the weight's shape (the 3rd input of a backward, the 2nd of a forward)."""
    weight = shapes[2] if name == "aten::convolution_backward" else shapes[1]
    if len(weight) == 4 and weight[1] == 1 and weight[2:] == [3, 3]:
        return "conv 3x3 depth-wise (stock)"
    if len(weight) == 4 and weight[2:] == [1, 1]:
        return "conv 1x1"
    return "conv dense (3x3 and larger)"


def category(event) -> str:
    name = event.name
    if name in CONVOLUTIONS:
        return convolution_kind(name, event.input_shapes)
    for prefix, label in FUSED.items():
        if name.startswith(prefix):
            return label
    if name in ("aten::gelu", "aten::gelu_backward"):
        return "gelu (stock)"
    if name in ("aten::native_batch_norm", "aten::native_batch_norm_backward", "aten::native_layer_norm",
                "aten::native_layer_norm_backward"):
        return "batch / layer norm (stock)"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul"):
        return "matmul / linear"
    if name.startswith("Optimizer.") or name in ("aten::_foreach_add_", "aten::_foreach_mul_"):
        return "optimizer"
    if name in ELEMENTWISE or name.startswith("aten::_foreach"):
        return "elementwise and reductions"
    if name in MOVES:
        return "copies, cat, reshuffles, allocation"
    return "other"


def in_backward(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("autograd::engine::evaluate_function"):
            return True
        parent = parent.cpu_parent
    return False


def shares(call: Callable[[], object]) -> tuple[dict[tuple[str, str], float], float]:
    """Self CPU milliseconds of one profiled call by (category, pass), and the call's total."""
    for _ in range(2):
        call()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        call()
    totals: dict[tuple[str, str], float] = defaultdict(float)
    for event in prof.events():
        if event.self_cpu_time_total <= 0 or event.name.startswith("autograd::engine"):
            continue
        totals[category(event), "bwd" if in_backward(event) else "fwd"] += event.self_cpu_time_total / 1e3
    return dict(totals), sum(totals.values())


def stage2_step(provider: str) -> Callable[[], None]:
    torch.manual_seed(0)
    config = lldif_tiny()
    model = LLDif(config)
    model.set_label_prompts(torch.randn(config.num_classes, config.la_clip.text_dim))
    model.set_backend(None if provider == "fused" else "reference")
    model.freeze_for_stage(2)
    model.train()
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch, size = 16, config.image_size
    data = {"image": torch.randn(batch, 3, size, size), "label": torch.arange(batch) % config.num_classes,
            "landmarks": torch.rand(batch, config.dlnet.landmark_points, 2) * size,
            "caption_embedding": torch.randn(batch, config.la_clip.text_dim)}

    def call() -> None:
        loss = model.stage2_loss(copy.copy(data)).total
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return call


def base_inference(provider: str) -> Callable[[], object]:
    torch.manual_seed(0)
    config = lldif_base()
    model = LLDif(config).eval()
    model.set_label_prompts(torch.randn(config.num_classes, config.la_clip.text_dim))
    model.set_backend(None if provider == "fused" else "reference")
    image = torch.randn(1, 3, config.image_size, config.image_size)

    def call() -> object:
        with torch.no_grad():
            return model(image)

    return call


def table(title: str, totals: dict[tuple[str, str], float], total: float) -> str:
    lines = [f"{title}: {total:.1f} ms of self CPU time", "", "| op | fwd ms | bwd ms | share |",
             "|---|---:|---:|---:|"]
    by_category: dict[str, dict[str, float]] = defaultdict(lambda: {"fwd": 0.0, "bwd": 0.0})
    for (name, pass_), ms in totals.items():
        by_category[name][pass_] += ms
    for name, passes in sorted(by_category.items(), key=lambda item: -sum(item[1].values())):
        lines.append(f"| {name} | {passes['fwd']:.1f} | {passes['bwd']:.1f} | "
                     f"{100 * sum(passes.values()) / total:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("stage2", "inference", "both"), default="both")
    parser.add_argument("--provider", choices=("fused", "reference"), default="fused",
                        help="fused: the automatic backend (cpp); reference: every fused op on plain PyTorch")
    args = parser.parse_args()
    workloads = {"stage2": ("tiny stage-2 training step, B=16", stage2_step),
                 "inference": ("base inference, batch 1", base_inference)}
    for key in ("stage2", "inference") if args.workload == "both" else (args.workload,):
        title, make = workloads[key]
        print(table(f"{title} ({args.provider})", *shares(make(args.provider))), end="\n\n")


if __name__ == "__main__":
    main()
