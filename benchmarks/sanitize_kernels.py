"""Every project kernel once, forward and backward, on small awkward shapes, checked against the
float64 reference: the program compute-sanitizer runs in the GPU check.

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitize_kernels.py
    python benchmarks/sanitize_kernels.py --device cpu   # dry run: C++ CPU kernel, Triton interpreter

Small shapes keep memcheck (which slows kernels by 10-100x) within seconds and still hit the
edges: odd sizes, non-square levels, points outside the map, partial blocks. Exit status 1 when a
result differs from the float64 reference by more than its dtype allows (relative L2 error).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

# (GPU, dry run on the CPU): the interpreter runs Triton kernels about 1,000x slower.
SIZES = {"cuda": dict(queries=37, seq=301, topk_seq=333, points=1000, rows=7),
         "cpu": dict(queries=11, seq=45, topk_seq=37, points=150, rows=3)}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def check(name: str, dtype: torch.dtype, pairs: list[tuple[str, torch.Tensor, torch.Tensor]], failures: list[str]) -> None:
    for what, out, ref in pairs:
        error = relative_error(out, ref)
        ok = bool(torch.isfinite(out).all()) and error <= TOLERANCE[dtype]
        print(f"{name:28s} {str(dtype):15s} {what:12s} rel. error {error:.2e} {'ok' if ok else 'FAILED'}", flush=True)
        if not ok:
            failures.append(f"{name} {dtype} {what}: {error:.2e}")


def grads(out: torch.Tensor, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, grad_out.to(out.dtype)))


def msda(device, dtype, impl, failures):
    from dimaskdino.ops import ms_deform_attn, ms_deform_attn_ref

    levels = [(9, 13), (5, 7), (3, 4), (1, 2)]
    shapes = torch.tensor(levels, dtype=torch.int64, device=device)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    tokens, batch, queries, heads, dim, points = sum(h * w for h, w in levels), 2, SIZES[device.type]['queries'], 8, 32, 4
    value = torch.randn(batch, tokens, heads, dim, device=device)
    loc = torch.rand(batch, queries, heads, len(levels), points, 2, device=device) * 1.2 - 0.1  # some outside
    weights = torch.rand(batch, queries, heads, len(levels), points, device=device)
    grad_out = torch.randn(batch, queries, heads * dim, device=device)
    inputs = [t.to(dtype if t is value else torch.float32).requires_grad_() for t in (value, loc, weights)]
    out = ms_deform_attn(inputs[0], shapes, starts, inputs[1], inputs[2], impl=impl)
    got = grads(out, inputs, grad_out)
    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in inputs]
    ref = ms_deform_attn_ref(ref_inputs[0], shapes.cpu(), starts.cpu(), ref_inputs[1], ref_inputs[2])
    ref_grads = grads(ref, ref_inputs, grad_out.double().cpu())
    check("ms_deform_attn", dtype, [("forward", out, ref), *[(f"grad {n}", g, r) for n, g, r in
                                                            zip(("value", "loc", "weights"), got, ref_grads)]], failures)


def bato(device, dtype, failures):
    from dimaskdino.ops import bato_attention, bato_attention_ref

    batch, heads, seq, keys, dim = 2, 8, SIZES[device.type]['seq'], 50, 32
    q = torch.randn(batch, seq, heads, dim, device=device).to(dtype).transpose(1, 2)  # the model's layout
    k, v = (torch.randn(batch, heads, keys, dim, device=device).to(dtype) for _ in range(2))
    grad_out = torch.randn(batch, heads, seq, dim, device=device)
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    out = bato_attention(*inputs, impl="triton")
    got = grads(out, inputs, grad_out)
    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in inputs]
    ref = bato_attention_ref(*ref_inputs)
    check("bato_attention", dtype, [("forward", out, ref), *[(f"grad {n}", g, r) for n, g, r in
                                                            zip("qkv", got, grads(ref, ref_inputs, grad_out.double().cpu()))]], failures)


def topk(device, dtype, failures):
    from dimaskdino.ops import class_max_scores, class_max_scores_ref

    batch, seq, dim, classes = 2, SIZES[device.type]['topk_seq'], 256, 80
    memory = torch.randn(batch, seq, dim, device=device).to(dtype)
    params = [torch.randn(classes, dim, device=device) * 0.05, torch.randn(classes, device=device),
              1 + 0.1 * torch.randn(dim, device=device), 0.1 * torch.randn(dim, device=device),
              torch.randn(dim, dim, device=device) * 0.05, torch.randn(dim, device=device) * 0.1]
    out = class_max_scores(memory, *[p.to(dtype) for p in params], impl="triton")
    ref = class_max_scores_ref(memory.double().cpu(), *[p.to(dtype).double().cpu() for p in params])
    check("class_max_scores", dtype, [("forward", out, ref)], failures)


def mask_loss(device, dtype, failures):
    from dimaskdino.ops import point_mask_costs, point_mask_costs_ref, point_mask_loss, point_mask_loss_ref

    batch, queries, gts, dim, points = 2, 67, 5, 256, SIZES[device.type]['points']
    embed = torch.randn(batch, queries, dim, device=device).to(dtype)
    features = (torch.randn(batch, dim, points, device=device) * 0.1).to(dtype)
    gt_values = (torch.rand(batch, gts, points, device=device) > 0.5).float()
    bce, dice = point_mask_costs(embed, features, gt_values, impl="triton")
    ref_bce, ref_dice = point_mask_costs_ref(embed.double().cpu(), features.double().cpu(), gt_values.double().cpu())
    check("point_mask_costs", dtype, [("bce", bce, ref_bce), ("dice", dice, ref_dice)], failures)

    rows, height, width = SIZES[device.type]['rows'], 29, 33
    masks = torch.randn(rows, height, width, device=device).requires_grad_()
    pts = torch.rand(rows, points, 2, device=device) * 1.1 - 0.05
    targets = (torch.rand(rows, points, device=device) > 0.5).float()
    out = torch.stack(point_mask_loss(masks, pts, targets, impl="triton"))
    (grad,) = torch.autograd.grad(out.sum(), masks)
    ref_masks = masks.detach().double().cpu().requires_grad_()
    ref = torch.stack(point_mask_loss_ref(ref_masks, pts.double().cpu(), targets.double().cpu()))
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_masks)
    check("point_mask_loss", torch.float32, [("forward", out, ref), ("grad masks", grad, ref_grad)], failures)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args(argv)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("sanitize_kernels: --device cpu runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.manual_seed(0)
    failures: list[str] = []
    # bf16 is what training runs; float32 also has its own kernel configurations.
    dtypes = [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]
    for dtype in dtypes:
        msda(device, dtype, device.type, failures)
        bato(device, dtype, failures)
        topk(device, dtype, failures)
        mask_loss(device, dtype, failures)
    if device.type == "cuda":
        torch.cuda.synchronize()
    if failures:
        print("FAILED:\n" + "\n".join(failures))
        return 1
    print("every kernel matches its float64 reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
