"""Triton kernel for the fused top-k selection score: one pass over the tokens, S floats out.

score[b, s] = max_c (class_linear(LayerNorm(proj_linear(memory[b, s]))))_c, or, without the
projection (HAS_PROJ=False: the input is already normalized, e.g. the second selection and BATO's
guiding tokens), score[b, s] = max_c class_linear(memory[b, s])_c.

Grid (cdiv(S, BLOCK_M), B). A program owns BLOCK_M tokens:
  1. proj GEMM: acc (BLOCK_M x BLOCK_D, fp32) += x[:, k0:k0+BLOCK_K] @ W_proj[:, k0:k0+BLOCK_K]^T,
     looping over the reduction dim; tl.dot on tensor cores with fp32 accumulation;
  2. bias + LayerNorm in registers (mean and variance over the d valid columns, fp32);
  3. class GEMM: the normalized rows (cast back to the input dtype, as autocast would feed the class
     Linear) times BLOCK_C classes at a time, bias, padded classes at -inf, running row max;
  4. one float per token is written. Nothing of size S x d or S x C ever reaches memory.
d is padded to BLOCK_D (a power of two >= 16) and masked; weights are cast to the input dtype in
registers (bf16 activations with fp32 master weights need no separate cast kernel).

Must be imported after TRITON_INTERPRET is set when the interpreter is wanted (see
kernels/bato_attention.py).
"""

import triton
import triton.language as tl

MAX_DIM = 512  # BLOCK_M x BLOCK_D fp32 accumulator must stay in registers


def launch_config(dim: int, num_classes: int) -> dict:
    """Block sizes and warps for a model width `dim` and `num_classes` classes (Hopper).

    d = 256: 64 tokens x 256 fp32 accumulator = 64 regs/thread on 8 warps (two warpgroups of
    wgmma). The reduction chunk is 32: with 64, the 256 x 64 weight tile in flight (num_stages=2)
    pushed ptxas to 255 registers and spills for bf16 weights; with 32 it compiles to sm_90a without
    spills (bf16 or fp32 weights). Classes go 32 at a time (C = 80 pads to 96, not 128).
    d = 512: 32-token blocks (mma.sync rather than wgmma) and 16-wide chunks keep it spill-free.
    Untimed: the first H100 session should sweep these.
    """
    block_d = max(16, triton.next_power_of_2(dim))
    return dict(
        BLOCK_M=32 if block_d >= 512 else 64,
        BLOCK_D=block_d,
        BLOCK_K=16 if block_d >= 512 else min(32, block_d),
        BLOCK_C=16 if num_classes <= 16 else 32,
        num_warps=8 if block_d >= 256 else 4,
        num_stages=2,
    )


@triton.jit
def _mma(a, b, acc, FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b, fp32 accumulation (fp64 for fp64). UPCAST only under TRITON_INTERPRET for
    bf16, whose interpreted tl.dot multiplies bit patterns (triton issue #11584). out_dtype is
    always spelled out: triton 3.6 checks an accumulator against it (default fp32) and rejects an
    fp64 one; newer versions infer it."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee", out_dtype=tl.float32)
    elif FP64:
        return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float64)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)


@triton.jit
def class_max_scores_kernel(
    x_ptr, proj_w_ptr, proj_b_ptr, norm_w_ptr, norm_b_ptr, cls_w_ptr, cls_b_ptr, out_ptr,
    S, D, C, eps,
    stride_xb, stride_xs, stride_xd,
    stride_pw_out, stride_pw_in,
    stride_cw_out, stride_cw_in,
    stride_ob, stride_os,
    HAS_PROJ: tl.constexpr, HAS_PROJ_BIAS: tl.constexpr, HAS_CLASS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < S
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    x_rows = x_ptr + b * stride_xb + offs_m[:, None].to(tl.int64) * stride_xs
    in_dtype = x_ptr.dtype.element_ty

    if HAS_PROJ:
        if FP64:
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float64)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < D
            x = tl.load(x_rows + offs_k[None, :] * stride_xd, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(proj_w_ptr + offs_d[:, None] * stride_pw_out + offs_k[None, :] * stride_pw_in,
                        mask=mask_d[:, None] & mask_k[None, :], other=0.0)
            acc = _mma(x, tl.trans(w.to(in_dtype)), acc, FP64, PRECISION, UPCAST)
        if HAS_PROJ_BIAS:
            acc += tl.load(proj_b_ptr + offs_d, mask=mask_d, other=0.0).to(in_dtype).to(acc.dtype)[None, :]
        # LayerNorm over the D valid columns (padded columns of acc are exactly 0).
        mean = tl.sum(acc, 1) / D
        centered = tl.where(mask_d[None, :], acc - mean[:, None], 0.0)
        var = tl.sum(centered * centered, 1) / D
        rstd = 1.0 / tl.sqrt(var + eps)
        gamma = tl.load(norm_w_ptr + offs_d, mask=mask_d, other=0.0).to(acc.dtype)
        beta = tl.load(norm_b_ptr + offs_d, mask=mask_d, other=0.0).to(acc.dtype)
        enc = (centered * rstd[:, None] * gamma[None, :] + beta[None, :]).to(in_dtype)
    else:
        enc = tl.load(x_rows + offs_d[None, :] * stride_xd, mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    if FP64:
        best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float64)
    else:
        best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        w = tl.load(cls_w_ptr + offs_c[:, None] * stride_cw_out + offs_d[None, :] * stride_cw_in,
                    mask=mask_c[:, None] & mask_d[None, :], other=0.0)
        logits = _mma(enc, tl.trans(w.to(in_dtype)), None, FP64, PRECISION, UPCAST)
        if HAS_CLASS_BIAS:
            logits += tl.load(cls_b_ptr + offs_c, mask=mask_c, other=0.0).to(in_dtype).to(logits.dtype)[None, :]
        logits = tl.where(mask_c[None, :], logits, float("-inf"))
        best = tl.maximum(best, tl.max(logits, 1))

    tl.store(out_ptr + b * stride_ob + offs_m * stride_os, best.to(out_ptr.dtype.element_ty), mask=mask_m)
