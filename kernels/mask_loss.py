"""Triton kernels for the point-sampled mask matching cost and mask loss (SPEC section 5).

Matching cost (`point_mask_cost_kernel`)
----------------------------------------
Mask logits are linear in the mask features (logit[q] = e_q . F) and bilinear sampling is linear,
so the logit of query q at point p is x_qp = e_q . F(p), with F(p) the features sampled at p. The
caller samples the features once per image at the P points shared by every query, GT and output
(point_features (B, D, P)); this kernel then computes, per (query, GT) pair,

    bce  = (sum_p softplus(x_qp) - sum_p x_qp t_np) / P
    dice = 1 - (2 sum_p s_qp t_np + 1) / (sum_p s_qp + sum_p t_np + 1),   s = sigmoid(x)

without writing x: program (q-block, split, b * n-blocks) walks the point blocks
split, split + SPLITS, ...; for each it makes the (BLOCK_Q, BLOCK_P) tile of x on chip with
tl.dot over D in BLOCK_D chunks (tensor cores for 16-bit inputs), then accumulates the two
(BLOCK_Q, BLOCK_N) products x t^T and s t^T with two more tl.dot (fp32) and the row sums of
softplus(x) and s. Each split writes fp32 partials (a few MB at the SPEC shape) that the caller
sums: a deterministic reduction; SPLITS is chosen so that the grid fills the GPU (at B=2, Q=300
there are only 10 (q-block, image) pairs).
Memory: never Q x H x W (the reference materializes it), and not even Q x P.
Work per output and image: 2 Q P D flops for x, 4 Q P N for the two products.

Mask loss (`point_mask_loss_fwd_kernel`, `point_mask_loss_bwd_kernel`)
---------------------------------------------------------------------
Matched pairs have their own points (uncertainty sampling differs per pair), so nothing is shared
between pairs: the caller makes the R matched mask logit maps with one GEMM per image
(R x D x H W tensor-core flops, R x H x W floats) and these kernels do the rest in one pass over
the points. Gathering the D features at each pair's points instead would read 4 D values per point:
at the SPEC shape, 4 x (12,544 loss points + 37,632 candidates) x 256 = 51 M values per pair (about
1 G for the 20 pairs of an image), without tensor cores, against the GEMM's single read of the
image's map (256 x 256 x 256 = 17 M values) and 20 x 65,536 logits written; so the GEMM wins.

Forward: grid (R, cdiv(P, BLOCK_P)); a program samples the pair's map at its BLOCK_P points
(4 corner loads, zero outside the map: grid_sample(align_corners=False) semantics) and writes the
partial sums [sum BCE, sum s, sum s t, sum t] of its block; the caller sums the blocks (R, 4)
and forms BCE mean and dice in PyTorch (so autograd of that tiny epilogue gives dL/dstats).
Backward: same grid; recomputes x, then dL/dx = g0 (s - t) + (g1 + g2 t) s (1 - s) and scatters
w_corner * dL/dx into the (R, H, W) gradient with fp32 atomics (as grid_sample's CUDA backward:
contention is low, as points of one pair rarely share a pixel, but the sum order is not fixed).

This module must be imported after TRITON_INTERPRET is set when the interpreter is wanted:
`triton.jit` decides at decoration time whether a kernel is compiled or interpreted.
"""

import triton
import triton.language as tl

# Hopper launch configuration (untimed: no GPU was available when these were written; the first
# H100 session should sweep them with benchmarks/kernels.py --ops mask_loss). The cost kernel's two
# fp32 "ieee" product dots run on FMA units and keep whole operand rows per thread: with 64 x 64
# (query x point) tiles on 4 warps ptxas (sm_90a) spilled 2-4 KB at BLOCK_N=64 (more than 32 GT)
# and a few bytes in fp32 at every BLOCK_N; 8 warps, 32-point blocks, or 32 x 32 tiles on 4 warps
# still spilled at some BLOCK_N or dtype under triton 3.6 or 3.9. 32 x 32 tiles on 8 warps: at most
# 118 registers, no spills (benchmarks/triton_compile.py reports them, tests/test_triton_compile.py
# keeps them at zero).
COST_BLOCK_Q = 32
COST_BLOCK_P = 32
COST_MAX_BLOCK_D = 64
COST_MAX_BLOCK_N = 64
COST_NUM_WARPS = 8
LOSS_BLOCK_P = 1024
LOSS_NUM_WARPS = 4
NUM_STAGES = 2

# Under the interpreter: small blocks, so that tests with small shapes walk several of each.
INTERPRET_COST_BLOCK_Q = 16
INTERPRET_COST_BLOCK_P = 32
INTERPRET_COST_MAX_BLOCK_D = 16
INTERPRET_COST_MAX_BLOCK_N = 16
INTERPRET_LOSS_BLOCK_P = 64


def cost_block_sizes(num_gt: int, dim: int, interpreted: bool) -> tuple[int, int, int, int]:
    """(BLOCK_Q, BLOCK_N, BLOCK_P, BLOCK_D); every tl.dot operand dimension at least 16."""
    if interpreted:
        block_q, block_p = INTERPRET_COST_BLOCK_Q, INTERPRET_COST_BLOCK_P
        max_d, max_n = INTERPRET_COST_MAX_BLOCK_D, INTERPRET_COST_MAX_BLOCK_N
    else:
        block_q, block_p, max_d, max_n = COST_BLOCK_Q, COST_BLOCK_P, COST_MAX_BLOCK_D, COST_MAX_BLOCK_N
    block_n = min(max_n, max(16, triton.next_power_of_2(max(num_gt, 1))))
    block_d = min(max_d, max(16, triton.next_power_of_2(max(dim, 1))))
    return block_q, block_n, block_p, block_d


def loss_block_size(interpreted: bool) -> int:
    return INTERPRET_LOSS_BLOCK_P if interpreted else LOSS_BLOCK_P


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), with log1p by its series for small
    arguments (tl has no log1p; log(1 + u) loses u's digits once u < 1e-4)."""
    u = tl.exp(-tl.abs(x))
    log1p_u = tl.where(u < 1e-4, u * (1.0 - u * (0.5 - u / 3.0)), tl.log(1.0 + u))
    return tl.maximum(x, 0.0) + log1p_u


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


# ---------------------------------------------------------------------------------------------
# Matching cost


@triton.jit
def point_mask_cost_kernel(
    e_ptr, f_ptr, t_ptr, xt_ptr, st_ptr, sp_ptr, s_ptr,
    Q, N, P, D, SPLITS, NUM_N_BLOCKS,
    stride_eb, stride_eq, stride_ed,
    stride_fb, stride_fd, stride_fp,
    stride_tb, stride_tn, stride_tp,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    FP64: tl.constexpr, PRECISION: tl.constexpr, HALF_DOT: tl.constexpr, UPCAST: tl.constexpr,
):
    """Partials, contiguous: xt and st (B, SPLITS, Q, N); sp and s (B, SPLITS, Q) (written by the
    programs of the first n-block only).

    HALF_DOT (e and F(p) both in one 16-bit dtype, i.e. autocast; the caller rounds F(p)): x on
    tensor cores with fp32 accumulation: one 16-bit rounding of the operands, the precision class
    of the reference, whose mask logits are 16-bit einsum outputs. (The rounding is not done here:
    the interpreter's fp32 -> bf16 cast is not round-to-nearest-even.) Otherwise x in fp32 with
    `PRECISION` ("ieee": fp32 inputs give fp32-exact costs). The products x t^T and s t^T are always fp32
    ieee: the BCE cost is a difference of two O(P) sums, where a tf32 rounding would show.
    UPCAST: the interpreter's bf16 tl.dot bug (triton issue #11584), see bato_attention."""
    pid_q = tl.program_id(0)
    pid_split = tl.program_id(1)
    pid_bn = tl.program_id(2)
    b = (pid_bn // NUM_N_BLOCKS).to(tl.int64)
    n_block = pid_bn % NUM_N_BLOCKS
    if FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32

    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_q = offs_q < Q
    mask_n = offs_n < N
    e_base = e_ptr + b * stride_eb + offs_q[:, None].to(tl.int64) * stride_eq
    f_base = f_ptr + b * stride_fb
    t_base = t_ptr + b * stride_tb + offs_n[:, None].to(tl.int64) * stride_tn

    acc_xt = tl.zeros([BLOCK_Q, BLOCK_N], dtype=acc_dtype)
    acc_st = tl.zeros([BLOCK_Q, BLOCK_N], dtype=acc_dtype)
    row_sp = tl.zeros([BLOCK_Q], dtype=acc_dtype)
    row_s = tl.zeros([BLOCK_Q], dtype=acc_dtype)
    num_p_blocks = tl.cdiv(P, BLOCK_P)
    for p_block in range(pid_split, num_p_blocks, SPLITS):
        offs_p = p_block * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        # x tile = e (BLOCK_Q, D) @ F(points) (D, BLOCK_P), on chip only. Padded queries, points
        # and channels load as 0.
        x = tl.zeros([BLOCK_Q, BLOCK_P], dtype=acc_dtype)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            e = tl.load(e_base + offs_d[None, :] * stride_ed, mask=mask_q[:, None] & mask_d[None, :], other=0.0)
            f = tl.load(f_base + offs_d[:, None] * stride_fd + offs_p[None, :].to(tl.int64) * stride_fp,
                        mask=mask_d[:, None] & mask_p[None, :], other=0.0)
            if HALF_DOT:
                if UPCAST:
                    x += tl.dot(e.to(tl.float32), f.to(tl.float32), input_precision="ieee")
                else:
                    x += tl.dot(e, f)
            else:
                x += tl.dot(e.to(acc_dtype), f.to(acc_dtype), input_precision=PRECISION)
        t = tl.load(t_base + offs_p[None, :].to(tl.int64) * stride_tp, mask=mask_n[:, None] & mask_p[None, :],
                    other=0.0).to(acc_dtype)
        valid = mask_p[None, :]
        s = tl.where(valid, _sigmoid(x), 0.0)
        row_sp += tl.sum(tl.where(valid, _softplus(x), 0.0), 1)
        row_s += tl.sum(s, 1)
        # t is 0 on padded points and GT, so the products need no further masking.
        acc_xt += tl.dot(x, tl.trans(t), input_precision="ieee")
        acc_st += tl.dot(s, tl.trans(t), input_precision="ieee")

    part = b * SPLITS + pid_split
    qn = (part * Q + offs_q[:, None].to(tl.int64)) * N + offs_n[None, :]
    qn_mask = mask_q[:, None] & mask_n[None, :]
    tl.store(xt_ptr + qn, acc_xt.to(xt_ptr.dtype.element_ty), mask=qn_mask)
    tl.store(st_ptr + qn, acc_st.to(st_ptr.dtype.element_ty), mask=qn_mask)
    if n_block == 0:
        rows = part * Q + offs_q
        tl.store(sp_ptr + rows, row_sp.to(sp_ptr.dtype.element_ty), mask=mask_q)
        tl.store(s_ptr + rows, row_s.to(s_ptr.dtype.element_ty), mask=mask_q)


# ---------------------------------------------------------------------------------------------
# Mask loss


@triton.jit
def _corner(m_base, xi, yi, H, W, stride_mh, stride_mw, mask_p, acc_dtype: tl.constexpr):
    """Value of the map at integer pixel (xi, yi), 0 outside; and whether it is inside."""
    inside = mask_p & (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
    offset = yi.to(tl.int64) * stride_mh + xi.to(tl.int64) * stride_mw
    value = tl.load(m_base + offset, mask=inside, other=0.0).to(acc_dtype)
    return value, inside


@triton.jit
def _sample_setup(pts_ptr, r, offs_p, mask_p, stride_pr, stride_pp, stride_pc, H, W, acc_dtype: tl.constexpr):
    """Top-left corner (x0, y0) and fractions (fx, fy) of each point; pixel = x * W - 0.5."""
    base = pts_ptr + r * stride_pr + offs_p.to(tl.int64) * stride_pp
    px = tl.load(base, mask=mask_p, other=0.0).to(acc_dtype) * W - 0.5
    py = tl.load(base + stride_pc, mask=mask_p, other=0.0).to(acc_dtype) * H - 0.5
    x0f = tl.floor(px)
    y0f = tl.floor(py)
    return x0f.to(tl.int32), y0f.to(tl.int32), px - x0f, py - y0f


@triton.jit
def point_mask_loss_fwd_kernel(
    m_ptr, pts_ptr, t_ptr, part_ptr,
    P, H, W, NUM_BLOCKS,
    stride_mr, stride_mh, stride_mw,
    stride_pr, stride_pp, stride_pc,
    stride_tr, stride_tp,
    BLOCK_P: tl.constexpr, FP64: tl.constexpr,
):
    """part: contiguous (R, NUM_BLOCKS, 4) = [sum BCE, sum s, sum s t, sum t] per point block."""
    r = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1)
    if FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    x0, y0, fx, fy = _sample_setup(pts_ptr, r, offs_p, mask_p, stride_pr, stride_pp, stride_pc, H, W, acc_dtype)
    m_base = m_ptr + r * stride_mr
    v00, _ = _corner(m_base, x0, y0, H, W, stride_mh, stride_mw, mask_p, acc_dtype)
    v01, _ = _corner(m_base, x0 + 1, y0, H, W, stride_mh, stride_mw, mask_p, acc_dtype)
    v10, _ = _corner(m_base, x0, y0 + 1, H, W, stride_mh, stride_mw, mask_p, acc_dtype)
    v11, _ = _corner(m_base, x0 + 1, y0 + 1, H, W, stride_mh, stride_mw, mask_p, acc_dtype)
    x = (v00 * (1.0 - fx) + v01 * fx) * (1.0 - fy) + (v10 * (1.0 - fx) + v11 * fx) * fy
    t = tl.load(t_ptr + r * stride_tr + offs_p.to(tl.int64) * stride_tp, mask=mask_p, other=0.0).to(acc_dtype)
    s = tl.where(mask_p, _sigmoid(x), 0.0)
    bce = tl.where(mask_p, _softplus(x) - x * t, 0.0)
    out = part_ptr + (r * NUM_BLOCKS + pid_p) * 4
    tl.store(out, tl.sum(bce, 0).to(part_ptr.dtype.element_ty))
    tl.store(out + 1, tl.sum(s, 0).to(part_ptr.dtype.element_ty))
    tl.store(out + 2, tl.sum(s * t, 0).to(part_ptr.dtype.element_ty))
    tl.store(out + 3, tl.sum(t, 0).to(part_ptr.dtype.element_ty))


@triton.jit
def point_mask_loss_bwd_kernel(
    m_ptr, pts_ptr, t_ptr, g_ptr, gm_ptr,
    P, H, W,
    stride_mr, stride_mh, stride_mw,
    stride_pr, stride_pp, stride_pc,
    stride_tr, stride_tp,
    stride_gr, stride_gc,
    BLOCK_P: tl.constexpr, FP64: tl.constexpr,
):
    """g: (R, 4) gradient of the stats (any strides); gm: contiguous zero-initialized (R, H, W)
    in the accumulation dtype, accumulated with atomics."""
    r = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1)
    if FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    x0, y0, fx, fy = _sample_setup(pts_ptr, r, offs_p, mask_p, stride_pr, stride_pp, stride_pc, H, W, acc_dtype)
    m_base = m_ptr + r * stride_mr
    v00, in00 = _corner(m_base, x0, y0, H, W, stride_mh, stride_mw, mask_p, acc_dtype)
    v01, in01 = _corner(m_base, x0 + 1, y0, H, W, stride_mh, stride_mw, mask_p, acc_dtype)
    v10, in10 = _corner(m_base, x0, y0 + 1, H, W, stride_mh, stride_mw, mask_p, acc_dtype)
    v11, in11 = _corner(m_base, x0 + 1, y0 + 1, H, W, stride_mh, stride_mw, mask_p, acc_dtype)
    x = (v00 * (1.0 - fx) + v01 * fx) * (1.0 - fy) + (v10 * (1.0 - fx) + v11 * fx) * fy
    t = tl.load(t_ptr + r * stride_tr + offs_p.to(tl.int64) * stride_tp, mask=mask_p, other=0.0).to(acc_dtype)

    g_base = g_ptr + r * stride_gr
    g_bce = tl.load(g_base).to(acc_dtype)
    g_s = tl.load(g_base + stride_gc).to(acc_dtype)
    g_st = tl.load(g_base + 2 * stride_gc).to(acc_dtype)
    s = _sigmoid(x)
    # d/dx of [softplus(x) - x t, s, s t] weighted by the stats' gradients (t has no gradient).
    dx = g_bce * (s - t) + (g_s + g_st * t) * (s * (1.0 - s))
    dx = tl.where(mask_p, dx, 0.0)

    gm_base = gm_ptr + r * H * W
    row0 = y0.to(tl.int64) * W
    row1 = row0 + W
    tl.atomic_add(gm_base + row0 + x0, dx * (1.0 - fx) * (1.0 - fy), mask=in00, sem="relaxed")
    tl.atomic_add(gm_base + row0 + x0 + 1, dx * fx * (1.0 - fy), mask=in01, sem="relaxed")
    tl.atomic_add(gm_base + row1 + x0, dx * (1.0 - fx) * fy, mask=in10, sem="relaxed")
    tl.atomic_add(gm_base + row1 + x0 + 1, dx * fx * fy, mask=in11, sem="relaxed")
