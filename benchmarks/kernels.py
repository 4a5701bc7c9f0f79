"""Measures every kernel against its baselines and writes the figures as JSON.

    python benchmarks/kernels.py [--ops msda,bato,topk,mask_loss] [--out DIR] [--reps N] [--compile primary|all|none] [--quick]

Method (GPU): every implementation is first checked against float64 (relative L2 error; a row
over its dtype's tolerance is marked incorrect and not timed), then timed with
triton.testing.do_bench (median, L2 flushed before every call) and once more as CUDA-graph
replays (do_bench_cudagraph: launch gaps removed; "-" where the implementation cannot be
captured). The same run measures the device's ceilings: the bandwidth of a large device-to-device
copy and the rate of a large bf16 matmul; rows give their bytes moved as % of that copy bandwidth
and, where counted, their FLOPs as % of that matmul rate. torch.compile rows (Inductor) only for
the first shape and dtype of each suite unless --compile all (each compile costs seconds to
minutes). On a CPU: host timers, median of --reps with min/max, reduced sizes.
Results go to --out (default outputs/kernels; committed results are only updated by passing
benchmarks/results on purpose) via benchmarks/provenance.write_result.

MSDA rows: the pure-PyTorch reference, torch.compile of the reference, our native kernel for the
device (C++ on CPU, CUDA on GPU) and, on a GPU, the original Deformable-DETR kernel (float32
and float64 only, as the original dispatches), built from .baseline/ by
benchmarks/baseline/deformable_detr.py (fetched and patched by
benchmarks/baseline/fetch_deformable_detr.sh; never committed). On a GPU the encoder shape of SPEC
(B=2, levels 128/64/32/16 so S=Q=21,760, H=8, D=32, P=4) and the decoder shape (Q=400); on a CPU
the same with every level 4x smaller per side (S=Q=1,360), so a run takes minutes, not hours.

Bandwidth: the floor is the bytes an ideal kernel must move (read value, locations, weights once,
write the output; for the backward also read the output gradient and write every input gradient),
and "% floor" is that floor's time at the measured copy bandwidth divided by the measured time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # an installed dimaskdino comes first
from dimaskdino import _extension  # noqa: E402
from dimaskdino.ops import ms_deform_attn, ms_deform_attn_ref  # noqa: E402

# Nominal peak DRAM bandwidth (GB/s) by device-name substring; else a measured copy bandwidth.
NOMINAL_BANDWIDTH_GBS = {"H100 SXM": 3350.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H200": 4800.0, "A100-SXM4-80GB": 2039.0}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


QUICK = False  # --quick: few repetitions (the GPU check's dry run tests the script, not speed)


def time_ms(fn, device: torch.device, reps: int, warmup: int = 3) -> dict:
    """GPU: do_bench median (L2 flushed before each call) with its 20/80% quantiles, and the median
    of CUDA-graph replays. CPU: median, min and max of `reps` host-timed calls."""
    if device.type == "cuda":
        import triton.testing

        rep_ms = 20 if QUICK else 100
        q20, median, q80 = triton.testing.do_bench(fn, warmup=10, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
        result = {"median_ms": median, "q20_ms": q20, "q80_ms": q80, "timer": "triton.testing.do_bench (L2 flushed)"}
        try:
            result["cudagraph_ms"] = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
        except Exception as error:  # e.g. a host sync inside: not capturable
            torch.cuda.synchronize()
            result["cudagraph_error"] = repr(error)[:200]
        return result
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples), "reps": reps,
            "timer": "host perf_counter"}


def measured_copy_bandwidth_gbs(device: torch.device) -> float:
    """Read+write bandwidth of a large device-to-device copy: the practical ceiling."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 24)
    src = torch.randn(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = time_ms(lambda: dst.copy_(src), device, reps=5)
    return 2 * src.numel() * 4 / (timing["median_ms"] * 1e-3) / 1e9


def measured_matmul_tflops(device: torch.device) -> tuple[float, str]:
    """Rate of a large matmul (bf16 on a GPU, float32 on a CPU): the arithmetic ceiling."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    timing = time_ms(lambda: a @ b, device, reps=3)
    return 2 * n**3 / (timing["median_ms"] * 1e-3) / 1e12, f"{str(dtype).removeprefix('torch.')} {n}x{n} matmul"


def peak_bandwidth(device: torch.device) -> tuple[float, str]:
    return measured_copy_bandwidth_gbs(device), "measured device-to-device copy (read + write)"


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double().to(got.device)
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def compiled(fn):
    """torch.compile(fn), or None under --compile none (the row is then left out)."""
    return None if COMPILE == "none" else torch.compile(fn)


def compile_rows_wanted(first_case: bool) -> bool:
    return COMPILE == "all" or (COMPILE == "primary" and first_case)


COMPILE = "primary"
MATMUL_TFLOPS = None  # measured at the start of a run


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for short in ("h200", "h100", "a100", "l40s", "l4"):
            if short in name:
                return short
        return name.replace(" ", "-")
    return "cpu"


# ---------------------------------------------------------------------------------------------
# MSDA


@dataclass
class MsdaShape:
    name: str
    batch: int
    levels: tuple[tuple[int, int], ...]
    queries: int
    heads: int = 8
    channels: int = 32
    points: int = 4

    @property
    def tokens(self) -> int:
        return sum(h * w for h, w in self.levels)


def msda_shapes(device: torch.device) -> list[MsdaShape]:
    side = 128 if device.type == "cuda" else (16 if QUICK else 32)
    levels = tuple((side >> i, side >> i) for i in range(4))
    tokens = sum(h * w for h, w in levels)
    return [MsdaShape("encoder", 2, levels, tokens), MsdaShape("decoder", 2, levels, 400)]


def msda_inputs(shape: MsdaShape, dtype: torch.dtype, device: torch.device):
    spatial_shapes = torch.tensor(shape.levels, dtype=torch.int64, device=device)
    sizes = spatial_shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(shape.batch, shape.tokens, shape.heads, shape.channels, device=device, dtype=dtype)
    loc = torch.rand(shape.batch, shape.queries, shape.heads, len(shape.levels), shape.points, 2, device=device)
    weights = torch.rand(shape.batch, shape.queries, shape.heads, len(shape.levels), shape.points, device=device).softmax(-1)
    return value, spatial_shapes, starts, loc, weights


def msda_floor_bytes(shape: MsdaShape, dtype: torch.dtype, backward: bool) -> int:
    elem = torch.finfo(dtype).bits // 8
    value = shape.batch * shape.tokens * shape.heads * shape.channels * elem
    points = shape.batch * shape.queries * shape.heads * len(shape.levels) * shape.points
    loc_weights = points * 3 * 4
    out = shape.batch * shape.queries * shape.heads * shape.channels * elem
    forward = value + loc_weights + out
    # backward: read grad_out, value, loc, weights; write grad_value, grad_loc, grad_weights
    return forward + (out + value + loc_weights + value + loc_weights if backward else 0)


def original_msda():
    """The original Deformable-DETR kernel's forward/backward as a callable (GPU only: it has no CPU
    kernel), or None with a note."""
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent / "baseline"))
        import deformable_detr

        original = deformable_detr.load()
    except Exception as error:  # not fetched, or no compiler: no row, said once
        print(f"note: no deformable-detr row: {repr(error)[:300]}")
        return None

    class OriginalFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, shapes, starts, loc, weights):
            ctx.save_for_backward(value, shapes, starts, loc, weights)
            return original.ms_deform_attn_forward(value, shapes, starts, loc, weights, 64)

        @staticmethod
        def backward(ctx, grad):
            value, shapes, starts, loc, weights = ctx.saved_tensors
            gv, gl, gw = original.ms_deform_attn_backward(value, shapes, starts, loc, weights, grad.contiguous(), 64)
            return gv, None, None, gl, gw

    return OriginalFunction.apply


def msda_implementations(device: torch.device, dtype: torch.dtype, shape: MsdaShape, first_case: bool) -> dict:
    static_shapes = [tuple(level) for level in shape.levels]
    impls = {"reference": lambda v, s, i, l, w: ms_deform_attn_ref(v, s, i, l, w)}
    if compile_rows_wanted(first_case):
        impls["reference+compile"] = torch.compile(lambda v, s, i, l, w: ms_deform_attn_ref(v, static_shapes, i, l, w))
    if _extension.native_available("dimaskdino::ms_deform_attn", device.type):
        impls[f"dimaskdino-{device.type}"] = lambda v, s, i, l, w: ms_deform_attn(v, s, i, l, w, impl=device.type)
    else:
        print(f"note: no native {device.type} kernel: {_extension.why_unavailable(device.type)}")
    original = _ORIGINAL.setdefault("msda", original_msda()) if device.type == "cuda" else None
    if original is not None and dtype in (torch.float32, torch.float64):  # AT_DISPATCH_FLOATING_TYPES
        # The original kernel wants every input in value's dtype.
        impls["deformable-detr"] = lambda v, s, i, l, w: original(v, s, i, l.to(v.dtype), w.to(v.dtype))
    return impls


_ORIGINAL: dict = {}


def msda_expected(inputs, grad):
    """float64 output and gradients (value, locations, weights) of the reference."""
    value, ss, starts, loc, weights = [t.detach() for t in inputs]
    leaves = [t.double().requires_grad_() for t in (value, loc, weights)]
    out = ms_deform_attn_ref(leaves[0], ss, starts, leaves[1], leaves[2])
    return [out.detach(), *torch.autograd.grad(out, leaves, grad.double())]


def bench_msda(device: torch.device, reps: int, peak_gbs: float) -> list[dict]:
    dtypes = [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]
    rows = []
    for shape_index, shape in enumerate(msda_shapes(device)):
        for dtype_index, dtype in enumerate(dtypes):
            inputs = msda_inputs(shape, dtype, device)
            impls = msda_implementations(device, dtype, shape, shape_index == 0 and dtype_index == 0)
            check_grad = torch.randn(shape.batch, shape.queries, shape.heads * shape.channels, device=device)
            expected = msda_expected(inputs, check_grad)
            errors = {}
            for impl_name, fn in impls.items():  # correctness of every implementation before any timing
                value, ss, starts, loc, weights = [t.detach().clone() for t in inputs]
                leaves = [value.requires_grad_(), loc.requires_grad_(), weights.requires_grad_()]
                try:
                    out = fn(value, ss, starts, loc, weights)
                    got = [out, *torch.autograd.grad(out, leaves, check_grad.to(out.dtype))]
                    errors[impl_name] = {name: relative_error(g, e) for name, g, e in
                                         zip(("output", "grad_value", "grad_loc", "grad_weights"), got, expected)}
                except Exception as error:
                    errors[impl_name] = {"error": repr(error)[:300]}
            for mode in ("forward", "forward+backward"):
                backward = mode != "forward"
                floor_bytes = msda_floor_bytes(shape, dtype, backward)
                reference_ms = None
                for impl_name, fn in impls.items():
                    error = errors[impl_name]
                    if "error" in error or max(error.values()) > TOLERANCE[dtype]:
                        rows.append(dict(op="msda", shape=asdict(shape), dtype=str(dtype), mode=mode, impl=impl_name,
                                         incorrect=True, relative_error_vs_float64=error))
                        print(f"{shape.name:8s} {str(dtype):15s} {mode:17s} {impl_name:20s} NOT TIMED: {error}")
                        continue
                    value, ss, starts, loc, weights = [t.detach().clone() for t in inputs]
                    if backward:
                        for t in (value, loc, weights):
                            t.requires_grad_()
                        grad = torch.randn(shape.batch, shape.queries, shape.heads * shape.channels, device=device, dtype=dtype)

                        def run(fn=fn, value=value, ss=ss, starts=starts, loc=loc, weights=weights, grad=grad):
                            out = fn(value, ss, starts, loc, weights)
                            torch.autograd.grad(out, (value, loc, weights), grad)
                    else:

                        def run(fn=fn, value=value, ss=ss, starts=starts, loc=loc, weights=weights):
                            with torch.no_grad():
                                fn(value, ss, starts, loc, weights)

                    try:
                        timing = time_ms(run, device, reps)
                    except Exception as error:  # a baseline that cannot run this case is a row, not a crash
                        rows.append(dict(op="msda", shape=asdict(shape), dtype=str(dtype), mode=mode, impl=impl_name, error=repr(error)[:300]))
                        print(f"{shape.name:8s} {str(dtype):15s} {mode:17s} {impl_name:20s} failed: {repr(error)[:120]}")
                        continue
                    ms = timing["median_ms"]
                    if impl_name == "reference":
                        reference_ms = ms
                    achieved_gbs = floor_bytes / (ms * 1e-3) / 1e9
                    row = dict(
                        op="msda", shape=asdict(shape), dtype=str(dtype), mode=mode, impl=impl_name, **timing,
                        relative_error_vs_float64=error,
                        floor_bytes=floor_bytes, achieved_gbs=achieved_gbs, pct_of_floor=100 * achieved_gbs / peak_gbs,
                        speedup_vs_reference=(reference_ms / ms) if reference_ms else None,
                    )
                    rows.append(row)
                    speedup = f"{row['speedup_vs_reference']:7.2f}x" if row["speedup_vs_reference"] else "      -"
                    print(
                        f"{shape.name:8s} {str(dtype):15s} {mode:17s} {impl_name:20s} {ms:10.3f} ms "
                        f"{achieved_gbs:9.1f} GB/s {row['pct_of_floor']:6.1f}% floor {speedup}"
                    )
    return rows


# ---------------------------------------------------------------------------------------------
# BATO attention (dimaskdino.ops.bato_attention)


def _bato_topk_row(op, shape, dtype, mode, impl_name, timing, floor_bytes, flops, peak_gbs, reference_ms, extra):
    ms = timing["median_ms"]
    achieved_gbs = floor_bytes / (ms * 1e-3) / 1e9
    row = dict(
        op=op, shape=shape, dtype=str(dtype), mode=mode, impl=impl_name, **timing,
        floor_bytes=floor_bytes, achieved_gbs=achieved_gbs, pct_of_floor=100 * achieved_gbs / peak_gbs,
        flops=flops, achieved_tflops=flops / (ms * 1e-3) / 1e12,
        pct_of_matmul=100 * flops / (ms * 1e-3) / 1e12 / MATMUL_TFLOPS if MATMUL_TFLOPS else None,
        speedup_vs_reference=(reference_ms / ms) if reference_ms else None, **extra,
    )
    speedup = f"{row['speedup_vs_reference']:7.2f}x" if row["speedup_vs_reference"] else "      -"
    print(
        f"{shape['name']:8s} {str(dtype):15s} {mode:17s} {impl_name:22s} {ms:10.3f} ms "
        f"{achieved_gbs:9.1f} GB/s {row['pct_of_floor']:6.1f}% floor {row['achieved_tflops']:7.2f} TFLOP/s {speedup}"
    )
    return row


def bench_bato(device: torch.device, reps: int, peak_gbs: float) -> list[dict]:
    """BATO attention (SPEC section 4): S queries = every encoder token, K = 50 guiding tokens,
    H = 8, D = 32; q laid out as the model makes it ((B, S, H, D) viewed as (B, H, S, D)).
    Rows: the plain-PyTorch reference, torch.compile of it, every SDPA backend forced through
    sdpa_kernel (a backend that refuses the case is an error row), and the Triton kernel (GPU only:
    on a CPU it would be the interpreter). Floor: read q, k, v and write the output once (backward:
    also read dO and write dq, dk, dv); FLOPs: 4*B*H*S*K*D forward (two GEMMs), 8x that for the
    backward's four GEMMs plus its recomputation of q k^T."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dimaskdino.ops import bato_attention, bato_attention_ref
    from dimaskdino.ops._triton import triton_status

    gpu = device.type == "cuda"
    shape = dict(name="bato", batch=2, seq=21_760 if gpu else (340 if QUICK else 1_360), keys=50, heads=8, head_dim=32,
                 layout="q = (B, S, H, D).transpose(1, 2)")
    batch, seq, keys, heads, dim = shape["batch"], shape["seq"], shape["keys"], shape["heads"], shape["head_dim"]
    dtype = torch.bfloat16 if gpu else torch.float32
    elem = torch.finfo(dtype).bits // 8

    def sdpa(backend):
        def fn(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        return fn

    impls = {
        "reference": bato_attention_ref,
        "reference+compile": compiled(bato_attention_ref),
        "sdpa-math": sdpa(SDPBackend.MATH),
        "sdpa-efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
    }
    status = triton_status("bato_attention", device.type)
    if status == "compiled":
        impls["dimaskdino-triton"] = lambda q, k, v: bato_attention(q, k, v, impl="triton")
    else:
        print(f"note: no Triton row for bato on {device.type}: {status}")

    q_data = torch.randn(batch, seq, heads, dim, device=device, dtype=dtype).transpose(1, 2)
    k_data = torch.randn(batch, heads, keys, dim, device=device, dtype=dtype)
    v_data = torch.randn(batch, heads, keys, dim, device=device, dtype=dtype)
    grad = torch.randn(batch, heads, seq, dim, device=device, dtype=dtype)
    with torch.no_grad():
        expected = bato_attention_ref(q_data.double(), k_data.double(), v_data.double())
    q_bytes = batch * heads * seq * dim * elem
    kv_bytes = 2 * batch * heads * keys * dim * elem
    forward_flops = 4 * batch * heads * seq * keys * dim
    rows = []
    for mode in ("forward", "forward+backward"):
        backward = mode != "forward"
        # forward: read q, k, v, write out; backward: read q, dO, k, v, write dq, dk, dv
        floor_bytes = 2 * q_bytes + kv_bytes + ((3 * q_bytes + 2 * kv_bytes) if backward else 0)
        flops = forward_flops * (1 + 2.5 if backward else 1)
        reference_ms = None
        for impl_name, fn in impls.items():
            if fn is None:
                continue
            q, k, v = [t.detach().clone() for t in (q_data, k_data, v_data)]
            if backward:
                for t in (q, k, v):
                    t.requires_grad_()

                def run(fn=fn, q=q, k=k, v=v):
                    torch.autograd.grad(fn(q, k, v), (q, k, v), grad)
            else:

                def run(fn=fn, q=q, k=k, v=v):
                    with torch.no_grad():
                        return fn(q, k, v)

            try:
                with torch.no_grad():
                    error = (fn(q, k, v).double() - expected).abs().max().item()
                    relative = relative_error(fn(q, k, v), expected)
                if relative > TOLERANCE[dtype]:  # correctness before any timing
                    rows.append(dict(op="bato", shape=shape, dtype=str(dtype), mode=mode, impl=impl_name, incorrect=True,
                                     relative_error_vs_float64=relative))
                    print(f"{shape['name']:8s} {str(dtype):15s} {mode:17s} {impl_name:22s} NOT TIMED: rel. error {relative:.2e}")
                    continue
                timing = time_ms(run, device, reps)
            except Exception as exc:  # a backend that refuses the case is a row, not a crash
                rows.append(dict(op="bato", shape=shape, dtype=str(dtype), mode=mode, impl=impl_name, error=repr(exc)[:300]))
                print(f"{shape['name']:8s} {str(dtype):15s} {mode:17s} {impl_name:22s} failed: {repr(exc)[:120]}")
                continue
            if impl_name == "reference":
                reference_ms = timing["median_ms"]
            rows.append(_bato_topk_row("bato", shape, dtype, mode, impl_name, timing, floor_bytes, flops, peak_gbs,
                                               reference_ms, dict(max_abs_err_vs_float64=error)))
    return rows


# ---------------------------------------------------------------------------------------------
# Fused top-k selection (dimaskdino.ops.topk_select)


def bench_topk(device: torch.device, reps: int, peak_gbs: float) -> list[dict]:
    """Top-k token selection (SPEC sections 2-3): "first" = LayerNorm(Linear(memory)) -> class
    Linear -> row max -> top-600 of S encoder tokens; "second" = class Linear -> row max -> top-300
    of the 600 TI tokens (no projection). Memory and weights in bf16 on a GPU (FSDP's mixed
    precision), fp32 on a CPU (S reduced to 1,360). Rows: the reference, torch.compile of it, the
    Triton kernel + torch.topk (GPU only). Floor: read memory and the weights once, write S scores
    and the k outputs; FLOPs: 2*B*S*d*(d + C) with the projection, 2*B*S*d*C without.
    `index_overlap` = fraction of the reference's indices that an implementation also picked."""
    from dimaskdino.ops import topk_select, topk_select_ref
    from dimaskdino.ops._triton import triton_status

    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    elem = torch.finfo(dtype).bits // 8
    dim, classes = 256, 80
    shapes = [
        dict(name="first", batch=2, seq=21_760 if gpu else (680 if QUICK else 1_360), dim=dim, classes=classes, k=600, proj=True),
        dict(name="second", batch=2, seq=600, dim=dim, classes=classes, k=300, proj=False),
    ]
    impls = {
        "reference": topk_select_ref,
        "reference+compile": compiled(topk_select_ref),
    }
    status = triton_status("topk_select", device.type)
    if status == "compiled":
        impls["dimaskdino-triton"] = lambda *args: topk_select(*args, impl="triton")
    else:
        print(f"note: no Triton row for topk on {device.type}: {status}")

    rows = []
    for shape in shapes:
        batch, seq, k = shape["batch"], shape["seq"], shape["k"]
        memory = torch.randn(batch, seq, dim, device=device, dtype=dtype)

        def weight(*size, scale=1.0):
            return (torch.randn(*size, device=device) * scale).to(dtype)

        cls_w, cls_b = weight(classes, dim, scale=dim ** -0.5), weight(classes)
        if shape["proj"]:
            proj = (1 + weight(dim, scale=0.2), weight(dim, scale=0.2), weight(dim, dim, scale=dim ** -0.5), weight(dim))
        else:
            proj = (None, None, None, None)
        args = (memory, *proj, cls_w, cls_b, k)
        weight_bytes = sum(t.numel() for t in (*proj, cls_w, cls_b) if t is not None) * elem
        floor_bytes = batch * seq * dim * elem + weight_bytes + batch * seq * 4 + batch * k * (4 + 8)
        flops = 2 * batch * seq * dim * ((dim if shape["proj"] else 0) + classes)
        _, expected = topk_select_ref(*args)
        scores64 = topk_scores_float64(args)
        reference_ms = None
        for impl_name, fn in impls.items():
            if fn is None:
                continue
            try:  # correctness against float64 before any timing
                scores, indices = fn(*args)
                error = topk_error_vs_float64(scores, indices, scores64, k)
                overlap = sum(
                    len(set(indices[b].tolist()) & set(expected[b].tolist())) for b in range(batch)
                ) / max(1, batch * k)
            except Exception as exc:
                rows.append(dict(op="topk", shape=shape, dtype=str(dtype), mode="forward", impl=impl_name, error=repr(exc)[:300]))
                print(f"{shape['name']:8s} {str(dtype):15s} {'forward':17s} {impl_name:22s} failed: {repr(exc)[:120]}")
                continue
            if max(error.values()) > TOLERANCE[dtype]:
                rows.append(dict(op="topk", shape=shape, dtype=str(dtype), mode="forward", impl=impl_name,
                                 incorrect=True, relative_error_vs_float64=error))
                print(f"{shape['name']:8s} {str(dtype):15s} {'forward':17s} {impl_name:22s} NOT TIMED: {error}")
                continue
            try:
                timing = time_ms(lambda fn=fn: fn(*args), device, reps)
            except Exception as exc:
                rows.append(dict(op="topk", shape=shape, dtype=str(dtype), mode="forward", impl=impl_name, error=repr(exc)[:300]))
                print(f"{shape['name']:8s} {str(dtype):15s} {'forward':17s} {impl_name:22s} failed: {repr(exc)[:120]}")
                continue
            if impl_name == "reference":
                reference_ms = timing["median_ms"]
            rows.append(_bato_topk_row("topk", shape, dtype, "forward", impl_name, timing, floor_bytes, flops, peak_gbs,
                                       reference_ms, dict(index_overlap=overlap, relative_error_vs_float64=error)))
    return rows


def topk_scores_float64(args) -> torch.Tensor:
    """(B, S) float64 score of every token: the reference on float64 copies of the inputs."""
    from dimaskdino.ops import topk_select_ref

    memory, *weights, k = args
    args64 = [memory.double(), *(None if w is None else w.double() for w in weights)]
    top, index = topk_select_ref(*args64, memory.shape[1])
    return torch.empty_like(top).scatter_(1, index, top)


def topk_error_vs_float64(scores: torch.Tensor, indices: torch.Tensor, scores64: torch.Tensor, k: int) -> dict:
    """Errors of a top-k selection against float64, relative to max(|score|, 1). "selection": the
    float64 scores of the picked tokens, sorted, against the true float64 top-k (near-ties may swap
    tokens, never a token much worse than the k-th); "scores": the scores returned against the
    float64 scores of the same tokens; "duplicates": 1 when a token is picked twice."""
    at_picked = scores64.gather(1, indices.long())
    picked = at_picked.sort(dim=1, descending=True).values
    best = scores64.topk(k, dim=1).values
    duplicates = float(any(len(set(row.tolist())) != k for row in indices))
    return {"selection": ((picked - best).abs() / best.abs().clamp(min=1)).max().item(),
            "scores": ((scores.double() - at_picked).abs() / at_picked.abs().clamp(min=1)).max().item(),
            "duplicates": duplicates}


# ---------------------------------------------------------------------------------------------
# Point-sampled mask matching cost and mask loss (dimaskdino.ops.mask_loss)


class _LargestTensor:
    """The largest tensor (bytes) any aten op returns while active: a device-independent memory
    figure (views count at their own size). Used on a CPU; a GPU row reports peak allocated memory."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        recorder = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for leaf in torch.utils._pytree.tree_leaves(out):
                    if isinstance(leaf, torch.Tensor):
                        size = leaf.numel() * leaf.element_size()
                        if size > recorder.bytes:
                            recorder.bytes, recorder.shape = size, tuple(leaf.shape)
                return out

        self.bytes, self.shape, self.mode = 0, (), Mode()


def _memory_figures(run, device: torch.device) -> dict:
    """Peak memory above the live tensors (GPU) and the largest tensor made (any device)."""
    figures = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        figures["peak_extra_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    largest = _LargestTensor()
    with largest.mode:
        run()
    figures["largest_tensor_mb"] = largest.bytes / 2**20
    figures["largest_tensor_shape"] = list(largest.shape)
    return figures


def bench_mask_loss(device: torch.device, reps: int, peak_gbs: float) -> list[dict]:
    """Mask terms of matching and of the loss for every matched output of a step: interm (600
    queries), init and 6 decoder layers (300), B = 2, d = 256, 20 GT per image; init/dec0/interm
    read the original mask features, dec1..5 BATO's (SPEC section 4). GPU: masks 256 x 256 (a 1024
    input), 12,544 points, bf16 embeddings and features (autocast); CPU: masks 64 x 64 and 784
    points (the same points per pixel), float32.

    "matcher cost" (no gradient): mean BCE + dice costs (B, Q, 20) of every output at the image's
    shared uniform points. reference = today's path: the (B, Q, H, W) logits the model makes
    (einsum, timed here since the fused path does not make them) + grid_sample at the points +
    the GEMM reductions; reference+compile = torch.compile of it; fused-pytorch = the PyTorch
    linear path (features sampled once per distinct features tensor, one bmm to (B, Q, P),
    reductions: what impl=auto runs without a GPU); fused-triton = the Triton kernel (never writes
    (Q, P); GPU only: on a CPU it would be the interpreter).
    "mask loss fwd+bwd": the 20 matched pairs per image of every output: matched logits,
    uncertainty sampling (3x candidates, 75 % most uncertain + 25 % uniform), BCE + dice, backward
    to the embeddings and the features. reference = (B, Q, H, W) einsum + gather of the matched
    maps + grid_sample + BCE/dice (today's criterion); fused = matched maps only (one GEMM per
    image) + dimaskdino.ops.point_mask_loss (ref: grid_sample + PyTorch BCE/dice; triton: fused
    sampling + reductions, atomics backward). GT point values are fixed random numbers (their
    sampling is the same in every row and not timed).
    Memory: "largest_tensor_mb" (every device) and, on a GPU, "peak_extra_mb" (peak allocated
    above the inputs). max_rel_err: matcher costs against the reference's, |diff| / max(|ref|, 1e-3)."""
    from dimaskdino.model.matcher import HungarianMatcher
    from dimaskdino.model.point_sample import point_sample, uncertainty_points
    from dimaskdino.ops import matched_mask_logits, point_mask_loss
    from dimaskdino.ops._triton import triton_status

    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    side, num_points = (256, 12_544) if gpu else (64, 784)
    batch, queries, interm_queries, layers, dim, num_gt = 2, 300, 600, 6, 256, 20
    if QUICK and not gpu:  # the dry run tests the script: a tenth of the work
        side, num_points, layers = 32, 196, 1
    shape = dict(name="mask_loss", batch=batch, queries=queries, interm_queries=interm_queries, decoder_layers=layers,
                 dim=dim, mask=[side, side], points=num_points, gt_per_image=num_gt, outputs=2 + layers)

    g = torch.Generator(device=device).manual_seed(0)
    scale = dim ** -0.25

    def randn(*size):
        return (torch.randn(*size, device=device, generator=g) * scale).to(dtype)

    features = [randn(batch, dim, side, side), randn(batch, dim, side, side)]  # original, BATO-updated
    outputs = {"interm": (interm_queries, 0), "init": (queries, 0), "dec0": (queries, 0)}
    outputs.update({f"dec{i}": (queries, 1) for i in range(1, layers)})
    embeds = {name: randn(batch, count, dim) for name, (count, _) in outputs.items()}
    feature_of = {name: features[which] for name, (_, which) in outputs.items()}
    points = torch.rand(batch, num_points, 2, device=device, generator=g)
    gt_values = (torch.rand(batch, num_gt, num_points, device=device, generator=g) > 0.5).float()
    rows = [num_gt] * batch
    src = {name: torch.cat([torch.randperm(count, device=device, generator=g)[:num_gt] for _ in range(batch)])
           for name, (count, _) in outputs.items()}
    batch_idx = torch.arange(batch, device=device).repeat_interleave(num_gt)
    loss_targets = torch.rand(batch * num_gt, num_points, device=device, generator=g)
    matcher = HungarianMatcher(4.0, 5.0, 2.0, 5.0, 5.0, num_points, 0.25, 2.0)

    def matcher_reference(embeds, features):
        costs = []
        for name, e in embeds.items():
            pred = {"masks": torch.einsum("bqc,bchw->bqhw", e, features[name])}
            wide = e.dtype == torch.float64  # the float64 check
            costs.append(matcher.mask_costs(pred, points.double() if wide else points, gt_values.to(e.dtype) if wide else gt_values))
        return costs

    def matcher_fused(impl):
        def fn(embeds, features):
            matcher.impl = impl
            matcher._point_features = {}  # as in HungarianMatcher.cost_matrices: sample each features tensor once
            try:
                return [matcher.mask_costs({"mask_embed": e, "mask_features": features[name]}, points, gt_values)
                        for name, e in embeds.items()]
            finally:
                matcher._point_features = None
        return fn

    def dice_bce(logits, targets):
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum()
        prob = logits.sigmoid()
        dice = (1.0 - (2.0 * (prob * targets).sum(-1) + 1.0) / (prob.sum(-1) + targets.sum(-1) + 1.0)).sum()
        return bce + dice

    def sampled_points(name, matched):
        return uncertainty_points(matched.detach(), num_points, 3.0, 0.75, rows_per_image=rows)

    def loss_reference(embeds, features, points_for=sampled_points):
        total = 0.0
        for name, e in embeds.items():
            masks = torch.einsum("bqc,bchw->bqhw", e, features[name])
            matched = masks[batch_idx, src[name]]
            matched = matched.float() if matched.dtype != torch.float64 else matched
            pts = points_for(name, matched).to(matched.dtype)
            total = total + dice_bce(point_sample(matched.unsqueeze(1), pts).squeeze(1), loss_targets.to(matched.dtype))
        return total

    def loss_fused(impl):
        def fn(embeds, features, points_for=sampled_points):
            total = 0.0
            for name, e in embeds.items():
                matched = matched_mask_logits(e, features[name], src[name], rows).float()
                bce, dice = point_mask_loss(matched, points_for(name, matched), loss_targets, impl=impl)
                total = total + bce.sum() + dice.sum()
            return total
        return fn

    status = triton_status("mask_loss", device.type)
    modes = {
        "matcher cost": {"reference": matcher_reference, "reference+compile": compiled(matcher_reference),
                         "fused-pytorch": matcher_fused("ref")},
        "mask loss fwd+bwd": {"reference": loss_reference, "reference+compile": compiled(loss_reference),
                              "fused-pytorch": loss_fused("ref")},
    }
    if status == "compiled":
        modes["matcher cost"]["fused-triton"] = matcher_fused("triton")
        modes["mask loss fwd+bwd"]["fused-triton"] = loss_fused("triton")
    else:
        print(f"note: no Triton rows for mask_loss on {device.type}: {status}")

    with torch.no_grad():
        expected = matcher_reference(embeds, feature_of)
    errors = mask_loss_errors_vs_float64(modes, embeds, features, outputs, matcher_reference, loss_reference,
                                         sampled_points, batch_idx, src)
    rows_out = []
    for mode, impls in modes.items():
        backward = mode != "matcher cost"
        reference_ms = None
        for impl_name, fn in impls.items():
            if fn is None:
                continue
            error = errors[mode][impl_name]
            if "error" in error or max(error.values()) > TOLERANCE[dtype]:
                rows_out.append(dict(op="mask_loss", shape=shape, dtype=str(dtype), mode=mode, impl=impl_name,
                                     incorrect=True, relative_error_vs_float64=error))
                print(f"{'mask_loss':9s} {str(dtype):15s} {mode:18s} {impl_name:18s} NOT TIMED: {error}")
                continue
            leaves = {name: e.detach().clone().requires_grad_(backward) for name, e in embeds.items()}
            feats = [f.detach().clone().requires_grad_(backward) for f in features]
            leaf_features = {name: feats[which] for name, (_, which) in outputs.items()}
            if backward:
                def run(fn=fn, leaves=leaves, leaf_features=leaf_features, feats=feats):
                    torch.autograd.grad(fn(leaves, leaf_features), [*leaves.values(), *feats], allow_unused=True)
            else:
                def run(fn=fn, leaves=leaves, leaf_features=leaf_features):
                    with torch.no_grad():
                        return fn(leaves, leaf_features)
            try:
                extra = {"relative_error_vs_float64": error}
                if not backward:
                    got = run()
                    extra["max_rel_err"] = max(
                        ((a.double() - b.double()).abs() / b.double().abs().clamp(min=1e-3)).max().item()
                        for pair_got, pair_want in zip(got, expected) for a, b in zip(pair_got, pair_want))
                timing = time_ms(run, device, reps)
                extra.update(_memory_figures(run, device))
            except Exception as exc:  # a baseline that cannot run this case is a row, not a crash
                rows_out.append(dict(op="mask_loss", shape=shape, dtype=str(dtype), mode=mode, impl=impl_name, error=repr(exc)[:300]))
                print(f"{'mask_loss':9s} {str(dtype):15s} {mode:18s} {impl_name:18s} failed: {repr(exc)[:120]}")
                continue
            ms = timing["median_ms"]
            if impl_name == "reference":
                reference_ms = ms
            row = dict(op="mask_loss", shape=shape, dtype=str(dtype), mode=mode, impl=impl_name, **timing,
                       speedup_vs_reference=(reference_ms / ms) if reference_ms else None, **extra)
            rows_out.append(row)
            speedup = f"{row['speedup_vs_reference']:7.2f}x" if row["speedup_vs_reference"] else "      -"
            memory = f"largest {row['largest_tensor_mb']:8.1f} MB {str(tuple(row['largest_tensor_shape'])):22s}"
            if "peak_extra_mb" in row:
                memory += f" peak +{row['peak_extra_mb']:8.1f} MB"
            err = f" rel err {row['max_rel_err']:.1e}" if "max_rel_err" in row else ""
            print(f"{'mask_loss':9s} {str(dtype):15s} {mode:18s} {impl_name:18s} {ms:10.3f} ms {speedup} {memory}{err}")
    return rows_out


def mask_loss_errors_vs_float64(modes, embeds, features, outputs, matcher_reference, loss_reference, sampled_points,
                                batch_idx, src) -> dict:
    """{mode: {impl: relative L2 errors against float64}} for bench_mask_loss, before any timing.
    Matcher costs: every output's BCE and dice costs against the reference on float64 copies. Loss:
    the loss and its gradients (embeddings, both feature maps) against the float64 reference, all
    at the same points (uncertainty points drawn once from the float64 logits, rounded to float32),
    since points drawn from each implementation's own logits would differ where |logit| ties."""
    embeds64 = {name: e.double() for name, e in embeds.items()}
    features64 = [f.double() for f in features]
    feature_of64 = {name: features64[which] for name, (_, which) in outputs.items()}
    with torch.no_grad():
        costs64 = matcher_reference(embeds64, feature_of64)
        fixed = {}
        for name, e in embeds64.items():
            matched = torch.einsum("bqc,bchw->bqhw", e, feature_of64[name])[batch_idx, src[name]]
            fixed[name] = sampled_points(name, matched).float()

    def fixed_points(name, matched):
        return fixed[name]

    def loss_and_grads(fn, dtype_embeds, dtype_features):
        leaves = {name: e.detach().clone().requires_grad_(True) for name, e in dtype_embeds.items()}
        feats = [f.detach().clone().requires_grad_(True) for f in dtype_features]
        leaf_features = {name: feats[which] for name, (_, which) in outputs.items()}
        loss = fn(leaves, leaf_features, fixed_points)
        grads = torch.autograd.grad(loss, [*leaves.values(), *feats], allow_unused=True)  # --quick: one feature map unused
        return loss.detach(), torch.cat([g.flatten() for g in grads[:len(leaves)]]), grads[len(leaves):]

    loss64, grad_embeds64, grad_features64 = loss_and_grads(loss_reference, embeds64, features64)
    feature_of = {name: features[which] for name, (_, which) in outputs.items()}
    errors: dict = {}
    for mode, impls in modes.items():
        errors[mode] = {}
        for impl_name, fn in impls.items():
            try:
                if mode == "matcher cost":
                    with torch.no_grad():
                        costs = fn(embeds, feature_of)
                    errors[mode][impl_name] = {
                        "bce_cost": max(relative_error(got[0], want[0]) for got, want in zip(costs, costs64)),
                        "dice_cost": max(relative_error(got[1], want[1]) for got, want in zip(costs, costs64))}
                else:
                    loss, grad_embeds, grad_features = loss_and_grads(fn, embeds, features)
                    errors[mode][impl_name] = {
                        "loss": relative_error(loss, loss64), "grad_embeddings": relative_error(grad_embeds, grad_embeds64),
                        **{f"grad_features{i}": relative_error(g, w) for i, (g, w) in enumerate(zip(grad_features, grad_features64))
                           if w is not None}}
            except Exception as error:
                errors[mode][impl_name] = {"error": repr(error)[:300]}
    return errors


SUITES = {
    "msda": bench_msda,
    "bato": bench_bato,
    "topk": bench_topk,
    "mask_loss": bench_mask_loss,
}


def main(argv=None) -> None:
    global COMPILE, MATMUL_TFLOPS, QUICK
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(SUITES), help=f"comma-separated subset of {sorted(SUITES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=None, help="CPU: timed repetitions (default 5)")
    parser.add_argument("--compile", choices=("primary", "all", "none"), default=None,
                        help="torch.compile rows: first shape and dtype of each suite (default), every case, or none")
    parser.add_argument("--quick", action="store_true", help="few repetitions, no compile rows: tests the script")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "outputs" / "kernels"),
                        help="result folder (committed results: pass benchmarks/results on purpose)")
    args = parser.parse_args(argv)
    QUICK = args.quick
    COMPILE = args.compile or ("none" if args.quick else "primary")
    device = torch.device(args.device)
    reps = args.reps or (2 if args.quick else 5)
    peak_gbs, peak_source = peak_bandwidth(device)
    MATMUL_TFLOPS, matmul_source = measured_matmul_tflops(device)
    print(f"device: {device_description(device)}; copy bandwidth {peak_gbs:.0f} GB/s ({peak_source}); "
          f"matmul {MATMUL_TFLOPS:.1f} TFLOP/s ({matmul_source}); compile rows: {COMPILE}")
    header = dict(device_type=device.type, copy_bandwidth_gbs=peak_gbs, copy_bandwidth_source=peak_source,
                  matmul_tflops=MATMUL_TFLOPS, matmul_source=matmul_source, compile_rows=COMPILE, quick=QUICK,
                  reps=reps if device.type != "cuda" else "do_bench")
    from benchmarks.provenance import write_result

    for op in args.ops.split(","):
        if op not in SUITES:
            raise SystemExit(f"--ops: unknown op {op!r}; choose from {sorted(SUITES)}")
        rows = SUITES[op](device, reps, peak_gbs)
        path = write_result(args.out, f"{device_slug(device)}-{op}.json", dict(header, op=op, rows=rows),
                            device=device if device.type == "cuda" else None)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
