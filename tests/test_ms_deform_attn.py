"""The MSDA op: every native implementation against the pure-PyTorch reference."""

import importlib
import sys
import warnings

import pytest
import torch

from dimaskdino import _extension
from dimaskdino.model.ms_deform_attn import MSDeformAttn
from dimaskdino.ops import ms_deform_attn, ms_deform_attn_ref

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# The CUDA op computes in float32 (or 16-bit) and rejects float64 by design: the precise checks
# run in float64 on the CPU and in float32 on CUDA.
DEVICE_DTYPES = [("cpu", torch.float64), ("cpu", torch.float32), pytest.param("cuda", torch.float32, marks=pytest.mark.gpu)]


def precise_dtype(device: str) -> torch.dtype:
    return torch.float32 if device == "cuda" else torch.float64


def tolerance(dtype: torch.dtype, float64: float = 1e-10) -> float:
    return float64 if dtype == torch.float64 else 1e-5


def make_inputs(shapes, batch=2, queries=7, heads=2, channels=8, points=2, dtype=torch.float32,
                loc_low=-0.1, loc_high=1.1, device="cpu", loc_dtype=None):
    """Random inputs; locations reach outside [0, 1] so zero padding is exercised."""
    if device == "cuda" and torch.float64 in (dtype, loc_dtype):
        raise ValueError("the CUDA op takes no float64 (by design): use precise_dtype(device)")
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=device)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels = len(shapes)
    loc_dtype = loc_dtype or dtype
    value = torch.randn(batch, int(sizes.sum()), heads, channels, device=device).to(dtype)
    locations = torch.empty(batch, queries, heads, levels, points, 2, device=device).uniform_(loc_low, loc_high)
    weights = torch.rand(batch, queries, heads, levels, points, device=device).softmax(-1)
    return value, spatial_shapes, level_start_index, locations.to(loc_dtype), weights.to(loc_dtype)


def check_against_reference(inputs, impl, atol, rtol):
    value, shapes, starts, loc, weights = [t.clone() for t in inputs]
    leaves = [t.requires_grad_() for t in (value, loc, weights)]
    out = ms_deform_attn(value, shapes, starts, loc, weights, impl=impl)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref = ms_deform_attn_ref(ref_leaves[0], shapes, starts, ref_leaves[1], ref_leaves[2])
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, ref_leaves, grad)
    for name, g, w in zip(("value", "sampling_locations", "attention_weights"), got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"grad of {name}: {m}")


AWKWARD = {
    "one_level": dict(shapes=[(6, 9)]),
    "non_square_levels": dict(shapes=[(7, 13), (4, 3), (1, 5), (2, 1)]),
    "one_point": dict(shapes=[(5, 6), (3, 3)], points=1),
    "d30": dict(shapes=[(5, 6), (3, 3)], channels=30),
    "d32": dict(shapes=[(5, 6), (3, 3)], channels=32),
    "d64": dict(shapes=[(5, 6), (3, 3)], channels=64, heads=1),
    "batch1": dict(shapes=[(5, 6), (3, 3)], batch=1),
    "batch3": dict(shapes=[(5, 6), (3, 3)], batch=3, heads=3),
    "far_outside": dict(shapes=[(5, 6), (3, 3)], loc_low=-1.5, loc_high=2.5),
}


@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("case", sorted(AWKWARD))
def test_matches_reference(case, dtype, device):
    inputs = make_inputs(dtype=dtype, device=device, **AWKWARD[case])
    tol = tolerance(dtype)
    check_against_reference(inputs, device, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_locations_on_borders_and_pixel_centres(device):
    """Exactly 0, exactly 1, pixel centres (integer pixel coordinates) and half-pixels outside."""
    shapes = [(4, 5), (2, 3)]
    dtype = precise_dtype(device)
    value, ss, starts, _, weights = make_inputs(shapes, batch=1, queries=8, heads=1, points=3, dtype=dtype, device=device)
    w, h = 5.0, 4.0
    specials = torch.tensor([0.0, 1.0, 0.5 / w, 1 - 0.5 / w, 1.5 / w, -0.5 / w, 1 + 0.5 / w, 0.5], dtype=dtype)
    xs = specials[torch.randint(0, len(specials), (1, 8, 1, 2, 3))]
    ys = specials[torch.randint(0, len(specials), (1, 8, 1, 2, 3))] * (w / h)
    loc = torch.stack([xs, ys.clamp(-0.2, 1.2)], -1).to(device)
    out = ms_deform_attn(value, ss, starts, loc, weights, impl=device)
    tol = tolerance(dtype, float64=1e-12)
    torch.testing.assert_close(out, ms_deform_attn_ref(value, ss, starts, loc, weights), atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    dtype = precise_dtype(device)
    value, ss, starts, loc, weights = make_inputs([(5, 6), (3, 4)], heads=2, channels=8, dtype=dtype, device=device)
    # Same values, strided memory: transposed copies viewed back, and a sliced value.
    value_nc = value.transpose(1, 2).contiguous().transpose(1, 2)
    loc_nc = loc.permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0)
    weights_nc = torch.cat([weights, weights], dim=-1)[..., : weights.shape[-1]]
    assert not (value_nc.is_contiguous() or loc_nc.is_contiguous() or weights_nc.is_contiguous())
    check_against_reference((value_nc, ss, starts, loc_nc, weights_nc), device, atol=tolerance(dtype), rtol=tolerance(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_at_most_twice_pytorch(dtype, device):
    """16-bit value, float32 locations: our error vs a float64 ground truth is at most 2x the error
    of PyTorch's own grid_sample path run in that dtype."""
    value, ss, starts, loc, weights = make_inputs([(16, 20), (8, 10)], heads=2, channels=32, points=4, device=device, dtype=torch.float32)
    value_low = value.to(dtype)
    truth = ms_deform_attn_ref(value_low.double(), ss, starts, loc.double(), weights.double())
    ours = ms_deform_attn(value_low, ss, starts, loc, weights, impl=device)
    torch_low = ms_deform_attn_ref(value_low, ss, starts, loc.to(dtype), weights.to(dtype))
    assert ours.dtype == dtype
    ours_err = (ours.double() - truth).abs().max()
    torch_err = (torch_low.double() - truth).abs().max()
    assert ours_err <= 2 * torch_err, (ours_err, torch_err)


def test_gradcheck_float64(device="cpu"):
    """CPU only: gradcheck needs float64, which the CUDA op does not take (its gradients are
    checked against the reference in float32 by test_matches_reference)."""
    value, ss, starts, loc, weights = make_inputs([(3, 4), (2, 2)], batch=2, queries=3, heads=2, channels=3, points=2, dtype=torch.float64, device=device)
    # Keep points off integer pixel coordinates, where bilinear sampling has a kink.
    loc = loc.clamp(0.02, 0.98)
    inputs = (value.requires_grad_(), ss, starts, loc.requires_grad_(), weights.requires_grad_())
    assert torch.autograd.gradcheck(lambda v, s, i, l, w: ms_deform_attn(v, s, i, l, w, impl=device), inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in {torch.float32, precise_dtype(device)}:
        value, ss, starts, loc, weights = make_inputs([(5, 6), (3, 4)], dtype=dtype, device=device)
        args = (value.requires_grad_(), ss, starts, loc.requires_grad_(), weights.requires_grad_())
        torch.library.opcheck(torch.ops.dimaskdino.ms_deform_attn.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_equals_eager(device):
    torch._dynamo.reset()
    inputs = make_inputs([(5, 6), (3, 4)], device=device)
    value, ss, starts, loc, weights = [t.clone() for t in inputs]
    for t in (value, loc, weights):
        t.requires_grad_()

    def fn(v, s, i, l, w):
        return (ms_deform_attn(v, s, i, l, w, impl=device) * 2).sum(-1)

    compiled = torch.compile(fn, fullgraph=True)
    eager_out = fn(value, ss, starts, loc, weights)
    compiled_out = compiled(value, ss, starts, loc, weights)
    torch.testing.assert_close(compiled_out, eager_out)
    eager_grads = torch.autograd.grad(eager_out.sum(), (value, loc, weights))
    compiled_grads = torch.autograd.grad(compiled_out.sum(), (value, loc, weights))
    for e, c in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(c, e)


def _bad(**changes):
    value, ss, starts, loc, weights = make_inputs([(5, 6), (3, 4)])
    args = dict(value=value, spatial_shapes=ss, level_start_index=starts, sampling_locations=loc, attention_weights=weights)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "name, changes",
    [
        ("value", lambda a: dict(value=a["value"][0])),
        ("value", lambda a: dict(value=a["value"].long())),
        ("spatial_shapes", lambda a: dict(spatial_shapes=a["spatial_shapes"].int())),
        ("spatial_shapes", lambda a: dict(spatial_shapes=a["spatial_shapes"] + 1)),
        ("level_start_index", lambda a: dict(level_start_index=a["level_start_index"][:1])),
        ("level_start_index", lambda a: dict(level_start_index=a["level_start_index"] + 1)),
        ("sampling_locations", lambda a: dict(sampling_locations=a["sampling_locations"][..., 0])),
        ("sampling_locations", lambda a: dict(sampling_locations=a["sampling_locations"][:1])),
        ("sampling_locations", lambda a: dict(sampling_locations=a["sampling_locations"].to("meta"))),
        ("attention_weights", lambda a: dict(attention_weights=a["attention_weights"][..., :1])),
        ("attention_weights", lambda a: dict(attention_weights=a["attention_weights"].double())),
        ("value", lambda a: dict(value=[1.0])),
    ],
)
def test_bad_input_names_the_argument(name, changes):
    args = _bad()
    args.update(changes(args))
    with pytest.raises(ValueError, match=f"argument '{name}'"):
        ms_deform_attn(**args)


def test_impl_errors_are_clear():
    args = _bad()
    with pytest.raises(ValueError, match="argument 'impl'"):
        ms_deform_attn(**args, impl="triton")
    with pytest.raises(ValueError, match="argument 'impl'"):
        ms_deform_attn(**args, impl="cuda")


def test_native_op_checks_inputs_too():
    """Direct torch.ops calls skip the wrapper; the C++ checks still name the argument."""
    args = _bad()
    with pytest.raises(RuntimeError, match="argument 'attention_weights'"):
        torch.ops.dimaskdino.ms_deform_attn(
            args["value"], args["spatial_shapes"], args["level_start_index"], args["sampling_locations"], args["attention_weights"][..., :1]
        )


@pytest.mark.parametrize(
    "name, changes",
    [
        # sum h*w > S (reads past value); the starts then disagree too: either is named
        ("(spatial_shapes|level_start_index)", lambda a: dict(spatial_shapes=a["spatial_shapes"] + 1)),
        ("spatial_shapes", lambda a: dict(spatial_shapes=a["spatial_shapes"] * torch.tensor([[1, 1], [0, 1]]))),
        ("level_start_index", lambda a: dict(level_start_index=a["level_start_index"] + 1)),
    ],
)
@pytest.mark.parametrize("backward", [False, True])
def test_native_op_checks_spatial_shapes_contents(name, changes, backward):
    """A direct op call (no wrapper) with shapes inconsistent with value is an error naming the
    argument, not an out-of-bounds read, in the forward and the backward."""
    args = _bad()
    args.update(changes(args))
    ordered = [args[k] for k in ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")]
    with pytest.raises(RuntimeError, match=f"argument '{name}'"):
        if backward:
            grad = torch.zeros(ordered[3].shape[0], ordered[3].shape[1], ordered[0].shape[2] * ordered[0].shape[3])
            torch.ops.dimaskdino._ms_deform_attn_backward(grad, *ordered)
        else:
            torch.ops.dimaskdino.ms_deform_attn(*ordered)
    with pytest.raises(ValueError, match=f"argument '{name}'"):
        ms_deform_attn(**args)  # the wrapper says so first


def test_wrapper_contents_check_skips_fake_tensors():
    """Under FakeTensorMode (the fake-GPU training step in CI) spatial_shapes has no values: the
    wrapper must not read them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _bad()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = {k: mode.from_tensor(v) for k, v in args.items()}
        out = ms_deform_attn(**fake, impl="cpu")
    assert out.shape == (args["value"].shape[0], args["sampling_locations"].shape[1],
                         args["value"].shape[2] * args["value"].shape[3])


def test_auto_falls_back_once_with_a_warning(monkeypatch):
    monkeypatch.setattr(_extension, "native_available", lambda op, device_type: False)
    _extension.warn_fallback_once.cache_clear()
    args = _bad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ms_deform_attn(**args)
        ms_deform_attn(**args)
    messages = [str(w.message) for w in caught if "ms_deform_attn" in str(w.message)]
    assert len(messages) == 1 and "reference" in messages[0]
    torch.testing.assert_close(first, ms_deform_attn_ref(**args))
    _extension.warn_fallback_once.cache_clear()


def test_extension_is_built():
    """The suite is meant to run against a built extension: a silent skip of every native case
    would hide a broken build."""
    assert _extension.load_error() is None, _extension.load_error()
    assert _extension.native_available("dimaskdino::ms_deform_attn", "cpu")


@pytest.mark.parametrize("reference_dim", [2, 4])
def test_module_native_equals_reference_mode(reference_dim):
    torch.manual_seed(1)
    native = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3, impl="cpu").double()
    reference = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3, impl="ref").double()
    reference.load_state_dict(native.state_dict())
    with torch.no_grad():  # move off the init, where all weights are equal
        for p in native.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference.load_state_dict(native.state_dict())
    shapes = torch.tensor([[6, 5], [3, 3]])
    starts = torch.tensor([0, 30])
    query = torch.randn(2, 11, 32, dtype=torch.float64)
    value = torch.randn(2, 39, 32, dtype=torch.float64)
    ref_points = torch.rand(2, 11, 2, reference_dim, dtype=torch.float64)
    padding = torch.zeros(2, 39, dtype=torch.bool)
    padding[1, -4:] = True
    out = native(query, ref_points, value, shapes, starts, padding)
    expected = reference(query, ref_points, value, shapes, starts, padding)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    out.sum().backward()
    expected.sum().backward()
    for (name, p), q in zip(native.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-9, rtol=1e-9, msg=lambda m: f"{name}: {m}")


def test_module_rejects_bad_reference_points():
    module = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    with pytest.raises(ValueError, match="reference_points"):
        module(torch.randn(1, 3, 32), torch.rand(1, 3, 2, 3), torch.randn(1, 39, 32), torch.tensor([[6, 5], [3, 3]]), torch.tensor([0, 30]))


@pytest.mark.gpu
def test_cuda_kernels_are_built():
    assert _extension.native_available("dimaskdino::ms_deform_attn", "cuda"), _extension.why_unavailable("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_encoder_sized_case_matches_cpu(dtype):
    """A realistic size exercises the vectorized path, many blocks and atomics contention."""
    inputs = make_inputs([(64, 64), (32, 32), (16, 16), (8, 8)], batch=2, queries=1000, heads=8, channels=32, points=4,
                         dtype=torch.float32, device="cuda", loc_dtype=torch.float32)
    value, ss, starts, loc, weights = inputs
    value = value.to(dtype).requires_grad_()
    loc.requires_grad_()
    weights.requires_grad_()
    out = ms_deform_attn(value, ss, starts, loc, weights, impl="cuda")
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (value, loc, weights), grad)
    cpu = [t.detach().cpu().double().requires_grad_() for t in (value, loc, weights)]
    ref = ms_deform_attn(cpu[0], ss.cpu(), starts.cpu(), cpu[1], cpu[2], impl="cpu")
    ref_grads = torch.autograd.grad(ref, cpu, grad.cpu().double())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double().cpu(), ref, atol=tol, rtol=tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double().cpu(), r, atol=tol * 10, rtol=tol)


def test_no_cuda_test_asks_for_float64(monkeypatch):
    """Every CUDA-parametrized test of this module, called with device="cuda" up to its first
    make_inputs, asks for float32 or 16-bit (the CUDA op rejects float64; 13 gpu tests did)."""

    class Reached(Exception):
        pass

    asked = []

    def record(*args, dtype=torch.float32, device="cpu", loc_dtype=None, **kwargs):
        asked.append((dtype, loc_dtype))
        raise Reached

    monkeypatch.setattr(sys.modules[__name__], "make_inputs", record)
    calls = 0
    for name, fn in list(globals().items()):
        marks = getattr(fn, "pytestmark", [])
        params = [m for m in marks if m.name == "parametrize"]
        if not name.startswith("test_") or not any("device" in m.args[0] for m in params):
            continue
        combos = [{}]
        for mark in params:
            names = [n.strip() for n in mark.args[0].split(",")]
            values = [v.values if hasattr(v, "values") else v if len(names) > 1 else (v,) for v in mark.args[1]]
            combos = [dict(c, **dict(zip(names, v))) for c in combos for v in values]
        for kwargs in combos:
            if kwargs.get("device") != "cuda":
                continue
            calls += 1
            with pytest.raises(Reached):
                fn(**kwargs)
    assert calls >= 10, calls
    assert len(asked) == calls and all(torch.float64 not in pair for pair in asked), asked


def test_cuda_backward_alerts_under_deterministic_algorithms():
    """The CUDA backward scatters with atomic adds: like grid_sample's, it is an error under
    torch.use_deterministic_algorithms(True) and a warning under warn_only. Run on fake CUDA
    tensors (the CUDA-only branch, no GPU); the CPU backward is deterministic and never alerts."""
    from types import SimpleNamespace

    from torch._subclasses.fake_tensor import FakeTensorMode

    msda_module = importlib.import_module("dimaskdino.ops.ms_deform_attn")  # the package exports the function
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        with FakeTensorMode():
            shapes = ((2, 1, 4, 8), (1, 2), (1,), (2, 3, 4, 1, 2, 2), (2, 3, 4, 1, 2))
            value, spatial, start, loc, weights = (torch.empty(s, device="cuda") for s in shapes)
            ctx = SimpleNamespace(saved_tensors=(value, spatial.long(), start.long(), loc, weights))
            grad_output = torch.empty(2, 3, 32, device="cuda")
            torch.use_deterministic_algorithms(False)
            grads = msda_module._backward(ctx, grad_output)
            assert grads[0].shape == value.shape and grads[0].device.type == "cuda"
            torch.use_deterministic_algorithms(True, warn_only=True)
            with pytest.warns(UserWarning, match="ms_deform_attn backward"):
                msda_module._backward(ctx, grad_output)
            torch.use_deterministic_algorithms(True)
            with pytest.raises(RuntimeError, match="ms_deform_attn backward .* use warn_only=True"):
                msda_module._backward(ctx, grad_output)
        # The CPU backward has no atomics: no alert even in strict mode.
        value, loc, weights = torch.rand(1, 4, 1, 2), torch.rand(1, 3, 1, 1, 2, 2), torch.rand(1, 3, 1, 1, 2)
        for tensor in (value, loc, weights):
            tensor.requires_grad_(True)
        out = ms_deform_attn(value, torch.tensor([[2, 2]]), torch.tensor([0]), loc, weights, impl="cpu")
        out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
