"""modulated_layer_norm: every backend against the float64 reference, gradients, registration, bad inputs."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_compiled_gradients_match, assert_within_tolerance, backend_params, skip_unless_serves

import lldif_kernels
from lldif_kernels import BackendNotSupportedError, reference, use_backend
from lldif_kernels.nn import ModulatedLayerNorm

LAYOUTS = ("nchw", "channels_last", "tokens")


def make_inputs(batch, channels, height, width, layout, dtype=torch.float32, device="cpu", bias_free=False, seed=0):
    """x in the given layout plus scale, shift, weight, bias (bias None when bias_free), all leaves."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=gen) * 2 + 0.5
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "tokens":
        x = x.flatten(2).transpose(1, 2).contiguous()
    params = [torch.randn(batch, channels, generator=gen), torch.randn(batch, channels, generator=gen),
              torch.randn(channels, generator=gen), None if bias_free else torch.randn(channels, generator=gen)]
    return [t if t is None else t.to(device=device, dtype=dtype).requires_grad_() for t in [x.to(device), *params]]


def dense_layouts(t):
    """The memory formats t is dense in (strides of size-1 dimensions do not matter)."""
    formats = [torch.contiguous_format] + ([torch.channels_last] if t.dim() == 4 else [])
    return [t.is_contiguous(memory_format=f) for f in formats]


def run(fn, inputs, grad_out, bias_free, **kwargs):
    """Output and the gradients of every tensor input for the cotangent grad_out."""
    y = fn(*inputs, bias_free=bias_free, **kwargs)
    leaves = [t for t in inputs if t is not None]
    return [y, *torch.autograd.grad(y, leaves, grad_out)]


def check_against_reference(backend, device, shape, layout, dtype, bias_free=False):
    skip_unless_serves(backend, device, dtype)
    inputs = make_inputs(*shape, layout, dtype, device, bias_free)
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    fused = run(lldif_kernels.modulated_layer_norm, inputs, grad_out, bias_free, backend=backend)
    eager = run(reference.modulated_layer_norm, inputs, grad_out, bias_free)
    inputs64 = [t if t is None else t.detach().double().requires_grad_() for t in inputs]
    exact = run(reference.modulated_layer_norm, inputs64, grad_out.double(), bias_free)
    names = ["y", "dx", "dscale", "dshift", "dweight", "dbias"]
    for name, out, exact_t, eager_t in zip(names, fused, exact, eager, strict=False):
        assert_within_tolerance(name, out, exact_t, eager_t)
    assert dense_layouts(fused[0]) == dense_layouts(inputs[0]), "the output must keep x's layout"


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("channels", [1, 3, 48, 127, 384])
@pytest.mark.parametrize("hw", [(1, 1), (7, 7)])
def test_matches_reference_fp32(backend, device, layout, channels, hw):
    check_against_reference(backend, device, (2, channels, *hw), layout, torch.float32)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("channels", [48, 127])
def test_matches_reference_half(backend, device, dtype, layout, channels):
    check_against_reference(backend, device, (2, channels, 7, 7), layout, dtype)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_full_resolution(backend, device, layout, dtype):
    check_against_reference(backend, device, (1, 48, 112, 112), layout, dtype)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bias_free(backend, device, layout):
    check_against_reference(backend, device, (2, 48, 7, 7), layout, torch.float32, bias_free=True)


@pytest.mark.filterwarnings("ignore:var\\(\\)")  # the reference's var() of an empty batch
@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("batch", [0, 8])
def test_batch_sizes(backend, device, batch):
    check_against_reference(backend, device, (batch, 48, 7, 7), "nchw", torch.float32)


@pytest.mark.parametrize("shape", [(8, 48, 112, 112), (1, 384, 112, 112), (8, 384, 14, 14)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_model_sizes_cpp(shape, layout):
    check_against_reference("cpp", "cpu", shape, layout, torch.float32)


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_without_affine(backend, device):
    skip_unless_serves(backend, device)
    x, scale, shift, _, _ = make_inputs(2, 5, 3, 3, "nchw", device=device)
    grad_out = torch.randn_like(x)
    fused = run(lldif_kernels.modulated_layer_norm, [x, scale, shift], grad_out, False, backend=backend)
    exact = run(reference.modulated_layer_norm, [t.detach().double().requires_grad_() for t in (x, scale, shift)],
                grad_out.double(), False)
    for out, want in zip(fused, exact, strict=True):
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias_free", [False, True])
def test_gradcheck_float64(backend, device, layout, bias_free):
    skip_unless_serves(backend, device, torch.float64)
    inputs = [t for t in make_inputs(2, 3, 2, 3, layout, torch.float64, device, bias_free) if t is not None]

    def fn(*tensors):
        return lldif_kernels.modulated_layer_norm(*tensors, bias_free=bias_free, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_backward_is_bitwise_repeatable(backend, device):
    skip_unless_serves(backend, device)
    inputs = make_inputs(2, 48, 28, 28, "nchw", device=device)
    grad_out = torch.randn_like(inputs[0])
    first = run(lldif_kernels.modulated_layer_norm, inputs, grad_out, False, backend=backend)
    second = run(lldif_kernels.modulated_layer_norm, inputs, grad_out, False, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_stays_in_its_row(backend, device, layout):
    skip_unless_serves(backend, device)
    x, scale, shift, weight, bias = (t.detach() for t in make_inputs(1, 6, 3, 3, layout, device=device))
    if layout == "tokens":
        x[0, 4, 2] = float("nan")
        bad = torch.zeros(1, 9, 6, dtype=torch.bool, device=device)
        bad[0, 4] = True
    else:
        x[0, 2, 1, 1] = float("nan")
        bad = torch.zeros(1, 6, 3, 3, dtype=torch.bool, device=device)
        bad[0, :, 1, 1] = True
    y = lldif_kernels.modulated_layer_norm(x, scale, shift, weight, bias, backend=backend)
    assert y[bad].isnan().all()
    assert y[~bad].isfinite().all()


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_awkward_strides(backend, device):
    """A sliced x, an expanded scale, and the stride-0 gradient that `sum().backward()` sends."""
    skip_unless_serves(backend, device)
    base = torch.randn(2, 10, 9, 9, device=device)
    x = base[:, ::2, 1:8, :].detach().requires_grad_()
    scale_row = torch.randn(1, 5, device=device, requires_grad=True)
    shift = torch.randn(2, 5, device=device, requires_grad=True)
    outs = []
    fused_op = functools.partial(lldif_kernels.modulated_layer_norm, backend=backend)
    for fn in (fused_op, reference.modulated_layer_norm):
        y = fn(x, scale_row.expand(2, 5), shift)
        outs.append([y, *torch.autograd.grad(y.sum(), (x, scale_row, shift))])
    for fused, eager in zip(*outs, strict=True):
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_opcheck(backend, device):
    skip_unless_serves(backend, device)
    x, scale, shift, weight, bias = (t.detach() for t in make_inputs(2, 5, 3, 4, "nchw", device=device))
    a, e = (scale * weight).contiguous(), (shift + scale * bias).contiguous()
    for layout_x in (x, x.contiguous(memory_format=torch.channels_last), x.flatten(2).transpose(1, 2).contiguous()):
        for bias_free in (False, True):
            args = (layout_x.requires_grad_(), a.requires_grad_(), e.requires_grad_(), 1e-5, bias_free, backend)
            torch.library.opcheck(torch.ops.lldif_kernels.modulated_layer_norm.default, args)
            grad = torch.randn_like(layout_x)
            torch.library.opcheck(torch.ops.lldif_kernels.modulated_layer_norm_backward.default,
                                  (grad, layout_x.detach(), a.detach(), 1e-5, bias_free, backend))
            if backend in ("cpp", "cuda"):
                torch.library.opcheck(torch.ops.lldif_native.modulated_layer_norm_fwd.default,
                                      (layout_x.detach(), a.detach(), e.detach(), 1e-5, bias_free))


def test_torch_compile_fullgraph():
    skip_unless_serves("cpp", "cpu")
    inputs = make_inputs(2, 48, 7, 7, "nchw")

    def step(x, scale, shift, weight, bias):
        return lldif_kernels.modulated_layer_norm(x, scale, shift, weight, bias).square().sum()

    assert_compiled_gradients_match(step, inputs)


def bad_calls():
    x = torch.randn(2, 4, 3, 3)
    s = torch.randn(2, 4)
    return [
        ("x", ValueError, (torch.randn(2, 4), s, s), {}),
        ("x", TypeError, (torch.ones(2, 4, 3, 3, dtype=torch.int64), s, s), {}),
        ("scale", ValueError, (x, torch.randn(2, 5), s), {}),
        ("scale", ValueError, (x, torch.randn(3, 4), s), {}),
        ("shift", ValueError, (x, s, torch.randn(2, 4, 1)), {}),
        ("shift", TypeError, (x, s, torch.ones(2, 4, dtype=torch.int32)), {}),
        ("weight", ValueError, (x, s, s, torch.randn(5)), {}),
        ("bias", ValueError, (x, s, s, None, torch.randn(4)), {"bias_free": True}),
        ("scale", ValueError, (x, s.to("meta"), s), {}),
        ("eps", ValueError, (x, s, s), {"eps": 0.0}),
        ("eps", ValueError, (x, s, s), {"eps": -1e-5}),
        ("backend", ValueError, (x, s, s), {"backend": "fortran"}),
    ]


@pytest.mark.parametrize(("argument", "error", "args", "kwargs"), bad_calls())
def test_bad_inputs_name_the_argument(argument, error, args, kwargs):
    with pytest.raises(error, match=rf"\b{argument}\b"):
        lldif_kernels.modulated_layer_norm(*args, **kwargs)


def test_explicit_backend_that_cannot_serve_lists_its_reasons():
    x, s = torch.randn(1, 4, 2, 2), torch.randn(1, 4)
    with pytest.raises(BackendNotSupportedError, match="serves CUDA tensors"):
        lldif_kernels.modulated_layer_norm(x, s, s, backend="cuda")


def test_backend_selection_precedence(monkeypatch):
    x, s = torch.randn(1, 4, 2, 2), torch.randn(1, 4)
    select = lldif_kernels.dispatch.select
    assert select("op", None, (x, s), None) == ("cpp" if "cpp" in lldif_kernels.available_backends() else "reference")
    monkeypatch.setenv("LLDIF_BACKEND", "reference")
    assert select("op", None, (x, s), None) == "reference"
    with use_backend("cuda"):
        with pytest.raises(BackendNotSupportedError):
            select("op", None, (x, s), None)
        assert select("op", "reference", (x, s), None) == "reference"
    assert select("op", None, (x, s), None) == "reference"
    monkeypatch.setenv("LLDIF_BACKEND", "nope")
    with pytest.raises(ValueError, match="LLDIF_BACKEND"):
        select("op", None, (x, s), None)


@pytest.mark.parametrize("bias_free", [False, True])
def test_module_matches_diffir_formulation(bias_free):
    torch.manual_seed(0)
    layer = ModulatedLayerNorm(48, prior_dim=256, bias_free=bias_free)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        if layer.bias is not None:
            layer.bias.uniform_(-0.5, 0.5)
    x, z = torch.randn(2, 48, 7, 7), torch.randn(2, 256)
    # DiffIR: LayerNorm(x) in tokens, then x * k_v1 + k_v2 with [k_v1; k_v2] = kernel(z) viewed (B, 2C, 1, 1).
    tokens = x.flatten(2).transpose(1, 2)
    var = tokens.var(-1, keepdim=True, unbiased=False)
    centred = tokens if bias_free else tokens - tokens.mean(-1, keepdim=True)
    normed = centred / torch.sqrt(var + 1e-5) * layer.weight + (0 if layer.bias is None else layer.bias)
    k_v1, k_v2 = layer.kernel(z).view(-1, 96, 1, 1).chunk(2, dim=1)
    expected = normed.transpose(1, 2).reshape(x.shape) * k_v1 + k_v2
    torch.testing.assert_close(layer(x, z), expected, rtol=1e-5, atol=1e-5)
    expected_keys = {"kernel.weight", "weight"} | (set() if bias_free else {"bias"})
    assert set(layer.state_dict()) == expected_keys
    assert layer.kernel.weight.shape == (96, 256)


def test_triton_limits_are_reasons_not_crashes():
    skip_unless_serves("triton", "cpu")
    x, s = torch.randn(1, 5000, 1, 1), torch.randn(1, 5000)
    with pytest.raises(BackendNotSupportedError, match="C=5000 exceeds the Triton kernel's limit"):
        lldif_kernels.modulated_layer_norm(x, s, s, backend="triton")


# --- the AdaLN-Zero modulation of the module: (1 + s) * LayerNorm(x) + h ------------------------------------------


def adaln_layer(channels, prior_dim, bias_free, backend, seed=0):
    """An adaln module moved off its zero-kernel, ones/zeros initialisation so every parameter matters."""
    torch.manual_seed(seed)
    layer = ModulatedLayerNorm(channels, prior_dim, bias_free=bias_free, backend=backend, modulation="adaln")
    with torch.no_grad():
        layer.kernel.weight.normal_(0, 0.5)
        layer.weight.uniform_(0.5, 1.5)
        if layer.bias is not None:
            layer.bias.uniform_(-0.5, 0.5)
    return layer


def parameters(layer):
    """kernel.weight, weight and (unless bias_free) bias, in that order."""
    return [t for t in (layer.kernel.weight, layer.weight, layer.bias) if t is not None]


def adaln_float64(layer, x, z, tokens):
    """(1 + s) * LN(x) + h in float64 from the layer's parameters, channels last when `tokens`; returns the output
    and the float64 leaves [x, z, kernel.weight, weight, (bias)]."""
    leaves = [t.detach().double().requires_grad_() for t in (x, z, *parameters(layer))]
    x64, z64, kernel, weight = leaves[:4]
    bias = leaves[4] if len(leaves) == 5 else None
    channels = x64 if tokens else x64.movedim(1, -1)
    mean = channels.mean(-1, keepdim=True)
    var = channels.var(-1, keepdim=True, unbiased=False)
    centred = channels if bias is None else channels - mean
    normed = centred / torch.sqrt(var + layer.eps) * weight + (0 if bias is None else bias)
    s, h = (z64 @ kernel.T).chunk(2, dim=1)
    if tokens:
        y = (1 + s[:, None]) * normed + h[:, None]
    else:
        y = ((1 + s[:, None, None]) * normed + h[:, None, None]).movedim(-1, 1)
    return y, leaves


def module_outputs(layer, x, z, grad_out):
    """The module's output and the gradients of x, z and every parameter for the cotangent grad_out."""
    x, z = x.detach().requires_grad_(), z.detach().requires_grad_()
    y = layer(x, z)
    return [y, *torch.autograd.grad(y, [x, z, *parameters(layer)], grad_out)]


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize(("layout", "bias_free"), [("nchw", False), ("nchw", True), ("tokens", False)])
def test_adaln_module_matches_reference_and_float64_on_every_gradient(backend, device, layout, bias_free):
    skip_unless_serves(backend, device)
    fused = adaln_layer(5, 4, bias_free, backend).to(device)
    reference_layer = adaln_layer(5, 4, bias_free, "reference").to(device)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 3, 3, generator=gen) * 2 + 0.5
    if layout == "tokens":
        x = x.flatten(2).transpose(1, 2).contiguous()
    x, z = x.to(device), torch.randn(2, 4, generator=gen).to(device)
    grad_out = torch.randn(x.shape, generator=gen).to(device)
    got = module_outputs(fused, x, z, grad_out)
    eager = module_outputs(reference_layer, x, z, grad_out)
    y64, leaves = adaln_float64(fused, x, z, tokens=layout == "tokens")
    exact = [y64, *torch.autograd.grad(y64, leaves, grad_out.double())]
    names = ["y", "dx", "dz", "dkernel", "dweight", "dbias"][:len(got)]
    assert len(got) == len(eager) == len(exact) == 6 - bias_free
    for name, out, want, eager_t in zip(names, got, exact, eager, strict=True):
        torch.testing.assert_close(out, eager_t, rtol=1e-5, atol=1e-5, msg=name)
        assert_within_tolerance(name, out, want, eager_t)


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("layout", ["nchw", "tokens"])
def test_adaln_module_starts_as_a_plain_layer_norm_whatever_the_prior(backend, layout):
    torch.manual_seed(0)
    layer = ModulatedLayerNorm(6, prior_dim=8, backend=backend, modulation="adaln")
    assert torch.count_nonzero(layer.kernel.weight) == 0
    assert torch.count_nonzero(ModulatedLayerNorm(6, prior_dim=8).kernel.weight) > 0  # diffir keeps Linear's init
    x = torch.randn(3, 6, 4, 5)
    if layout == "tokens":
        x = x.flatten(2).transpose(1, 2).contiguous()
    plain = F.layer_norm(x if layout == "tokens" else x.movedim(1, -1), (6,), layer.weight, layer.bias, layer.eps)
    plain = plain if layout == "tokens" else plain.movedim(-1, 1)
    outputs = [layer(x, z) for z in (torch.zeros(3, 8), torch.randn(3, 8), 1e3 * torch.randn(3, 8))]
    for y in outputs:
        torch.testing.assert_close(y, plain, rtol=1e-5, atol=1e-5)
        assert torch.equal(y, outputs[0])
    # AdaLN-Zero: the zero kernel still gets a gradient, so the prior can start to modulate.
    layer(x, torch.randn(3, 8)).square().sum().backward()
    assert layer.kernel.weight.grad.abs().sum() > 0


def test_diffir_and_adaln_differ_by_the_one_in_the_scale():
    torch.manual_seed(0)
    diffir = ModulatedLayerNorm(6, prior_dim=8)
    adaln = ModulatedLayerNorm(6, prior_dim=8, modulation="adaln")
    adaln.load_state_dict(diffir.state_dict())  # the same parameters, names and shapes
    x, z = torch.randn(2, 6, 3, 3), torch.randn(2, 8)
    plain = ModulatedLayerNorm(6, prior_dim=8, modulation="adaln")
    plain.load_state_dict({**diffir.state_dict(), "kernel.weight": torch.zeros(12, 8)})
    torch.testing.assert_close(adaln(x, z), diffir(x, z) + plain(x, z), rtol=1e-5, atol=1e-5)
    assert "modulation=adaln" in repr(adaln) and "modulation=diffir" in repr(diffir)


def test_bad_modulation_names_the_argument():
    with pytest.raises(ValueError, match=r"\bmodulation\b.*'bogus'"):
        ModulatedLayerNorm(4, prior_dim=8, modulation="bogus")
