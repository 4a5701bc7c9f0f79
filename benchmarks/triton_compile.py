"""Compiles every Triton kernel for Hopper (sm_90a) at the launches the model makes, without a GPU,
and reports registers, spills and shared memory per kernel.

    python benchmarks/triton_compile.py [--json] [--out DIR] [--only SUBSTRING]

Works with whichever triton is importable (tests/test_triton_compile.py runs it under the installed
triton and under triton 3.6.0, the oldest supported, put first on PYTHONPATH).

How: each op's launch code (the body of its triton_op, unchanged) runs on fake CUDA tensors of the
model's shapes, with `wrap_triton` replaced by a recorder; every recorded launch is then compiled
with `JITFunction.warmup` (the launch path without the launch: the same specialization of integer
arguments, constexprs, num_warps and num_stages as a real call) against a stand-in driver that
names an sm_90a target. ptxas's own report (-v, which triton always passes) gives registers and
spills; the compiled kernel's metadata gives shared memory. So a change of block sizes or warps in
an op shows up here, and nothing is compiled "signature-less".

Shapes (SPEC, dimaskdino_r50_12ep at 1024x1024, batch 2): d = 256, 8 heads of 32, 50 BATO guiding
tokens, 80 classes, S = 21,760 encoder tokens, Q = 300 matching queries, P = 12,544 points, mask
logits at stride 4 (256 x 256). dtypes as under bf16 autocast (activations bf16, weights fp32,
losses fp32) and in fp32 training. "limit" cases are the largest inputs an op accepts for the Triton
kernel (K = 128 keys); "test" cases (float64) are what the gpu tests run: they must compile, but
their registers and spills are not budgeted (float64 is never a training dtype).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

# Compiled kernels (not the interpreter), and a fresh cache so that ptxas runs and reports.
os.environ["TRITON_INTERPRET"] = "0"
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
_CACHE = tempfile.TemporaryDirectory(prefix="triton-compile-")  # removed at exit
os.environ["TRITON_CACHE_DIR"] = _CACHE.name
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton >= 3.9 warns when unset; 1 = its default

import torch  # noqa: E402
import triton  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200: sm_90a
SMS = 132  # H100 SXM and H200 multiprocessors (the ops size their split grids by it)
# Hopper: 227 KB of shared memory per block at most (opt-in); a kernel asking for more compiles
# but fails at launch.
MAX_SHARED_BYTES = 227 * 1024
# Spill budget for the cases the model runs (production and limit): none. These kernels keep their
# tiles in registers by design (docstrings of kernels/*.py); a spill turns each of those values
# into local-memory traffic through L1 on every loop iteration, a slowdown of the very loops the
# kernels exist for, and every configuration here can be chosen spill-free (this report shows it).
SPILL_BUDGET_BYTES = 0

B, HEADS, HEAD_DIM, DIM = 2, 8, 32, 256
S_TOKENS, GUIDING, CLASSES, QUERIES, POINTS, MASK_SIDE = 21_760, 50, 80, 300, 12_544, 256
BF16, FP32, FP64 = torch.bfloat16, torch.float32, torch.float64


class _Hopper:
    """Stands in for triton's CUDA driver: the launch path asks it for the target, the device and
    the stream, and nothing else before it compiles."""

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@dataclasses.dataclass
class Case:
    name: str
    kind: str  # "production", "limit" or "test"
    module: str  # dimaskdino.ops.<module>
    op: str  # the triton_op in that module whose body is run
    inputs: callable  # () -> args, called under FakeTensorMode


def _empty(*shape, dtype):
    return torch.empty(*shape, device="cuda", dtype=dtype)


def _bato(dtype, keys, backward, tokens=S_TOKENS):
    def inputs():
        # q, k, v as MultiHeadAttention makes them: (B, L, H, D) projections viewed as (B, H, L, D).
        q = _empty(B, tokens, HEADS, HEAD_DIM, dtype=dtype).transpose(1, 2)
        k = _empty(B, keys, HEADS, HEAD_DIM, dtype=dtype).transpose(1, 2)
        v = _empty(B, keys, HEADS, HEAD_DIM, dtype=dtype).transpose(1, 2)
        return (torch.empty_like(q), q, k, v) if backward else (q, k, v)

    return inputs


def _class_scores(dtype, weight_dtype, tokens, proj):
    def inputs():
        memory = _empty(B if tokens > 1 else 1, tokens, DIM, dtype=dtype)
        class_w, class_b = _empty(CLASSES, DIM, dtype=weight_dtype), _empty(CLASSES, dtype=weight_dtype)
        if not proj:
            return memory, class_w, class_b, None, None, None, None, 1e-5
        norm_w, norm_b = _empty(DIM, dtype=weight_dtype), _empty(DIM, dtype=weight_dtype)
        proj_w, proj_b = _empty(DIM, DIM, dtype=weight_dtype), _empty(DIM, dtype=weight_dtype)
        return memory, class_w, class_b, norm_w, norm_b, proj_w, proj_b, 1e-5

    return inputs


def _mask_costs(dtype, num_gt):
    def inputs():
        embed = _empty(B, QUERIES, DIM, dtype=dtype)
        features = _empty(B, DIM, POINTS, dtype=dtype)  # the matcher rounds them to embed's dtype
        return embed, features, _empty(B, num_gt, POINTS, dtype=dtype if dtype == FP64 else FP32)

    return inputs


def _mask_loss(dtype, backward, pairs=40):
    def inputs():
        masks = _empty(pairs, MASK_SIDE, MASK_SIDE, dtype=dtype)  # the criterion's .float() of the matched logits
        points, targets = _empty(pairs, POINTS, 2, dtype=dtype), _empty(pairs, POINTS, dtype=dtype)
        return (_empty(pairs, 4, dtype=dtype), masks, points, targets) if backward else (masks, points, targets)

    return inputs


def cases() -> list[Case]:
    found = []
    for dtype, kind in ((BF16, "production"), (FP32, "production"), (FP64, "test")):
        tag = str(dtype).removeprefix("torch.")
        for keys, key_kind in ((GUIDING, kind), (128, "limit" if kind == "production" else kind)):
            if dtype == FP64 and keys != GUIDING:
                continue
            found.append(Case(f"bato fwd {tag} K={keys}", key_kind, "bato_attention", "_bato_attention_triton", _bato(dtype, keys, False)))
            found.append(Case(f"bato bwd {tag} K={keys}", key_kind, "bato_attention", "_bato_attention_backward_triton", _bato(dtype, keys, True)))
    # Integer arguments equal to 1 are compiled as constants: one key, one token.
    found.append(Case("bato fwd bfloat16 K=1 S=1", "limit", "bato_attention", "_bato_attention_triton", _bato(BF16, 1, False, 1)))
    found.append(Case("bato bwd bfloat16 K=1 S=1", "limit", "bato_attention", "_bato_attention_backward_triton", _bato(BF16, 1, True, 1)))
    for dtype, weight_dtype, kind in ((BF16, FP32, "production"), (FP32, FP32, "production"), (BF16, BF16, "production"), (FP64, FP64, "test")):
        tag = f"{str(dtype).removeprefix('torch.')}/{str(weight_dtype).removeprefix('torch.')} weights"
        op = ("topk_select", "_class_max_scores_triton")
        found.append(Case(f"selection scores {tag} S={S_TOKENS}", kind, *op, _class_scores(dtype, weight_dtype, S_TOKENS, True)))
        found.append(Case(f"selection zero-token score {tag}", kind, *op, _class_scores(dtype, weight_dtype, 1, True)))
        found.append(Case(f"BATO guiding-token scores {tag} Q={QUERIES}", kind, *op, _class_scores(dtype, weight_dtype, QUERIES, False)))
    for dtype, kind in ((BF16, "production"), (FP32, "production"), (FP64, "test")):
        tag = str(dtype).removeprefix("torch.")
        for num_gt in (7, 20, 50):  # BLOCK_N 16, 32, 64
            if dtype == FP64 and num_gt != 20:
                continue
            found.append(Case(f"mask costs {tag} N={num_gt}", kind, "mask_loss", "_point_mask_costs_triton", _mask_costs(dtype, num_gt)))
    for dtype, kind in ((FP32, "production"), (FP64, "test")):
        tag = str(dtype).removeprefix("torch.")
        found.append(Case(f"mask loss fwd {tag}", kind, "mask_loss", "_point_mask_loss_stats_triton", _mask_loss(dtype, False)))
        found.append(Case(f"mask loss bwd {tag}", kind, "mask_loss", "_point_mask_loss_stats_backward_triton", _mask_loss(dtype, True)))
    return found


def record_launches(case: Case) -> list[tuple]:
    """(kernel, grid, args, kwargs) of every launch the op's body makes on the case's inputs."""
    module = importlib.import_module(f"dimaskdino.ops.{case.module}")
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, grid, args, kwargs))

    saved = module.wrap_triton, getattr(module, "_multiprocessors", None)
    module.wrap_triton = Recorder
    if saved[1] is not None:
        module._multiprocessors = lambda device_index: SMS
    try:
        with FakeTensorMode():
            getattr(module, case.op)._init_fn(*case.inputs())
    finally:
        module.wrap_triton = saved[0]
        if saved[1] is not None:
            module._multiprocessors = saved[1]
    return launches


def _specialization(args, kwargs) -> str:
    """What the JIT specializes on: tensor dtypes, integers equal to 1 or divisible by 16, constexprs."""
    parts = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            parts.append(str(arg.dtype).removeprefix("torch."))
        elif isinstance(arg, bool) or not isinstance(arg, int):
            parts.append(type(arg).__name__)
        else:
            parts.append("1" if arg == 1 else "16k" if arg % 16 == 0 else "i")
    return ",".join(parts) + "|" + ",".join(f"{k}={v}" for k, v in sorted(kwargs.items()))


def _ptxas_report(log: str) -> dict:
    def number(pattern):
        match = re.search(pattern, log)
        return int(match.group(1)) if match else None

    return {
        "registers": number(r"Used (\d+) registers"),
        "stack_bytes": number(r"(\d+) bytes stack frame"),
        "spill_store_bytes": number(r"(\d+) bytes spill stores"),
        "spill_load_bytes": number(r"(\d+) bytes spill loads"),
        "wgmma_serialized": "C7515" in log,
    }


def compile_launch(kernel, grid, args, kwargs) -> dict:
    # Tensors go in as their dtypes: warmup makes a pointer of that dtype aligned to 16 bytes, as
    # the caching allocator's blocks are (all the tensors here start at offset 0).
    plain = [arg.dtype if isinstance(arg, torch.Tensor) else arg for arg in args]
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = kernel.warmup(*plain, grid=grid, **kwargs)
    compiled = compiled.result() if hasattr(compiled, "result") else compiled
    report = _ptxas_report(log.getvalue())
    ptx = compiled.asm.get("ptx", "")
    report.update(wgmma="wgmma.mma_async" in ptx, mma_sync="mma.sync" in ptx, atomics="red.global" in ptx or "atom.global" in ptx)
    if report["registers"] is None:
        raise RuntimeError(f"no ptxas report for {kernel.fn.__name__} (was it taken from a cache?):\n{log.getvalue()[-2000:]}")
    return {
        **report,
        "shared_bytes": compiled.metadata.shared,
        "num_warps": compiled.metadata.num_warps,
        "num_stages": compiled.metadata.num_stages,
        "cubin": bool(compiled.asm.get("cubin")),
        "compile_s": round(time.perf_counter() - start, 2),
    }


def budget_problems(row: dict) -> list[str]:
    """Why a compiled row breaks the budget (empty when it does not)."""
    if "error" in row:
        return [f"compile error: {row['error']}"]
    problems = []
    if not row["cubin"]:
        problems.append("no cubin")
    if row["shared_bytes"] > MAX_SHARED_BYTES:
        problems.append(f"{row['shared_bytes']} bytes of shared memory > {MAX_SHARED_BYTES}")
    spills = row["spill_store_bytes"] + row["spill_load_bytes"]
    if row["kind"] != "test" and spills > SPILL_BUDGET_BYTES:
        problems.append(f"{row['spill_store_bytes']} B spill stores + {row['spill_load_bytes']} B spill loads > budget {SPILL_BUDGET_BYTES}")
    return problems


def run(only: str | None = None) -> list[dict]:
    triton.runtime.driver.set_active(_Hopper())
    rows, seen = [], {}
    for case in cases():
        if only and only not in case.name:
            continue
        try:
            launches = record_launches(case)
        except Exception as error:  # a launch-code failure is a finding, not a crash of the report
            rows.append({"case": case.name, "kind": case.kind, "kernel": case.op, "error": f"{type(error).__name__}: {error}"})
            continue
        for kernel, grid, args, kwargs in launches:
            name = kernel.fn.__name__
            key = (name, _specialization(args, kwargs))
            row = {"case": case.name, "kind": case.kind, "kernel": name, "grid": list(grid)}
            if key in seen:  # the same compiled kernel as an earlier case
                row.update({k: v for k, v in seen[key].items() if k not in row}, same_as=seen[key]["case"])
            else:
                try:
                    row.update(compile_launch(kernel, grid, args, kwargs))
                except Exception as error:
                    row["error"] = f"{type(error).__name__}: {str(error).strip()[:2000]}"
                seen[key] = row
            rows.append(row)
    for row in rows:
        row["problems"] = budget_problems(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"triton {triton.__version__} -> sm_90a (spill budget {SPILL_BUDGET_BYTES} B except float64 test cases; shared <= {MAX_SHARED_BYTES} B)",
             f"{'case':48} {'kernel':28} {'kind':10} {'warps':>5} {'regs':>4} {'spill st/ld B':>13} {'smem B':>7} {'mma':>6} {'s':>5}  problems"]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['case']:48} {row['kernel']:28} {row['kind']:10} ERROR {row['error'][:300]}")
            continue
        spills = f"{row['spill_store_bytes']}/{row['spill_load_bytes']}"
        mma = "wgmma" if row["wgmma"] else "mma" if row["mma_sync"] else "fma"
        lines.append(f"{row['case']:48} {row['kernel']:28} {row['kind']:10} {row['num_warps']:>5} {row['registers']:>4} "
                     f"{spills:>13} {row['shared_bytes']:>7} {mma:>6} {row['compile_s']:>5}  {'; '.join(row['problems'])}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout instead of the table")
    parser.add_argument("--out", help="also write triton-compile-<triton version>.json (with provenance) into this folder")
    parser.add_argument("--only", help="only cases whose name contains this")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = run(args.only)
    payload = {"triton_version": triton.__version__, "target": "sm_90a", "spill_budget_bytes": SPILL_BUDGET_BYTES,
               "max_shared_bytes": MAX_SHARED_BYTES, "seconds": round(time.perf_counter() - start, 1), "kernels": rows}
    if args.out:
        from benchmarks.provenance import write_result

        write_result(args.out, f"triton-compile-{triton.__version__}.json", payload)
    print(json.dumps(payload) if args.json else table(rows))
    if any(row["problems"] for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
