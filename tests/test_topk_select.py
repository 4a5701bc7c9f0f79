"""Fused top-k selection: the Triton scoring kernel (under the interpreter on a CPU) against the
reference; the indices must be the reference's up to ties."""

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from dimaskdino.ops import class_max_scores, class_max_scores_ref, topk_select, topk_select_ref
from conftest import triton_devices

DEVICES = triton_devices("topk_select")


def make_weights(dim, classes, dtype=torch.float32, device="cpu", proj=True, proj_bias=True, class_bias=True):
    """(norm_weight, norm_bias, proj_weight, proj_bias, class_weight, class_bias) like nn.Linear /
    nn.LayerNorm parameters off their init (so that scores spread)."""
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    cls_w, cls_b = rand(classes, dim, scale=dim ** -0.5), rand(classes) if class_bias else None
    if not proj:
        return None, None, None, None, cls_w, cls_b
    return (1 + rand(dim, scale=0.2), rand(dim, scale=0.2), rand(dim, dim, scale=dim ** -0.5),
            rand(dim) if proj_bias else None, cls_w, cls_b)


def assert_same_selection(scores, indices, ref_all, k, atol):
    """Our (scores, indices) against the reference's per-token scores `ref_all` (B, S): same
    sorted scores; every index we return has the reference score we report; and where our index set
    differs from the reference's top-k, only by tokens tied (within atol) with the k-th score."""
    ref_scores, ref_indices = ref_all.topk(k, dim=1)
    assert indices.dtype == torch.int64 and indices.shape == ref_indices.shape
    torch.testing.assert_close(scores, ref_scores.to(scores.dtype), atol=atol, rtol=0)
    torch.testing.assert_close(ref_all.gather(1, indices).to(scores.dtype), scores, atol=atol, rtol=0)
    for b in range(indices.shape[0]):
        ours, theirs = set(indices[b].tolist()), set(ref_indices[b].tolist())
        assert len(ours) == k
        if k == 0:
            continue
        kth = ref_scores[b, -1]
        for token in ours ^ theirs:
            assert abs(ref_all[b, token] - kth) <= atol, (b, token, float(ref_all[b, token]), float(kth))


AWKWARD = {
    # S=37: one partial block of 64 tokens; S=130: three blocks, the last partial.
    "s37_c80": dict(batch=1, seq=37, dim=32, classes=80, k=10),
    "s130_c7_b3": dict(batch=3, seq=130, dim=32, classes=7, k=50),
    "d24": dict(batch=2, seq=45, dim=24, classes=80, k=45),
    "d256_c80": dict(batch=1, seq=70, dim=256, classes=80, k=30),
    "no_biases": dict(batch=2, seq=40, dim=32, classes=7, k=7, proj_bias=False, class_bias=False),
    "one_class_k1": dict(batch=2, seq=33, dim=16, classes=1, k=1),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("proj", [True, False], ids=["proj", "no_proj"])
@pytest.mark.parametrize("case", sorted(AWKWARD))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(case, proj, dtype, device):
    shape = dict(AWKWARD[case])
    batch, seq, dim, k = shape.pop("batch"), shape.pop("seq"), shape.pop("dim"), shape.pop("k")
    weights = make_weights(dim, shape.pop("classes"), dtype, device, proj=proj, **shape)
    memory = torch.randn(batch, seq, dim, device=device, dtype=dtype)
    ref_all = class_max_scores_ref(memory, weights[4], weights[5], *weights[:4])
    ours_all = class_max_scores(memory, weights[4], weights[5], *weights[:4], impl="triton")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert ours_all.dtype == ref_all.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(ours_all, ref_all, atol=tol, rtol=tol)
    scores, indices = topk_select(memory, *weights, k, impl="triton")
    assert_same_selection(scores, indices, ref_all, k, atol=tol)
    if dtype == torch.float64:  # no near-ties at this precision: exactly the reference's indices
        ref_scores, ref_indices = topk_select_ref(memory, *weights, k)
        assert torch.equal(indices, ref_indices)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    """memory as (S, B, d) transposed to (B, S, d); weights stored transposed."""
    dim, classes = 32, 7
    weights = list(make_weights(dim, classes, torch.float64, device))
    weights[2] = weights[2].t().contiguous().t()  # proj weight, column-major
    weights[4] = weights[4].t().contiguous().t()  # class weight, column-major
    memory = torch.randn(70, 2, dim, dtype=torch.float64, device=device).transpose(0, 1)
    assert not (memory.is_contiguous() or weights[2].is_contiguous() or weights[4].is_contiguous())
    ref_scores, ref_indices = topk_select_ref(memory, *weights, 20)
    scores, indices = topk_select(memory, *weights, 20, impl="triton")
    torch.testing.assert_close(scores, ref_scores, atol=1e-12, rtol=1e-12)
    assert torch.equal(indices, ref_indices)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("proj", [True, False], ids=["proj", "no_proj"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_at_most_twice_pytorch(dtype, proj, device):
    """16-bit memory with float32 master weights (autocast's situation): our scores' error against
    a float64 computation of the same formula is at most 2x that of the reference run in that
    dtype, and the tokens we pick are within that error of the true top-k."""
    dim, classes, k = 64, 80, 40
    weights = make_weights(dim, classes, torch.float32, device, proj=proj)
    memory = torch.randn(2, 150, dim, device=device).to(dtype)
    # Ground truth: the same roundings of the inputs (memory and the weights cast to its dtype,
    # as both implementations do), then float64 math.
    truth_weights = [None if w is None else w.to(dtype).double() for w in weights]
    truth_weights[0:2] = [None if w is None else w.double() for w in weights[0:2]]  # LayerNorm affine stays fp32
    truth = class_max_scores_ref(memory.double(), truth_weights[4], truth_weights[5], *truth_weights[:4])
    ours = class_max_scores(memory, weights[4], weights[5], *weights[:4], impl="triton")
    pytorch = class_max_scores_ref(memory, weights[4], weights[5], *weights[:4])
    assert ours.dtype == pytorch.dtype == torch.float32
    ours_err = (ours.double() - truth).abs().max()
    torch_err = (pytorch.double() - truth).abs().max()
    assert ours_err <= 2 * torch_err, (ours_err, torch_err)
    _, indices = topk_select(memory, *weights, k, impl="triton")
    kth = truth.topk(k, dim=1).values[:, -1:]
    assert (truth.gather(1, indices) >= kth - 2 * ours_err).all()


@pytest.mark.parametrize("device", DEVICES)
def test_no_gradient(device):
    """Scores only pick indices: nothing is recorded for autograd even when the inputs need it."""
    weights = [w.requires_grad_() for w in make_weights(32, 7, device=device)]
    memory = torch.randn(2, 40, 32, device=device, requires_grad=True)
    for impl in ("triton", "ref"):
        with torch.enable_grad():
            scores, indices = topk_select(memory, *weights, 5, impl=impl)
            all_scores = class_max_scores(memory, weights[4], weights[5], *weights[:4], impl=impl)
        assert not scores.requires_grad and not all_scores.requires_grad and scores.grad_fn is None


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in (torch.float32, torch.float64):
        memory = torch.randn(2, 37, 24, device=device, dtype=dtype)
        norm_w, norm_b, proj_w, proj_b, cls_w, cls_b = make_weights(24, 7, dtype, device)
        op = torch.ops.dimaskdino.class_max_scores.default
        torch.library.opcheck(op, (memory, cls_w, cls_b, norm_w, norm_b, proj_w, proj_b, 1e-5))
        torch.library.opcheck(op, (memory, cls_w, None, None, None, None, None, 1e-6))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_equals_eager(device):
    torch._dynamo.reset()
    weights = make_weights(32, 7, device=device)
    memory = torch.randn(2, 40, 32, device=device)

    def fn(memory, *weights):
        first_scores, first = topk_select(memory * 2, *weights, 10, impl="triton")
        selected = torch.gather(memory, 1, first[..., None].expand(-1, -1, memory.shape[-1]))
        second_scores, second = topk_select(selected, None, None, None, None, weights[4], weights[5], 4, impl="triton")
        return first_scores, first, second_scores, second

    compiled = torch.compile(fn, fullgraph=True)
    for got, want in zip(compiled(memory, *weights), fn(memory, *weights)):
        torch.testing.assert_close(got, want)


def _args():
    norm_w, norm_b, proj_w, proj_b, cls_w, cls_b = make_weights(16, 5)
    return dict(memory=torch.randn(2, 9, 16), norm_weight=norm_w, norm_bias=norm_b, proj_weight=proj_w,
                proj_bias=proj_b, class_weight=cls_w, class_bias=cls_b, k=3)


@pytest.mark.parametrize(
    "name, changes",
    [
        ("memory", lambda a: dict(memory=a["memory"][0])),
        ("memory", lambda a: dict(memory=a["memory"].long())),
        ("memory", lambda a: dict(memory=None)),
        ("class_weight", lambda a: dict(class_weight=a["class_weight"][:, :3])),
        ("class_weight", lambda a: dict(class_weight=a["class_weight"][:0])),
        ("class_weight", lambda a: dict(class_weight=a["class_weight"].to("meta"))),
        ("class_bias", lambda a: dict(class_bias=a["class_bias"][:2])),
        ("proj_weight", lambda a: dict(proj_weight=a["proj_weight"][:3])),
        ("proj_bias", lambda a: dict(proj_bias=a["proj_bias"][:3])),
        ("norm_weight", lambda a: dict(norm_weight=None)),
        ("norm_bias", lambda a: dict(norm_bias=a["norm_bias"].int())),
        ("norm_weight", lambda a: dict(proj_weight=None, proj_bias=None, norm_bias=None)),
        ("proj_bias", lambda a: dict(proj_weight=None, norm_weight=None, norm_bias=None)),
        ("k", lambda a: dict(k=10)),
        ("k", lambda a: dict(k=-1)),
        ("k", lambda a: dict(k=2.0)),
        ("eps", lambda a: dict(eps=0.0)),
    ],
)
def test_bad_input_names_the_argument(name, changes):
    args = _args()
    args.update(changes(args))
    for impl in ("auto", "ref", "triton"):
        with pytest.raises(ValueError, match=f"argument '{name}'"):
            topk_select(**args, impl=impl)


def test_impl_errors_are_clear(monkeypatch):
    args = _args()
    with pytest.raises(ValueError, match="argument 'impl'"):
        topk_select(**args, impl="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        topk_select(**args, impl="triton")


def test_auto_on_cpu_is_the_reference_without_a_warning():
    args = _args()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores, indices = topk_select(**args)
    ref_scores, ref_indices = topk_select_ref(**args)
    assert torch.equal(scores, ref_scores) and torch.equal(indices, ref_indices)


# What follows checks, without a GPU, the code paths that only a GPU runs.


def run_without_interpreter(script: str) -> str:
    """Runs `script` in a fresh interpreter without TRITON_INTERPRET; returns its stdout."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env,
                            cwd=root, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


# Compiling the kernels for Hopper (sm_90a) at the model's launches: tests/test_triton_compile.py.


def test_compiled_kernel_path_traces_into_triton_kernels():
    """What torch.compile does on a GPU, checked on a CPU: with a compiled (not interpreted) kernel
    AOTAutograd inlines the triton_op into a triton_kernel_wrapper_functional node for Inductor
    to launch. Traced only (nothing can run without a GPU)."""
    out = run_without_interpreter(
        """
        import os
        os.environ["TRITON_INTERPRET"] = "0"
        import torch
        from torch._functorch.aot_autograd import aot_module_simplified
        from dimaskdino.ops import topk_select

        graphs = []

        def backend(gm, example_inputs):
            def record(graph, inputs):
                graphs.append(graph.code)
                return lambda *args: (_ for _ in ()).throw(RuntimeError("traced only"))
            return aot_module_simplified(gm, example_inputs, fw_compiler=record, bw_compiler=record)

        def fn(memory, *weights):
            return torch.ops.dimaskdino.class_max_scores(memory, *weights, 1e-5).topk(5, dim=1)

        d = 32
        args = (torch.randn(2, 40, d), torch.randn(7, d), torch.randn(7), torch.randn(d), torch.randn(d),
                torch.randn(d, d), torch.randn(d))
        try:
            torch.compile(fn, backend=backend, fullgraph=True)(*args)
        except RuntimeError as error:
            assert "traced only" in str(error), error
        print("GRAPHS", len(graphs), sum(g.count("triton_kernel_wrapper_functional(") for g in graphs))
        """
    )
    assert "GRAPHS 1 1" in out, out


def test_direct_op_call_checks_too(monkeypatch):
    """torch.ops.dimaskdino.class_max_scores skips the wrapper; the op still names the argument,
    and refuses to launch compiled kernels on a CPU."""
    a = _args()
    op = torch.ops.dimaskdino.class_max_scores
    with pytest.raises(ValueError, match="argument 'class_bias'"):
        op(a["memory"], a["class_weight"], a["class_bias"][:2], None, None, None, None, 1e-5)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        op(a["memory"], a["class_weight"], a["class_bias"], None, None, None, None, 1e-5)
