"""channel_attention: every backend against the float64 reference, gradients, the packed variant, the module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_compiled_gradients_match, assert_within_tolerance, backend_params, skip_unless_serves
from peers import RestormerAttention

import lldif_kernels
from lldif_kernels import BackendNotSupportedError, reference
from lldif_kernels.nn import TransposedAttention
from lldif_kernels.ops.channel_attention import op_reasons

# The interpreter runs a Triton program in about a millisecond per loop step: keep its problems small.
INTERPRETED = ("triton", "cpu")


def make_inputs(batch, heads, dim, positions, dtype=torch.float32, device="cpu", temperature=None, seed=0):
    """q, k, v (B, heads, d, N) and a (heads, 1, 1) temperature, all leaves."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, dim, positions, generator=gen) for _ in range(3))
    tau = torch.rand(heads, 1, 1, generator=gen) * 2 + 0.5 if temperature is None else temperature
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)] + [
        tau.to(device).requires_grad_()
    ]


def run(fn, inputs, grad_out, **kwargs):
    """Output and the gradients of every input for the cotangent grad_out."""
    out = fn(*inputs, **kwargs)
    return [out, *torch.autograd.grad(out, inputs, grad_out)]


def normalisation_terms(inputs, grad_out):
    """Largest |∂L/∂q̂| / ‖q‖ and |∂L/∂k̂| / ‖k‖ (float64).

    The normalisation backward returns (∂q̂ - q̂ (q̂·∂q̂)) / ‖q‖, a difference of two terms of this size that
    cancel exactly when N = 1, so a kernel's rounding error in dq and dk scales with them.
    """
    q, k, v, tau = (t.detach().double() for t in inputs)
    q_hat, k_hat = F.normalize(q, dim=-1).requires_grad_(), F.normalize(k, dim=-1).requires_grad_()
    attention = ((q_hat @ k_hat.transpose(-2, -1)) * tau.reshape(-1, 1, 1)).softmax(-1)
    dq_hat, dk_hat = torch.autograd.grad(attention @ v, (q_hat, k_hat), grad_out.double())
    norms = (q.norm(dim=-1, keepdim=True).clamp(min=1e-12), k.norm(dim=-1, keepdim=True).clamp(min=1e-12))
    return [(g / n).abs().max().item() if g.numel() else 0.0 for g, n in zip((dq_hat, dk_hat), norms, strict=True)]


def check_against_reference(backend, device, shape, dtype=torch.float32, inputs=None):
    """Compares output and gradients with the float64 reference; returns (fused, exact).

    Elements whose exact value overflows the dtype are left out of the comparison and must be inf.
    """
    skip_unless_serves(backend, device, dtype)
    inputs = inputs or make_inputs(*shape, dtype, device)
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    fused = run(lldif_kernels.channel_attention, inputs, grad_out, backend=backend)
    eager = run(reference.channel_attention, inputs, grad_out)
    exact = run(reference.channel_attention, [t.detach().double().requires_grad_() for t in inputs],
                grad_out.double())
    term_scales = [0.0, *normalisation_terms(inputs, grad_out), 0.0, 0.0]
    for name, out, exact_t, eager_t, term_scale in zip(["out", "dq", "dk", "dv", "dtemperature"], fused, exact,
                                                       eager, term_scales, strict=True):
        representable = exact_t.to(out.dtype).isfinite()
        assert not out[~representable].isfinite().any(), f"{name}: finite where the exact value overflows"
        assert_within_tolerance(name, out[representable], exact_t[representable], eager_t[representable],
                                term_scale)
    return fused, exact


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("dim", [1, 16, 48, 96])
@pytest.mark.parametrize("positions", [1, 49, 196])
@pytest.mark.parametrize("heads", [1, 2, 8])
def test_matches_reference_fp32(backend, device, dim, positions, heads):
    if (backend, device) == INTERPRETED and heads * dim * positions > 2 * 48 * 196:
        pytest.skip("too slow for the Triton interpreter")
    check_against_reference(backend, device, (1, heads, dim, positions))


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [16, 48])
def test_matches_reference_half(backend, device, dtype, dim):
    check_against_reference(backend, device, (2, 2, dim, 196), dtype)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dim", [16, 32, 48, 64, 96, 128])
def test_every_dtype_and_head_dim_cover(backend, device, dtype, dim):
    """Each dtype at each head-dim size the CUDA kernels are instantiated for (d <= 16, 32, 48, 64, 96, 128)."""
    if (backend, device) == INTERPRETED and dim > 48:
        pytest.skip("too slow for the Triton interpreter")
    check_against_reference(backend, device, (1, 2, dim, 33), dtype)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("batch", [0, 1, 4])
def test_batch_sizes(backend, device, batch):
    check_against_reference(backend, device, (batch, 2, 16, 49))


@pytest.mark.parametrize(("backend", "device"), [p for p in backend_params() if p.values != INTERPRETED])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_resolution(backend, device, dtype):
    """LLDif's level 1: one head of 48 channels over 112² positions (many splits of N)."""
    check_against_reference(backend, device, (1, 1, 48, 112 * 112), dtype)


@pytest.mark.parametrize("shape", [(8, 1, 48, 112 * 112), (8, 8, 48, 14 * 14), (1, 1, 96, 112 * 112)])
def test_model_sizes_cpp(shape):
    check_against_reference("cpp", "cpu", shape)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [1, 2])
def test_packed_qkv_matches_restormer_split(backend, device, dtype, heads):
    skip_unless_serves(backend, device, dtype)
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 3 * 32, 7, 9, generator=gen).to(device, dtype).requires_grad_()
    temperature = (torch.rand(heads, 1, 1, generator=gen) + 0.5).to(device).requires_grad_()
    grad_out = torch.randn(2, 32, 7, 9, generator=gen).to(device, dtype)
    fused = run(lldif_kernels.channel_attention_qkv, [qkv, temperature], grad_out, heads=heads, backend=backend)
    eager = run(reference.channel_attention_qkv, [qkv, temperature], grad_out, heads=heads)
    exact = run(reference.channel_attention_qkv, [qkv.detach().double().requires_grad_(),
                                                  temperature.detach().double().requires_grad_()],
                grad_out.double(), heads=heads)
    for name, out, exact_t, eager_t in zip(["out", "dqkv", "dtemperature"], fused, exact, eager, strict=True):
        assert_within_tolerance(name, out, exact_t, eager_t)
    assert fused[0].is_contiguous() and fused[1].is_contiguous()


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_strided_views_and_channels_last(backend, device):
    """q, k, v as views of one tensor with different strides, and a channels_last packed qkv."""
    skip_unless_serves(backend, device)
    base = torch.randn(2, 3, 16, 64, device=device)
    q, k, v = (base[:, :, :, :49], base[:, :, ::2, :].repeat(1, 1, 2, 1)[..., 3:52], base[:, :, :, 5:54])
    inputs = [t.detach().requires_grad_() for t in (q, k, v)] + [torch.rand(3, device=device).requires_grad_()]
    check_against_reference(backend, device, None, inputs=inputs)
    qkv = torch.randn(2, 48, 5, 5, device=device).contiguous(memory_format=torch.channels_last)
    temperature = torch.ones(2, device=device)
    torch.testing.assert_close(lldif_kernels.channel_attention_qkv(qkv, temperature, 2, backend=backend),
                               reference.channel_attention_qkv(qkv, temperature, 2), rtol=1e-5, atol=1e-5)


# A zero channel's exact dq is about 1/1e-12, past float16: the interpreter's numpy cast to inf warns.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["zero_channel", "large", "tau_0", "tau_50"])
def test_extreme_inputs_stay_finite(backend, device, dtype, case):
    skip_unless_serves(backend, device, dtype)
    temperature = {"tau_0": torch.zeros(2), "tau_50": torch.full((2,), 50.0)}.get(case)
    inputs = make_inputs(1, 2, 16, 49, torch.float32, temperature=temperature)
    with torch.no_grad():
        if case == "zero_channel":  # F.normalize's clamp: q̂ = 0 for that row, k̂ too
            inputs[0][0, 0, 3].zero_()
            inputs[1][0, 1, 5].zero_()
        if case == "large":
            for t in inputs[:3]:
                t.mul_(1e4 if dtype == torch.float32 else 200.0)
    inputs = [t.detach().to(device, dtype if i < 3 else torch.float32).requires_grad_() for i, t in enumerate(inputs)]
    fused, exact = check_against_reference(backend, device, None, dtype, inputs)
    for out, want in zip(fused, exact, strict=True):
        assert out[want.to(out.dtype).isfinite()].isfinite().all()


# The interpreter's numpy softmax of the NaN row warns; the kernel's result is what is checked.
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_nan_stays_in_its_row(backend, device):
    """A NaN in row i of q makes that row's norm, cosine row and output row NaN, as F.normalize does (its clamp
    keeps a NaN); every other row stays finite."""
    skip_unless_serves(backend, device)
    q, k, v, tau = (t.detach() for t in make_inputs(1, 2, 8, 49, device=device))
    q[0, 1, 3, 5] = float("nan")
    out, cosine, q_norm, k_norm = torch.ops.lldif_kernels.channel_attention.default(q, k, v, tau.reshape(2), backend)
    nan_row = torch.zeros_like(out, dtype=torch.bool)
    nan_row[0, 1, 3] = True
    assert out[nan_row].isnan().all() and out[~nan_row].isfinite().all()
    assert cosine[0, 1, 3].isnan().all() and q_norm[0, 1, 3].isnan()
    assert q_norm.isnan().sum() == 1 and k_norm.isfinite().all()


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("packed", [False, True])
def test_gradcheck_float64(backend, device, packed):
    skip_unless_serves(backend, device, torch.float64)
    if packed:
        qkv = torch.randn(2, 12, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
        temperature = torch.rand(2, 1, 1, dtype=torch.float64, device=device, requires_grad=True)
        inputs, fn = (qkv, temperature), lambda *t: lldif_kernels.channel_attention_qkv(*t, 2, backend=backend)
    else:
        inputs = make_inputs(2, 2, 3, 5, torch.float64, device)
        inputs[3] = inputs[3].detach().double().requires_grad_()
        fn = lambda *t: lldif_kernels.channel_attention(*t, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_backward_is_bitwise_repeatable(backend, device):
    skip_unless_serves(backend, device)
    positions = 196 if (backend, device) == INTERPRETED else 5000
    inputs = make_inputs(2, 2, 48, positions, device=device)
    grad_out = torch.randn_like(inputs[0])
    first = run(lldif_kernels.channel_attention, inputs, grad_out, backend=backend)
    second = run(lldif_kernels.channel_attention, inputs, grad_out, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_opcheck(backend, device):
    skip_unless_serves(backend, device)
    q, k, v, tau = (t.detach() for t in make_inputs(2, 2, 5, 7, device=device))
    tau = tau.reshape(2)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), tau.requires_grad_(), backend)
    torch.library.opcheck(torch.ops.lldif_kernels.channel_attention.default, args)
    qkv = torch.randn(2, 30, 2, 3, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.lldif_kernels.channel_attention_qkv.default, (qkv, tau, 2, backend))
    out, cosine, q_norm, k_norm = torch.ops.lldif_kernels.channel_attention.default(*args)
    grad = torch.randn_like(out)
    torch.library.opcheck(torch.ops.lldif_kernels.channel_attention_backward.default,
                          (grad, q.detach(), k.detach(), v.detach(), tau.detach(), cosine, q_norm, k_norm, backend))
    if backend in ("cpp", "cuda"):
        torch.library.opcheck(torch.ops.lldif_native.channel_attention_fwd.default,
                              (q.detach(), k.detach(), v.detach(), tau.detach()))


@pytest.mark.parametrize("packed", [False, True])
def test_torch_compile_fullgraph(packed):
    skip_unless_serves("cpp", "cpu")
    torch.manual_seed(0)
    layer = TransposedAttention(16, 2)
    x = torch.randn(2, 16, 5, 5, requires_grad=True)
    q, k, v, tau = make_inputs(2, 2, 8, 25)

    def step(*tensors):
        out = layer(tensors[0]) if packed else lldif_kernels.channel_attention(*tensors)
        return out.square().sum()

    inputs = [x] if packed else [q, k, v, tau]
    assert_compiled_gradients_match(step, inputs)


def bad_calls():
    x = torch.randn(2, 2, 4, 9)
    t = torch.ones(2)
    return [
        ("q", ValueError, (torch.randn(2, 4, 9), x, x, t)),
        ("q", TypeError, (x.long(), x, x, t)),
        ("q", ValueError, (torch.randn(2, 2, 0, 9), torch.randn(2, 2, 0, 9), torch.randn(2, 2, 0, 9), t)),
        ("k", ValueError, (x, torch.randn(2, 2, 4, 8), x, t)),
        ("v", TypeError, (x, x, x.double(), t)),
        ("k", ValueError, (x, x.to("meta"), x, t)),
        ("temperature", ValueError, (x, x, x, torch.ones(3))),
        ("temperature", ValueError, (x, x, x, torch.ones(2, 1))),
        ("temperature", TypeError, (x, x, x, [1.0, 1.0])),
    ]


@pytest.mark.parametrize(("argument", "error", "args"), bad_calls())
def test_bad_inputs_name_the_argument(argument, error, args):
    with pytest.raises(error, match=rf"\b{argument}\b"):
        lldif_kernels.channel_attention(*args)


@pytest.mark.parametrize(("argument", "args"), [
    ("heads", (torch.randn(1, 12, 2, 2), torch.ones(1), 0)),
    ("heads", (torch.randn(1, 12, 2, 2), torch.ones(1), 1.0)),
    ("qkv", (torch.randn(1, 12, 2, 2), torch.ones(3), 3)),
    ("qkv", (torch.randn(1, 13, 2, 2), torch.ones(1), 1)),
    ("temperature", (torch.randn(1, 12, 2, 2), torch.ones(1), 2)),
])
def test_bad_packed_inputs_name_the_argument(argument, args):
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        lldif_kernels.channel_attention_qkv(*args)


def test_explicit_backend_that_cannot_serve_lists_its_reasons():
    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(BackendNotSupportedError, match="serves CUDA tensors"):
        lldif_kernels.channel_attention(q, q, q, torch.ones(1), backend="cuda")


@pytest.mark.parametrize("call", ["positional", "keywords"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("dim", "heads"), [(48, 1), (96, 2)])
def test_module_loads_restormer_state_dict_and_matches(call, bias, dim, heads):
    """Built with Restormer's own constructor call, positional or with its keywords."""
    torch.manual_seed(0)
    args, kwargs = ((dim, heads, bias), {}) if call == "positional" else ((), {"dim": dim, "num_heads": heads,
                                                                               "bias": bias})
    restormer = RestormerAttention(*args, **kwargs)
    with torch.no_grad():
        restormer.temperature.uniform_(0.5, 2.0)
    ours = TransposedAttention(*args, **kwargs)
    ours.load_state_dict(restormer.state_dict(), strict=True)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in restormer.state_dict().items()}
    x = torch.randn(2, dim, 9, 11)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_theirs = ours(x_ours), restormer(x_theirs)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out_ours)
    out_ours.backward(grad)
    out_theirs.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-4, atol=1e-5)
    for (name, p_ours), p_theirs in zip(ours.named_parameters(), restormer.parameters(), strict=True):
        torch.testing.assert_close(p_ours.grad, p_theirs.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_module_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="multiple of heads"):
        TransposedAttention(10, 3)


def test_module_head_count_arguments():
    assert TransposedAttention(16, heads=2, num_heads=2).heads == 2
    with pytest.raises(ValueError, match=r"heads=2 and num_heads=4"):
        TransposedAttention(16, 2, num_heads=4)
    with pytest.raises(TypeError, match="heads"):
        TransposedAttention(16)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_head_dim_limits_are_reasons_not_crashes(backend):
    reasons = op_reasons(backend, 1, 1, 129, 4)
    assert any("d=129" in reason for reason in reasons)
