"""window_cross_attention: every backend against the float64 reference, gradients, limits, the module."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_compiled_gradients_match, assert_within_tolerance, backend_params, skip_unless_serves
from peers import PosterWindowAttentionGlobal

import lldif_kernels
from lldif_kernels import BackendNotSupportedError, reference
from lldif_kernels.nn import WindowCrossAttention
from lldif_kernels.ops.window_cross_attention import op_reasons

# The interpreter runs a Triton program in about a millisecond per loop step: keep its problems small.
INTERPRETED = ("triton", "cpu")
GRAD_NAMES = ("out", "dq", "dk", "dv", "dtable")


def make_inputs(images, windows_per_image, heads, window_size, dim, dtype=torch.float32, device="cpu", seed=0,
                q_grad=True):
    """q (images, heads, M, d) shared by each image's windows, k, v (images·windows, heads, M, d), a table."""
    gen = torch.Generator().manual_seed(seed)
    tokens, windows = window_size**2, images * windows_per_image
    q = torch.randn(images, heads, tokens, dim, generator=gen)
    k, v = (torch.randn(windows, heads, tokens, dim, generator=gen) for _ in range(2))
    table = torch.randn((2 * window_size - 1) ** 2, heads, generator=gen)
    tensors = [t.to(device, dtype) for t in (q, k, v)] + [table.to(device)]
    return [t.requires_grad_(q_grad or i > 0) for i, t in enumerate(tensors)]


def run(fn, inputs, grad_out, *args, **kwargs):
    """Output and the gradients of every input that requires one (None for the others)."""
    out = fn(*inputs, *args, **kwargs)
    wanted = [t for t in inputs if t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad_out))
    return [out, *(next(grads) if t.requires_grad else None for t in inputs)]


def check_against_reference(backend, device, inputs, window_size, scale=None):
    """Compares output and every gradient with the float64 reference; returns (fused, exact)."""
    skip_unless_serves(backend, device, inputs[1].dtype)
    declined = op_reasons(backend, *inputs[1].shape)
    if declined:
        pytest.skip(f"{backend} declines this shape: " + "; ".join(declined))
    grad_out = torch.randn(inputs[1].shape, generator=torch.Generator().manual_seed(1)).to(device, inputs[1].dtype)
    args = (window_size, scale)
    fused = run(lldif_kernels.window_cross_attention, inputs, grad_out, *args, backend=backend)
    eager = run(reference.window_cross_attention, inputs, grad_out, *args)
    exact = run(reference.window_cross_attention,
                [t.detach().double().requires_grad_(t.requires_grad) for t in inputs], grad_out.double(), *args)
    for name, out, exact_t, eager_t in zip(GRAD_NAMES, fused, exact, eager, strict=True):
        if exact_t is None:
            assert out is None, f"{name} computed although its input needs no gradient"
            continue
        assert out.dtype == eager_t.dtype, name
        assert_within_tolerance(name, out, exact_t, eager_t)
    return fused, exact


def too_slow_for(backend, device, tokens, heads, windows, dim):
    if (backend, device) == INTERPRETED:
        return tokens * heads * windows > 2 * 49 or dim > 32
    # The float64 reference of the largest rows would take seconds each.
    return tokens * heads * windows * dim > 784 * 2 * 2 * 32


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("window_size", [1, 2, 7, 14, 28])
@pytest.mark.parametrize("heads", [1, 2, 8])
@pytest.mark.parametrize("dim", [8, 32, 64])
@pytest.mark.parametrize("windows_per_image", [1, 4])
def test_matches_reference_fp32(backend, device, window_size, heads, dim, windows_per_image):
    if too_slow_for(backend, device, window_size**2, heads, windows_per_image, dim):
        pytest.skip("too slow for this backend's test budget")
    inputs = make_inputs(1, windows_per_image, heads, window_size, dim, device=device)
    check_against_reference(backend, device, inputs, window_size)


@pytest.mark.parametrize(("backend", "device"), [p for p in backend_params() if p.values != INTERPRETED])
@pytest.mark.parametrize(("heads", "window_size"), [(2, 28), (4, 14), (8, 7)])
def test_lldif_scales(backend, device, heads, window_size):
    """The three DLNet scales at batch 2, head dim 32, one window per image."""
    check_against_reference(backend, device, make_inputs(2, 1, heads, window_size, 32, device=device), window_size)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dim", [32, 64, 128])
def test_every_dtype_and_head_dim_cover(backend, device, dtype, dim):
    """Each dtype at each head-dim size the CUDA kernels are instantiated for (d <= 32, 64, 128)."""
    window_size = 2 if (backend, device) == INTERPRETED else 7
    if (backend, device) == INTERPRETED and dim > 32:
        pytest.skip("too slow for the Triton interpreter")
    inputs = make_inputs(2, 2, 2, window_size, dim, dtype, device)
    check_against_reference(backend, device, inputs, window_size)


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_frozen_queries_get_no_gradient(backend, device):
    """LLDif's landmark queries at two scales need no dq; the kernels skip it."""
    inputs = make_inputs(2, 2, 2, 2, 8, device=device, q_grad=False)
    fused, _ = check_against_reference(backend, device, inputs, 2)
    assert fused[1] is None


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_strided_views_of_one_projection(backend, device):
    """k, v as POSTER++ makes them: views of one (W, M, 2, heads, d) projection; q a transposed view."""
    skip_unless_serves(backend, device)
    windows, heads, window_size, dim = 2, 2, 3, 8
    tokens = window_size**2
    kv = torch.randn(windows, tokens, 2, heads, dim, device=device).permute(2, 0, 3, 1, 4)
    q = torch.randn(windows, tokens, heads, dim, device=device).transpose(1, 2)
    table = torch.randn((2 * window_size - 1) ** 2, heads, device=device)
    inputs = [t.detach().requires_grad_() for t in (q, kv[0], kv[1], table)]
    check_against_reference(backend, device, inputs, window_size)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_explicit_scale(backend, device, scale):
    check_against_reference(backend, device, make_inputs(1, 2, 2, 2, 8, device=device), 2, scale)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_very_negative_logits(backend, device, dtype):
    """Rows whose logits are all far below zero and widely spread are a softmax like any other."""
    window_size = 2
    inputs = make_inputs(1, 2, 2, window_size, 8, dtype, device)
    with torch.no_grad():
        inputs[3].fill_(-1e4)
        inputs[0].mul_(30.0)
    check_against_reference(backend, device, inputs, window_size)


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_hugely_negative_logits_stay_finite(backend, device):
    """At -1e30 a float32 log-sum-exp cannot hold the row's spread: the gradients are coarse but finite."""
    skip_unless_serves(backend, device)
    inputs = make_inputs(1, 2, 2, 2, 8, device=device)
    with torch.no_grad():
        inputs[3].fill_(-1e30)
    out, *grads = run(lldif_kernels.window_cross_attention, inputs, torch.randn_like(inputs[1]), 2, backend=backend)
    torch.testing.assert_close(out, reference.window_cross_attention(*inputs, 2))
    assert all(t.isfinite().all() for t in grads)


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_rows_of_minus_infinity_give_zero(backend, device):
    """All logits -inf (eager softmax gives nan): the fused kernels return 0 and zero gradients."""
    skip_unless_serves(backend, device)
    inputs = make_inputs(1, 1, 1, 2, 8, device=device)
    with torch.no_grad():
        inputs[3].fill_(-float("inf"))
    out, *grads = run(lldif_kernels.window_cross_attention, inputs, torch.ones_like(inputs[1]), 2, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))
    for grad in grads[:3]:
        assert torch.equal(grad, torch.zeros_like(grad))


# The interpreter's numpy max over the nan row warns; the kernel's result is what is checked.
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_nan_stays_in_its_row(backend, device):
    skip_unless_serves(backend, device)
    q, k, v, table = (t.detach() for t in make_inputs(1, 2, 2, 2, 8, device=device))
    q[0, 1, 3, 5] = float("nan")
    out = lldif_kernels.window_cross_attention(q, k, v, table, 2, backend=backend)
    assert out[:, 1, 3].isnan().all()
    out[:, 1, 3] = 0.0
    assert out.isfinite().all()


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_empty_batch(backend, device):
    skip_unless_serves(backend, device)
    inputs = [torch.empty(0, 2, 4, 8, device=device, requires_grad=True) for _ in range(3)]
    inputs.append(torch.randn(9, 2, device=device, requires_grad=True))
    out, *grads = run(lldif_kernels.window_cross_attention, inputs, torch.empty(0, 2, 4, 8, device=device), 2,
                      backend=backend)
    assert out.shape == (0, 2, 4, 8) and torch.equal(grads[3], torch.zeros(9, 2, device=device))


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("q_grad", [True, False])
def test_gradcheck_float64(backend, device, q_grad):
    skip_unless_serves(backend, device, torch.float64)
    inputs = make_inputs(1, 2, 2, 2, 3, torch.float64, device, q_grad=q_grad)
    inputs[3] = inputs[3].detach().double().requires_grad_()

    def fn(*tensors):
        return lldif_kernels.window_cross_attention(*tensors, 2, backend=backend)

    # The interpreter takes a second per call: check a random projection of the Jacobian there.
    fast = (backend, device) == INTERPRETED
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, fast_mode=fast)


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_backward_is_bitwise_repeatable(backend, device):
    skip_unless_serves(backend, device)
    window_size, windows = (2, 2) if (backend, device) == INTERPRETED else (14, 4)
    inputs = make_inputs(2, windows, 2, window_size, 32, device=device)
    grad_out = torch.randn_like(inputs[1])
    first = run(lldif_kernels.window_cross_attention, inputs, grad_out, window_size, backend=backend)
    second = run(lldif_kernels.window_cross_attention, inputs, grad_out, window_size, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_opcheck(backend, device):
    skip_unless_serves(backend, device)
    q, k, v, table = (t.detach() for t in make_inputs(1, 2, 2, 2, 4, device=device))
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), table.requires_grad_(), 2, 0.5, backend)
    torch.library.opcheck(torch.ops.lldif_kernels.window_cross_attention.default, args)
    out, lse = torch.ops.lldif_kernels.window_cross_attention.default(*args)
    detached = (q.detach(), k.detach(), v.detach(), table.detach())
    for need_dq in (True, False):
        torch.library.opcheck(torch.ops.lldif_kernels.window_cross_attention_backward.default,
                              (torch.randn_like(out), *detached, out.detach(), lse, 2, 0.5, need_dq, backend))
    if backend in ("cpp", "cuda"):
        torch.library.opcheck(torch.ops.lldif_native.window_cross_attention_fwd.default, (*detached, 2, 0.5))


@pytest.mark.parametrize("module", [False, True])
def test_torch_compile_fullgraph(module):
    skip_unless_serves("cpp", "cpu")
    torch.manual_seed(0)
    layer = WindowCrossAttention(16, window_size=3, heads=2)
    x = torch.randn(4, 9, 16, requires_grad=True)
    q_global = torch.randn(2, 2, 9, 8, requires_grad=True)
    inputs = [x, q_global] if module else make_inputs(2, 2, 2, 3, 8)

    def step(*tensors):
        out = layer(*tensors) if module else lldif_kernels.window_cross_attention(*tensors, 3)
        return out.square().sum()

    assert_compiled_gradients_match(step, inputs)


def bad_calls():
    x = torch.randn(2, 2, 4, 8)
    table = torch.randn(9, 2)
    return [
        ("k", ValueError, (x, torch.randn(2, 4, 8), x, table, 2)),
        ("k", TypeError, (x, x.long(), x, table, 2)),
        ("window_size", ValueError, (x, x, x, table, 3)),
        ("window_size", ValueError, (x, x, x, table, 0)),
        ("window_size", ValueError, (x, x, x, table, 2.0)),
        ("v", ValueError, (x, x, torch.randn(2, 2, 4, 4), table, 2)),
        ("v", TypeError, (x, x, x.double(), table, 2)),
        ("q", ValueError, (torch.randn(2, 1, 4, 8), x, x, table, 2)),
        ("q", ValueError, (torch.randn(3, 2, 4, 8), torch.randn(4, 2, 4, 8), torch.randn(4, 2, 4, 8), table, 2)),
        ("q", ValueError, (x.to("meta"), x, x, table, 2)),
        ("rel_pos_table", ValueError, (x, x, x, torch.randn(8, 2), 2)),
        ("rel_pos_table", ValueError, (x, x, x, torch.randn(9, 1), 2)),
        ("rel_pos_table", TypeError, (x, x, x, [0.0] * 18, 2)),
        ("scale", ValueError, (x, x, x, table, 2, float("nan"))),
    ]


@pytest.mark.parametrize(("argument", "error", "args"), bad_calls())
def test_bad_inputs_name_the_argument(argument, error, args):
    with pytest.raises(error, match=rf"\b{argument}\b"):
        lldif_kernels.window_cross_attention(*args)


def test_explicit_backend_that_cannot_serve_lists_its_reasons():
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(BackendNotSupportedError, match="serves CUDA tensors"):
        lldif_kernels.window_cross_attention(x, x, x, torch.zeros(9, 1), 2, backend="cuda")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_head_dim_limits_are_reasons_not_crashes(backend):
    assert any("d=129" in reason for reason in op_reasons(backend, 1, 1, 4, 129))


@pytest.mark.parametrize(("backend", "device"), [p for p in backend_params() if p.id in ("cuda-emulated", "cuda")])
def test_cuda_grid_rows_limit_is_a_clear_error(backend, device):
    """A window of 1449² tokens needs 65,613 tiles of 32 query rows: one past the y dimension of a CUDA grid."""
    skip_unless_serves(backend, device, torch.float16)
    window_size = 1449
    q = torch.empty(1, 1, window_size**2, 32, dtype=torch.float16, device=device)  # never read: pages stay untouched
    table = torch.zeros((2 * window_size - 1) ** 2, 1, device=device)
    with pytest.raises(ValueError, match="65613 row tiles on the y dimension of the CUDA kernels' grid"):
        lldif_kernels.window_cross_attention(q, q, q, table, window_size, backend=backend)


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize(("dim", "heads", "window_size", "windows_per_image"), [(64, 2, 7, 1), (32, 4, 3, 4)])
def test_module_loads_poster_state_dict_and_matches(qkv_bias, dim, heads, window_size, windows_per_image):
    """Built with POSTER++'s own constructor keywords."""
    torch.manual_seed(0)
    kwargs = {"dim": dim, "num_heads": heads, "window_size": window_size, "qkv_bias": qkv_bias}
    poster = PosterWindowAttentionGlobal(**kwargs)
    ours = WindowCrossAttention(**kwargs, attn_drop=0.0, proj_drop=0.0)
    ours.load_state_dict(poster.state_dict(), strict=True)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in poster.state_dict().items()}
    images, tokens = 2, window_size**2
    x = torch.randn(images * windows_per_image, tokens, dim)
    # POSTER++'s global query: (B, 1, heads, M, d).
    q_global = torch.randn(images, 1, heads, tokens, dim // heads)
    inputs_ours = [t.clone().requires_grad_() for t in (x, q_global)]
    inputs_poster = [t.clone().requires_grad_() for t in (x, q_global)]
    out_ours, out_poster = ours(*inputs_ours), poster(*inputs_poster)
    torch.testing.assert_close(out_ours, out_poster, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out_ours)
    out_ours.backward(grad)
    out_poster.backward(grad)
    for got, want in zip(inputs_ours, inputs_poster, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)
    for (name, p_ours), p_poster in zip(ours.named_parameters(), poster.parameters(), strict=True):
        torch.testing.assert_close(p_ours.grad, p_poster.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_module_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="multiple of heads"):
        WindowCrossAttention(10, window_size=7, heads=3)


def test_module_refuses_positional_calls_in_either_order():
    """POSTER++ takes (dim, num_heads, window_size), a natural order would be (dim, window_size, heads): a
    positional call must not build whichever module its order happens to mean here."""
    with pytest.raises(TypeError, match="positional"):
        WindowCrossAttention(64, 2, 28)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"heads": 2, "attn_drop": 0.1}, ValueError, r"\battn_drop\b"),
    ({"heads": 2, "proj_drop": 0.5}, ValueError, r"\bproj_drop\b"),
    ({"heads": 2, "num_heads": 4}, ValueError, r"heads=2 and num_heads=4"),
    ({}, TypeError, r"\bheads\b"),
])
def test_module_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        WindowCrossAttention(16, window_size=3, **kwargs)


@pytest.mark.parametrize(("argument", "x_shape", "q_shape"), [
    ("x", (2, 9, 12), (2, 2, 9, 8)),
    ("x", (2, 16, 16), (2, 2, 9, 8)),
    ("x", (18, 16), (2, 2, 9, 8)),
    ("q_global", (2, 9, 16), (2, 4, 9, 4)),
    ("q_global", (2, 9, 16), (2, 2, 2, 9, 8)),
    ("q_global", (2, 9, 16), (2, 18, 8)),
    ("q_global", (4, 9, 16), (3, 2, 9, 8)),
])
def test_module_bad_inputs_name_the_argument(argument, x_shape, q_shape):
    layer = WindowCrossAttention(16, window_size=3, heads=2)
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        layer(torch.randn(x_shape), torch.randn(q_shape))
