"""`lldif kernels`: every backend of the fused ops on a DTNet-sized activation, against the reference."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

import lldif_kernels
from lldif_kernels import dispatch
from lldif_kernels.nn import ModulatedLayerNorm

# DTNet level 1 (SPEC §3.3): 48 channels at 112x112, the largest activation of the model.
BATCH, CHANNELS, SIZE, PRIOR_DIM = 8, 48, 112, 256


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int = 7) -> float:
    """Median wall time of fn after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def run_kernels_check(device: str | None = None) -> None:
    """Print, per backend, the agreement with a float64 reference and the speed against eager PyTorch."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    layer = ModulatedLayerNorm(CHANNELS, PRIOR_DIM).to(device)
    x = torch.randn(BATCH, CHANNELS, SIZE, SIZE, device=device, requires_grad=True)
    z = torch.randn(BATCH, PRIOR_DIM, device=device)
    grad_out = torch.randn_like(x)
    scale, shift = (t.detach().requires_grad_() for t in layer.kernel(z).chunk(2, dim=1))
    inputs = [x, scale, shift, layer.weight, layer.bias]

    def run(backend: str | None, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        y = lldif_kernels.modulated_layer_norm(*tensors, backend=backend)
        return [y, *torch.autograd.grad(y, tensors, grad_out.to(y.dtype))]

    exact = run("reference", [t.detach().double().requires_grad_() for t in inputs])
    print(f"lldif kernels: EPD-modulated LayerNorm (LLDif Eq. 2) on a DTNet level-1 activation, "
          f"x = {tuple(x.shape)} float32 on {device}, prior z = {tuple(z.shape)}")
    print(f"{'backend':<10} {'fwd ms':>9} {'fwd+bwd ms':>11} {'speed-up':>9} {'max|err| y':>11} {'max|err| grads':>15}")
    reference_ms = None
    reasons = dispatch.explain(inputs)
    for backend in dispatch.BACKENDS:
        if reasons[backend]:
            print(f"{backend:<10} declined: " + "; ".join(reasons[backend]))
            continue
        with torch.no_grad():
            fwd_ms = median_ms(lambda b=backend: lldif_kernels.modulated_layer_norm(*inputs, backend=b), device)
        both_ms = median_ms(lambda b=backend: run(b, inputs), device)
        outputs = run(backend, inputs)
        y_err = (outputs[0].double() - exact[0]).abs().max().item()
        grad_err = max((o.double() - e).abs().max().item() for o, e in zip(outputs[1:], exact[1:], strict=True))
        reference_ms = reference_ms or both_ms
        print(f"{backend:<10} {fwd_ms:>9.2f} {both_ms:>11.2f} {reference_ms / both_ms:>8.1f}x "
              f"{y_err:>11.2e} {grad_err:>15.2e}")
    print(f"reference = DiffIR-style eager PyTorch; automatic choice on {device}: "
          f"{dispatch.select('modulated_layer_norm', None, inputs)}")
