"""BATO attention: the Triton kernels (under the interpreter on a CPU) against the reference."""

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from dimaskdino.ops import bato_attention, bato_attention_ref
from conftest import triton_cpu_reason, triton_devices

DEVICES = triton_devices("bato_attention")


def make_inputs(batch=2, heads=2, seq=37, keys=50, dim=32, dtype=torch.float32, device="cpu"):
    q = torch.randn(batch, heads, seq, dim, device=device).to(dtype)
    k = torch.randn(batch, heads, keys, dim, device=device).to(dtype)
    v = torch.randn(batch, heads, keys, dim, device=device).to(dtype)
    return q, k, v


def check_against_reference(inputs, impl, atol, rtol):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    ref_leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = bato_attention(*leaves, impl=impl)
    ref = bato_attention_ref(*ref_leaves)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, ref_leaves, grad)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"grad of {name}: {m}")


AWKWARD = {
    # S=37 < one block; S=300: several forward blocks and backward programs that walk several
    # query blocks (2 splits of 5 blocks of 64 in the interpreter).
    "s37_k50_d32": dict(seq=37),
    "s300_k50_d32_b3": dict(seq=300, batch=3),
    "k1": dict(seq=37, keys=1),
    "k17_d16": dict(seq=37, keys=17, dim=16),
    "k128": dict(seq=20, keys=128, heads=1, batch=1),
    "d24_b1_h3": dict(seq=70, dim=24, batch=1, heads=3),
    "s1": dict(seq=1, keys=5),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(AWKWARD))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(case, dtype, device):
    inputs = make_inputs(dtype=dtype, device=device, **AWKWARD[case])
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    check_against_reference(inputs, "triton", atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_and_output_layout(device):
    """q as the model makes it ((B, S, H, D) viewed as (B, H, S, D)), k/v sliced: no copies needed,
    and the output keeps q's layout so that it transposes back to (B, S, H*D) as a view."""
    batch, seq, heads, dim, keys = 2, 45, 2, 32, 17
    q = torch.randn(batch, seq, heads, dim, dtype=torch.float64, device=device).transpose(1, 2)
    kv = torch.randn(batch, heads, keys, 2 * dim, dtype=torch.float64, device=device)
    k, v = kv[..., :dim], kv[..., dim:]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = bato_attention(q, k, v, impl="triton")
    assert out.stride() == q.stride()
    out.transpose(1, 2).view(batch, seq, heads * dim)  # a view, no copy
    check_against_reference((q, k, v), "triton", atol=1e-12, rtol=1e-12)
    # An expanded (stride-0) output gradient, as from out.sum().backward().
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    bato_attention(*leaves, impl="triton").sum().backward()
    bato_attention_ref(*ref_leaves).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_at_most_twice_pytorch(dtype, device):
    """16-bit inputs: our error against a float64 ground truth (forward and every gradient) is at
    most 2x the error of the plain PyTorch reference run in that dtype."""
    q, k, v = make_inputs(batch=1, heads=2, seq=150, keys=50, dim=32, dtype=dtype, device=device)
    grad = torch.randn(q.shape, device=device).to(dtype)

    def run(fn, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return (out, *torch.autograd.grad(out, leaves, grad.to(cast)))

    truth = run(bato_attention_ref, torch.float64)
    ours = run(lambda *a: bato_attention(*a, impl="triton"), dtype)
    pytorch = run(bato_attention_ref, dtype)
    for name, t, o, p in zip(("out", "grad q", "grad k", "grad v"), truth, ours, pytorch):
        assert o.dtype == dtype
        ours_err = (o.double() - t).abs().max()
        torch_err = (p.double() - t).abs().max()
        assert ours_err <= 2 * torch_err, (name, ours_err, torch_err)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    """The interpreter runs tl.dot in float64, so the Triton forward and backward are gradchecked
    directly (keys 3 -> padded to 16, D 4 -> padded to 16, S 5 -> one partial block)."""
    q, k, v = make_inputs(batch=2, heads=1, seq=5, keys=3, dim=4, dtype=torch.float64, device=device)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: bato_attention(q, k, v, impl="triton"), inputs)


def test_gradcheck_reference():
    q, k, v = make_inputs(batch=1, heads=2, seq=6, keys=3, dim=4, dtype=torch.float64)
    assert torch.autograd.gradcheck(bato_attention_ref, tuple(t.requires_grad_() for t in (q, k, v)))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in (torch.float32, torch.float64):
        q, k, v = make_inputs(batch=1, heads=2, seq=21, keys=17, dim=16, dtype=dtype, device=device)
        args = tuple(t.requires_grad_() for t in (q, k, v))
        torch.library.opcheck(torch.ops.dimaskdino.bato_attention.default, args)
        grad = torch.randn_like(q)
        torch.library.opcheck(torch.ops.dimaskdino._bato_attention_backward.default, (grad, q.detach(), k.detach(), v.detach()))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_equals_eager(device):
    torch._dynamo.reset()
    q, k, v = [t.requires_grad_() for t in make_inputs(batch=1, heads=2, seq=40, keys=17, dim=16, device=device)]

    def fn(q, k, v):
        return (bato_attention(q * 2, k, v, impl="triton") + 1).sum(-1)

    compiled = torch.compile(fn, fullgraph=True)
    eager_out = fn(q, k, v)
    compiled_out = compiled(q, k, v)
    torch.testing.assert_close(compiled_out, eager_out)
    for e, c in zip(torch.autograd.grad(eager_out.sum(), (q, k, v)), torch.autograd.grad(compiled_out.sum(), (q, k, v))):
        torch.testing.assert_close(c, e)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    q, k, v = [t.requires_grad_() for t in make_inputs(batch=1, heads=1, seq=300, keys=50, device=device)]
    out = bato_attention(q, k, v, impl="triton")
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_query_set(device):
    q, k, v = [t.requires_grad_() for t in make_inputs(batch=2, heads=2, seq=0, keys=5, dim=16, device=device)]
    out = bato_attention(q, k, v, impl="triton")
    assert out.shape == q.shape
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert grads[0].shape == q.shape and not grads[1].any() and not grads[2].any()


def _args():
    q, k, v = make_inputs(batch=2, heads=2, seq=9, keys=5, dim=8)
    return dict(q=q, k=k, v=v)


@pytest.mark.parametrize(
    "name, changes",
    [
        ("q", lambda a: dict(q=a["q"][0])),
        ("q", lambda a: dict(q=a["q"].long())),
        ("q", lambda a: dict(q=[1.0])),
        ("q", lambda a: dict(q=a["q"][..., :0], k=a["k"][..., :0], v=a["v"][..., :0])),
        ("k", lambda a: dict(k=a["k"][0])),
        ("k", lambda a: dict(k=a["k"][:1])),
        ("k", lambda a: dict(k=a["k"][..., :4])),
        ("k", lambda a: dict(k=a["k"][:, :, :0], v=a["v"][:, :, :0])),
        ("k", lambda a: dict(k=a["k"].double())),
        ("k", lambda a: dict(k=a["k"].to("meta"))),
        ("v", lambda a: dict(v=a["v"][:, :, :3])),
        ("v", lambda a: dict(v=a["v"].half())),
        ("v", lambda a: dict(v=None)),
    ],
)
def test_bad_input_names_the_argument(name, changes):
    args = _args()
    args.update(changes(args))
    for impl in ("auto", "ref", "triton"):
        with pytest.raises(ValueError, match=f"argument '{name}'"):
            bato_attention(**args, impl=impl)


def test_impl_errors_are_clear(monkeypatch):
    args = _args()
    with pytest.raises(ValueError, match="argument 'impl'"):
        bato_attention(**args, impl="cuda")
    # More keys than the kernel keeps on chip: an error under impl="triton" that names k...
    q, k, v = make_inputs(batch=1, heads=1, seq=4, keys=129, dim=8)
    if triton_cpu_reason("bato_attention") is None:
        with pytest.raises(ValueError, match="argument 'k'"):
            bato_attention(q, k, v, impl="triton")
    # ...and the reference, silently, under auto on a CPU.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(bato_attention(q, k, v), bato_attention_ref(q, k, v), atol=0, rtol=0)
    # The interpreter only when asked for.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        bato_attention(**args, impl="triton")


def test_auto_on_cpu_is_the_reference_without_a_warning():
    args = _args()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = bato_attention(**args)
    assert torch.equal(out, bato_attention_ref(**args))


# What follows checks, without a GPU, the code paths that only a GPU runs.

# Compiling the kernels for Hopper (sm_90a) at the model's launches: tests/test_triton_compile.py.


def test_compiled_kernel_path_traces_into_triton_kernels():
    """What torch.compile does on a GPU, checked on a CPU: with compiled (not interpreted) kernels
    AOTAutograd inlines the forward and the backward triton_ops into triton_kernel_wrapper_functional
    nodes for Inductor to launch. Traced only (nothing can run without a GPU), in a subprocess
    without TRITON_INTERPRET."""
    script = textwrap.dedent(
        """
        import os
        os.environ["TRITON_INTERPRET"] = "0"
        import torch
        from torch._functorch.aot_autograd import aot_module_simplified
        import dimaskdino.ops  # noqa: F401

        graphs = []

        def backend(gm, example_inputs):
            def record(graph, inputs):
                graphs.append(graph.code)
                return lambda *args: (_ for _ in ()).throw(RuntimeError("traced only"))
            return aot_module_simplified(gm, example_inputs, fw_compiler=record, bw_compiler=record)

        def fn(q, k, v):
            out = torch.ops.dimaskdino.bato_attention(q, k, v)
            dq, dk, dv = torch.ops.dimaskdino._bato_attention_backward(out, q, k, v)
            return dq.sum() + dk.sum() + dv.sum()

        args = (torch.randn(1, 2, 40, 16), torch.randn(1, 2, 17, 16), torch.randn(1, 2, 17, 16))
        try:
            torch.compile(fn, backend=backend, fullgraph=True)(*args)
        except RuntimeError as error:
            assert "traced only" in str(error), error
        print("GRAPHS", len(graphs), sum(g.count("triton_kernel_wrapper_functional(") for g in graphs))
        """
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GRAPHS 1 2" in result.stdout, (result.stdout, result.stderr[-3000:])


def test_direct_op_call_checks_too(monkeypatch):
    """torch.ops.dimaskdino.* skip the wrapper; the op still names the argument, and refuses to
    launch compiled kernels on a CPU."""
    args = _args()
    with pytest.raises(ValueError, match="argument 'k'"):
        torch.ops.dimaskdino.bato_attention(args["q"], args["k"][..., :4], args["v"])
    with pytest.raises(ValueError, match="argument 'grad_out'"):
        torch.ops.dimaskdino._bato_attention_backward(args["q"][:1], args["q"], args["k"], args["v"])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        torch.ops.dimaskdino.bato_attention(args["q"], args["k"], args["v"])
