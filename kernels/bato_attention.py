"""Triton kernels for BATO attention: S queries, few keys (K <= 128), dense softmax attention.

out[b, h] = softmax(q[b, h] k[b, h]^T / sqrt(D)) v[b, h], q (B, H, S, D), k and v (B, H, K, D).

Every key and value of one (batch, head) fits on chip (K=50, D=32: 3.2 KB each in bf16), so there
is no online softmax and no loop over keys: a program loads K and V once, keeps them in registers,
and runs one pass over its query rows. Keys are padded to BLOCK_K = next power of two >= 16 (the
smallest tl.dot operand) and masked to -inf; the head dim is padded to BLOCK_D and masked to 0.

Forward: grid (cdiv(S, BLOCK_M), B*H); q @ k^T and p @ v on tensor cores with fp32 accumulation
(fp64 for fp64 inputs); the probabilities are cast to the input dtype for the second dot, as in
FlashAttention. Nothing but the output is written: the backward recomputes the softmax (a few
flops per query row, cheaper than writing and reading a log-sum-exp).

Backward: grid (SPLITS, B*H). Program (split, bh) walks the query blocks split, split + SPLITS, ...
For each block it recomputes P, writes dq for the block, and accumulates its dk and dv in fp32
registers. At the end it writes one fp32 partial (K, D) per split; the caller sums the SPLITS
partials (a deterministic reduction). SPLITS is chosen so that B*H*SPLITS ~ 2 programs per SM (one
resident wave): at the SPEC shape on an H100, 17 splits of 20 blocks each, and 3.5 MB of partials
against the 67 MB of q, dO and dq traffic. Atomics were rejected: at S=21,760 every dk/dv
element would take ~170 contended fp32 atomic adds per (b, h), and the result would not be
bit-reproducible.

Softmax backward without a separate delta pass: with all keys on chip,
delta_i = sum_j P_ij dP_ij (= dO_i . O_i), so dS = P * (dP - delta) needs neither O nor a
preprocessing kernel.

This module must be imported after TRITON_INTERPRET is set when the interpreter is wanted:
`triton.jit` decides at decoration time whether a kernel is compiled or interpreted.
"""

import triton
import triton.language as tl


def block_sizes(num_keys: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_D): keys and head dim padded to a power of two, at least 16 (tl.dot)."""
    return max(16, triton.next_power_of_2(num_keys)), max(16, triton.next_power_of_2(head_dim))


# Hopper launch configuration (untimed: the first H100 session should sweep these), chosen so that
# ptxas (sm_90a, triton 3.6 and 3.9) reports no spills; benchmarks/triton_compile.py prints the
# registers of each and tests/test_triton_compile.py keeps them spill-free.
#   16-bit, K <= 64 (the model's K=50): forward BLOCK_M=128 on 8 warps (60-64 regs; 3 CTAs per SM),
#     backward BLOCK_M=64 on 4 warps (150-158 regs, 2 CTAs per SM).
#   16-bit, K = 128: backward on 8 warps (4 warps: 240-255 regs and spills under triton 3.9).
#   fp32 ("ieee" dots run on FMA units and keep whole K-long operand rows per thread): forward
#     BLOCK_M=32 on 8 warps. The backward's five dots do not fit in registers with "ieee" at any
#     block size (BLOCK_M=16 on 4 to 16 warps still spills at K=50, kilobytes at K=128), so it
#     uses 3xTF32 on tensor cores ("tf32x3": each operand split into two tf32 parts, three
#     products: relative error ~1e-6, fp32's class, not tf32's 1e-3) with BLOCK_M=16.
#   fp64 (tests only): the fp32 shapes with "ieee" (fp64 has no tensor-core path here).
NUM_STAGES = 2


def forward_config(dtype: str, block_k: int) -> dict:
    """BLOCK_M and num_warps of the forward; dtype "bf16", "fp16", "fp32" or "fp64"."""
    if dtype in ("bf16", "fp16"):
        return dict(BLOCK_M=128, num_warps=8)
    return dict(BLOCK_M=32, num_warps=8)


def backward_config(dtype: str, block_k: int) -> dict:
    """BLOCK_M, num_warps and the dot precision ("ieee" unless fp32, see above) of the backward."""
    if dtype in ("bf16", "fp16"):
        return dict(BLOCK_M=64, num_warps=4 if block_k <= 64 else 8, PRECISION="tf32")
    return dict(BLOCK_M=16, num_warps=4 if block_k <= 64 else 8, PRECISION="tf32x3" if dtype == "fp32" else "ieee")


@triton.jit
def _mma(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation (fp64 for fp64). UPCAST is set only under TRITON_INTERPRET
    for bf16: the interpreter multiplies the raw bf16 bit patterns in tl.dot (triton issue
    #11584); bf16 -> fp32 is exact, so an fp32 dot computes the same products."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _scores(q, k, sm_scale, offs_k, K,
            HEAD_DIM: tl.constexpr, FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Scaled logits q k^T with padded keys at -inf, and the softmax P (rows sum to 1)."""
    s = _mma(q, tl.trans(k), PRECISION, UPCAST)
    if FP64:
        # A Python float argument reaches the kernel as fp32; rebuild the scale exactly in fp64.
        s = s / tl.sqrt(tl.full([1, 1], HEAD_DIM, tl.float64))
    else:
        s = s * sm_scale
    s = tl.where((offs_k < K)[None, :], s, float("-inf"))
    p = tl.exp(s - tl.max(s, 1)[:, None])
    return p / tl.sum(p, 1)[:, None]


@triton.jit
def bato_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    S, K, H, sm_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_kk, stride_kd,
    stride_vb, stride_vh, stride_vk, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < S
    mask_k = offs_k < K
    mask_d = offs_d < HEAD_DIM

    kv_mask = mask_k[:, None] & mask_d[None, :]
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_k[:, None] * stride_kk + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_k[:, None] * stride_vk + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)

    p = _scores(q, k, sm_scale, offs_k, K, HEAD_DIM, FP64, PRECISION, UPCAST)
    o = _mma(p.to(v.dtype), v, PRECISION, UPCAST)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :] * stride_od,
             o.to(o_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def bato_attention_bwd_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, dk_part_ptr, dv_part_ptr,
    S, K, H, SPLITS, sm_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_kk, stride_kd,
    stride_vb, stride_vh, stride_vk, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    FP64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dk_part / dv_part: contiguous (B*H, SPLITS, K, HEAD_DIM) in the accumulation dtype."""
    pid_split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_k = offs_k < K
    mask_d = offs_d < HEAD_DIM

    kv_mask = mask_k[:, None] & mask_d[None, :]
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_k[:, None] * stride_kk + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_k[:, None] * stride_vk + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    if FP64:
        dk = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float64)
        dv = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float64)
        scale = 1.0 / tl.sqrt(tl.full([1, 1], HEAD_DIM, tl.float64))
    else:
        dk = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        scale = sm_scale

    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_dob + h * stride_doh
    dq_base = dq_ptr + b * stride_dqb + h * stride_dqh
    num_blocks = tl.cdiv(S, BLOCK_M)
    for block in range(pid_split, num_blocks, SPLITS):
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = offs_m[:, None].to(tl.int64)
        m_mask = (offs_m < S)[:, None] & mask_d[None, :]
        q = tl.load(q_base + rows * stride_qs + offs_d[None, :] * stride_qd, mask=m_mask, other=0.0)
        do = tl.load(do_base + rows * stride_dos + offs_d[None, :] * stride_dod, mask=m_mask, other=0.0)

        p = _scores(q, k, sm_scale, offs_k, K, HEAD_DIM, FP64, PRECISION, UPCAST)  # (M, BLOCK_K); 0 on padded keys
        # Padded query rows have do = 0, so they add nothing to dv or dk.
        dv += _mma(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
        dp = _mma(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - tl.sum(p * dp, 1)[:, None])
        ds_in = ds.to(q.dtype)
        dq = _mma(ds_in, k, PRECISION, UPCAST) * scale
        tl.store(dq_base + rows * stride_dqs + offs_d[None, :] * stride_dqd, dq.to(dq_ptr.dtype.element_ty), mask=m_mask)
        dk += _mma(tl.trans(ds_in), q, PRECISION, UPCAST)

    dk = dk * scale
    part = (pid_bh.to(tl.int64) * SPLITS + pid_split) * K * HEAD_DIM + offs_k[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dk_part_ptr + part, dk.to(dk_part_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_part_ptr + part, dv.to(dv_part_ptr.dtype.element_ty), mask=kv_mask)
