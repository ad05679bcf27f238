"""depthwise_conv3x3 (and its GELU gate): every backend against the float64 reference, gradients, registration,
bad inputs, and the feed-forward module built on it."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_compiled_gradients_match, assert_within_tolerance, backend_params, skip_unless_serves

import lldif_kernels
from lldif_kernels import BackendNotSupportedError, reference
from lldif_kernels.nn import GatedDepthwiseFeedForward, TransposedAttention

LAYOUTS = ("nchw", "channels_last")


def make_inputs(batch, channels, height, width, layout, dtype=torch.float32, device="cpu", bias=True, seed=0):
    """[x, weight, bias] as leaves (bias None when not wanted), x in the given layout."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, 1, 3, 3, generator=gen) / 3
    b = torch.randn(channels, generator=gen) if bias else None
    return [t if t is None else t.to(device=device, dtype=dtype).requires_grad_() for t in (x, weight, b)]


def run(fn, inputs, grad_out, gate, **kwargs):
    """Output and the gradients of every tensor input for the cotangent grad_out."""
    y = fn(*inputs, gate=gate, **kwargs)
    leaves = [t for t in inputs if t is not None]
    return [y, *torch.autograd.grad(y, leaves, grad_out)]


def output_memory_format(layout):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def check_against_reference(backend, device, shape, layout, dtype, gate, bias=True):
    skip_unless_serves(backend, device, dtype)
    inputs = make_inputs(*shape, layout, dtype, device, bias)
    batch, channels, height, width = shape
    out_shape = (batch, channels // 2 if gate else channels, height, width)
    grad_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    fused = run(lldif_kernels.depthwise_conv3x3, inputs, grad_out, gate, backend=backend)
    eager = run(reference.depthwise_conv3x3, inputs, grad_out, gate)
    inputs64 = [t if t is None else t.detach().double().requires_grad_() for t in inputs]
    exact = run(reference.depthwise_conv3x3, inputs64, grad_out.double(), gate)
    for name, out, exact_t, eager_t in zip(["y", "dx", "dweight", "dbias"], fused, exact, eager, strict=False):
        assert_within_tolerance(name, out, exact_t, eager_t)
    assert fused[0].is_contiguous(memory_format=output_memory_format(layout)), "the output must keep x's layout"
    assert fused[1].is_contiguous(memory_format=output_memory_format(layout)), "dx must keep x's layout"


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("shape", [(2, 6, 7, 7), (1, 2, 1, 1), (1, 4, 1, 9), (2, 10, 5, 3)])
def test_matches_reference_fp32(backend, device, layout, gate, shape):
    check_against_reference(backend, device, shape, layout, torch.float32, gate)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("gate", [False, True])
def test_matches_reference_other_dtypes(backend, device, dtype, layout, gate):
    check_against_reference(backend, device, (2, 6, 7, 5), layout, dtype, gate)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("gate", [False, True])
def test_without_bias(backend, device, gate):
    check_against_reference(backend, device, (2, 6, 5, 5), "nchw", torch.float32, gate, bias=False)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_several_tiles(backend, device, layout):
    """Images larger than one tile of the GPU kernels, with ragged edges."""
    check_against_reference(backend, device, (1, 4, 37, 35), layout, torch.float32, gate=True)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("batch", [0, 3])
def test_batch_sizes(backend, device, batch):
    check_against_reference(backend, device, (batch, 4, 5, 5), "nchw", torch.float32, gate=True)


@pytest.mark.parametrize("shape", [(16, 84, 64, 64), (2, 340, 16, 16), (1, 96, 112, 112)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_sizes_cpp(shape, layout, dtype):
    check_against_reference("cpp", "cpu", shape, layout, dtype, gate=True)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("gate", [False, True])
def test_gradcheck_float64(backend, device, layout, gate):
    skip_unless_serves(backend, device, torch.float64)
    inputs = make_inputs(2, 4, 3, 4, layout, torch.float64, device)

    def fn(*tensors):
        return lldif_kernels.depthwise_conv3x3(*tensors, gate=gate, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_is_bitwise_repeatable(backend, device, layout):
    skip_unless_serves(backend, device)
    inputs = make_inputs(3, 8, 19, 17, layout, device=device)
    grad_out = torch.randn(3, 4, 19, 17, device=device)
    first = run(lldif_kernels.depthwise_conv3x3, inputs, grad_out, True, backend=backend)
    second = run(lldif_kernels.depthwise_conv3x3, inputs, grad_out, True, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_nan_stays_in_its_neighbourhood(backend, device):
    skip_unless_serves(backend, device)
    x, weight, bias = (t.detach() for t in make_inputs(1, 4, 6, 6, "nchw", device=device))
    x[0, 0, 2, 3] = float("nan")
    y = lldif_kernels.depthwise_conv3x3(x, weight, bias, gate=True, backend=backend)
    bad = torch.zeros(1, 2, 6, 6, dtype=torch.bool, device=device)
    bad[0, 0, 1:4, 2:5] = True  # the gate channel's 3x3 neighbourhood; the value channel is clean
    assert y[bad].isnan().all()
    assert y[~bad].isfinite().all()


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_awkward_strides(backend, device):
    """A sliced x, a weight in another dtype, and the stride-0 gradient that `sum().backward()` sends."""
    skip_unless_serves(backend, device)
    base = torch.randn(2, 12, 9, 9, device=device)
    x = base[:, ::2, 1:8, :].detach().requires_grad_()
    weight = torch.randn(6, 1, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    outs = []
    for fn in (functools.partial(lldif_kernels.depthwise_conv3x3, backend=backend), reference.depthwise_conv3x3):
        y = fn(x, weight, None, True)
        outs.append([y, *torch.autograd.grad(y.sum(), (x, weight))])
    for fused, eager in zip(*outs, strict=True):
        assert fused.dtype == eager.dtype
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_opcheck(backend, device):
    skip_unless_serves(backend, device)
    x, weight, bias = (t.detach() for t in make_inputs(2, 4, 3, 5, "nchw", device=device))
    for layout_x in (x, x.contiguous(memory_format=torch.channels_last)):
        for gate, b in ((False, bias), (True, None)):
            args = (layout_x.requires_grad_(), weight.requires_grad_(), b, gate, backend)
            torch.library.opcheck(torch.ops.lldif_kernels.depthwise_conv3x3.default, args)
            grad = torch.randn(2, 2 if gate else 4, 3, 5, device=device)
            torch.library.opcheck(torch.ops.lldif_kernels.depthwise_conv3x3_backward.default,
                                  (grad, layout_x.detach(), weight.detach(), b, gate, backend))
            if backend in ("cpp", "cuda"):
                torch.library.opcheck(torch.ops.lldif_native.depthwise_conv3x3_fwd.default,
                                      (layout_x.detach(), weight.detach(), b, gate))
                torch.library.opcheck(torch.ops.lldif_native.depthwise_conv3x3_bwd.default,
                                      (grad, layout_x.detach(), weight.detach(), b, gate))


def test_torch_compile_fullgraph():
    skip_unless_serves("cpp", "cpu")
    inputs = make_inputs(2, 8, 7, 7, "nchw")

    def step(x, weight, bias):
        return lldif_kernels.depthwise_conv3x3(x, weight, bias, gate=True).square().sum()

    assert_compiled_gradients_match(step, inputs)


def bad_calls():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(4, 1, 3, 3)
    return [
        ("x", ValueError, (torch.randn(4, 5, 5), w), {}),
        ("x", TypeError, (torch.ones(2, 4, 5, 5, dtype=torch.int64), w), {}),
        ("weight", ValueError, (x, torch.randn(4, 1, 5, 5)), {}),
        ("weight", ValueError, (x, torch.randn(3, 1, 3, 3)), {}),
        ("weight", TypeError, (x, w.int()), {}),
        ("weight", ValueError, (x, w.to("meta")), {}),
        ("bias", ValueError, (x, w, torch.randn(5)), {}),
        ("gate", ValueError, (torch.randn(2, 3, 5, 5), torch.randn(3, 1, 3, 3)), {"gate": True}),
        ("gate", TypeError, (x, w), {"gate": 1}),
        ("backend", ValueError, (x, w), {"backend": "fortran"}),
    ]


@pytest.mark.parametrize(("argument", "error", "args", "kwargs"), bad_calls())
def test_bad_inputs_name_the_argument(argument, error, args, kwargs):
    with pytest.raises(error, match=rf"\b{argument}\b"):
        lldif_kernels.depthwise_conv3x3(*args, **kwargs)


def test_explicit_backend_that_cannot_serve_lists_its_reasons():
    x, w = torch.randn(1, 4, 3, 3), torch.randn(4, 1, 3, 3)
    with pytest.raises(BackendNotSupportedError, match="serves CUDA tensors"):
        lldif_kernels.depthwise_conv3x3(x, w, backend="cuda")


# --- the modules built on it ---------------------------------------------------------------------------------------


def restormer_feed_forward(module, x):
    """Restormer's FeedForward.forward, written out on the module's parameters."""
    def conv(layer, y):
        return F.conv2d(y, layer.weight, layer.bias, padding=layer.padding, groups=layer.groups)

    gate, value = conv(module.dwconv, conv(module.project_in, x)).chunk(2, dim=1)
    return conv(module.project_out, F.gelu(gate) * value)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_feed_forward_matches_restormer_on_every_gradient(backend, device, bias, layout):
    skip_unless_serves(backend, device)
    torch.manual_seed(0)
    module = GatedDepthwiseFeedForward(8, 2.66, bias=bias, backend=backend).to(device)
    x = torch.randn(2, 8, 6, 5, device=device).contiguous(memory_format=output_memory_format(layout))
    x.requires_grad_()
    params = list(module.parameters())
    fused = module(x)
    got = [fused, *torch.autograd.grad(fused.square().sum(), [x, *params])]
    eager = restormer_feed_forward(module, x)
    want = [eager, *torch.autograd.grad(eager.square().sum(), [x, *params])]
    for out, expected in zip(got, want, strict=True):
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_modules_keep_restormer_parameter_names():
    ffn = GatedDepthwiseFeedForward(48, 2.66, bias=False)
    assert {name: tuple(p.shape) for name, p in ffn.state_dict().items()} == {
        "project_in.weight": (254, 48, 1, 1), "dwconv.weight": (254, 1, 3, 3), "project_out.weight": (48, 127, 1, 1)}
    attention = TransposedAttention(48, 2, bias=True)
    assert set(attention.state_dict()) == {"temperature", "qkv.weight", "qkv.bias", "qkv_dwconv.weight",
                                           "qkv_dwconv.bias", "project_out.weight", "project_out.bias"}
    restored = GatedDepthwiseFeedForward(48, 2.66, bias=False)
    restored.load_state_dict(ffn.state_dict(), strict=True)


def test_feed_forward_rejects_an_empty_hidden_width():
    with pytest.raises(ValueError, match="ffn_expansion"):
        GatedDepthwiseFeedForward(1, 0.5)
