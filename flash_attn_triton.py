"""FlashAttention-2 in Triton: forward, backward, dropout, torch.compile-able.

    python flash_attn_triton.py     # correctness check, then the benchmark table (CUDA)

Attention for one (batch, head) is O = softmax(scale * Q K^T + causal mask) V.
Written naively it materialises the T x T score matrix in GPU memory, which is
both slow (memory-bound) and large. FlashAttention never builds it:

- Tiling. A program owns BLOCK_M query rows and streams over the keys in
  blocks of BLOCK_N. Each step loads one K and one V tile into on-chip memory,
  computes the BLOCK_M x BLOCK_N score tile with a tensor-core matmul, and
  folds it into a running output. HBM traffic is O(T * D) per program instead
  of O(T^2).
- Online softmax. The softmax denominator needs the whole row, but we only see
  it a tile at a time. Keep per row the running maximum m and running sum l of
  exp(s - m). When a new tile raises the maximum to m', everything accumulated
  so far was scaled by exp(-m) and must be rescaled by alpha = exp(m - m'):
  l <- alpha * l + rowsum(exp(s - m')), acc <- alpha * acc + exp(s - m') V.
  The division by l happens once at the end. We work in base 2 (exp2 is one
  hardware instruction): scores are multiplied by scale * log2(e) up front.
  The forward also saves the row's log-sum-exp, lse = m + log(l): with it the
  backward can rebuild any probability directly, P = exp(scale * q.k - lse).
  It is saved in base 2 too (m + log2(l)): taken to natural log and back, it
  lost a few ulp of the row's maximum, which the backward's exp2 turns into a
  relative error of P (1% at softmax_scale 1e4, dV with it).
- Causal block skipping. With a causal mask, key blocks entirely above the
  diagonal contribute nothing, so the loop stops at the diagonal (about half
  the work). Blocks entirely below it need no mask at all, so each loop is
  split in two: an unmasked phase for the bulk and a masked phase only for the
  blocks that straddle the diagonal or the end of the sequence.
- Backward by recomputation. Storing P (T x T per head) for the backward would
  cost exactly the memory FlashAttention avoids; recomputing it from Q, K and
  lse costs one extra matmul per tile and is cheaper than reading it back.
  With D_i = rowsum(dO_i * O_i):
      dV = P^T dO,  dP = dO V^T,  dS = P * (dP - D),  dQ = scale dS K,
      dK = scale dS^T Q.
  dK and dV are sums over queries, dQ a sum over keys. We run one kernel per
  query block (accumulating dQ while streaming keys), then one per key block
  (accumulating dK, dV while streaming queries). That recomputes Q K^T and
  dO V^T twice, but no two programs ever write the same output, so there are
  no atomics and results are bitwise deterministic (the alternative,
  accumulating dQ with fp32 atomic adds from the key-block programs, saves two
  matmuls but is nondeterministic and contends on memory). D_i needs only row
  i's O and dO: the dQ program, which loads its rows' dO anyway, loads their O
  too, computes D, uses it, and stores it for the dK/dV kernel (which needs
  every row's D, hence the order; a separate kernel would cost a launch and a
  second read of dO).

Conventions (what model.py relies on):

- Inputs are (batch, heads, seq, head_dim) with any strides as long as the last
  dimension is contiguous. model.py passes (B, T, H, D) tensors seen as
  (B, H, T, D) with `.transpose(1, 2)`: q and k as rotary writes them, v as a
  view into the [q | k | v | fc1] projection; the strides go to the kernels as
  arguments, so nothing is copied.
- The output is a (B, Tq, H, D)-contiguous buffer viewed as (B, H, Tq, D), so
  `out.transpose(1, 2).reshape(B, Tq, H * D)` is free. dQ/dK/dV use the same
  (B, T, H, D) memory order, except for an input that is a plain contiguous
  (B, H, T, D) tensor, whose gradient keeps that layout (no copy in autograd).
- Query length may differ from key length. Queries are aligned to the END of
  the keys (the KV-cache convention): with causal=True, query i sees keys
  j <= i + (Tk - Tq). Queries that see no key at all (only possible when
  Tq > Tk) output zeros and have lse = -inf.
- Dropout on the attention probabilities is drawn inside the kernels with
  Philox: element (b, h, i, j) keeps its probability iff
  tl.rand(seed, ((b * H + h) * Tq + i) * Tk + j) >= p (int64 offsets). The
  backward regenerates the identical mask; kept values are scaled by 1/(1-p).
  `dropout_mask()` returns that mask for tests. With seed=None the seed is
  drawn from torch's generator on the device, so torch.manual_seed fixes it.
- Head dims 32, 64, 80, 128; fp16 and bf16; CUDA. Head dim 80 is padded to 128
  inside the kernel (masked loads and stores). `unsupported_reason()` says why
  a call cannot run here; model.py uses it to fall back to SDPA.
- The op is registered with torch.library.triton_op ("phi1::flash_attn_fwd"
  and "phi1::flash_attn_bwd") with its autograd attached, so torch.compile
  traces through it without graph breaks. Eager calls skip the op dispatcher
  (a plain torch.autograd.Function over the same launchers) to save host time.
- Block sizes are autotuned per GPU generation (lists below; the first entry
  of each is the default, FLASH_ATTN_AUTOTUNE=0 or set_autotune(False) uses
  only it).
- TRITON_INTERPRET=1 runs the kernels on the CPU (slowly, for tests); CPU
  tensors are accepted only then.
"""

import contextlib
import functools
import math
import operator
import os
import sys

import numpy as np
import torch

from config import is_number

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the CPU check below needs it

try:
    import triton
    import triton.language as tl
except ImportError:  # model.py then uses SDPA
    if __name__ == "__main__":
        sys.exit("error: flash_attn_triton.py needs triton (pip install triton; CUDA builds of torch bring theirs)")
    raise

try:
    # Triton's own reading (true/on/yes count too), so that this module and the
    # @triton.jit decorators below agree on whether kernels are interpreted.
    INTERPRET = bool(triton.knobs.runtime.interpret)
except AttributeError:  # older triton, without knobs, tested the variable for "1"
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HEAD_DIMS = (32, 64, 80, 128)
LOG2E = 1.4426950408889634
MAX_SCALE = 1e6  # softmax_scale at most (1/sqrt(head_dim) is at most 0.18 here)

if INTERPRET:
    # Interpreters without triton-lang/triton#9171 (triton 3.6 among them)
    # turn their size-1 scalar arrays into Python ints with int(array), which
    # numpy >= 2.4 refuses; runtime loop bounds then fail ("only 0-dimensional
    # arrays can be converted"). Reading the element explicitly works on every
    # version, fixed or not.
    from triton.runtime import interpreter as _interp

    if not getattr(_interp._patch_lang_tensor, "_phi1_compat", False):
        _orig_patch_lang_tensor = _interp._patch_lang_tensor

        def _patch_lang_tensor(tensor, scope):
            _orig_patch_lang_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        _patch_lang_tensor._phi1_compat = True
        _interp._patch_lang_tensor = _patch_lang_tensor


# -----------------------------------------------------------------------------
# Shared device helpers


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    # fp32-accumulated tensor-core matmul. The interpreter (triton 3.6) stores
    # bf16 as raw uint16 and would multiply the bit patterns, so there we widen
    # to fp32 first; products of bf16 numbers are exact in fp32, so this is the
    # same arithmetic the GPU does.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b)


@triton.jit
def _dot_acc(a, b, acc, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc)


@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr):
    # A [rows, BLOCK_D] tile. Rows past the end of the sequence and the padding
    # columns of a non-power-of-two head dim read as zero; whole-block interior
    # tiles skip the row check.
    if CHECK_ROWS:
        if BLOCK_D != HEAD_DIM:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if BLOCK_D != HEAD_DIM:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store_tile(ptrs, x, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    if BLOCK_D != HEAD_DIM:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))
    else:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)


@triton.jit
def _dropout_keep(seed, offsets, dropout_p):
    # One Philox draw per (batch, head, query, key): offsets are int64, so
    # B * H * Tq * Tk may exceed 2^31 (tl.rand folds the high word into the
    # second Philox counter).
    return tl.rand(seed, offsets) >= dropout_p


# -----------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, lo, hi, offs_m, offs_n, offs_d, stride_kn, stride_vn,
               Tk, diag, qk_scale, seed, dropout_p, drop_rows,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    # Stream key blocks [lo, hi) into the running (acc, l_i, m_i) of BLOCK_M
    # query rows. k_ptrs/v_ptrs point at key block `lo`. MASKED: the blocks
    # that straddle the causal diagonal or the end of the keys.
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_ptrs, cols, Tk, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        s = _dot(q, tl.trans(k), UPCAST)  # raw q.k, fp32 [BLOCK_M, BLOCK_N]
        if MASKED:
            valid = cols[None, :] < Tk
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + diag)
            s = tl.where(valid, s, float("-inf"))
        # Online softmax in base 2. m_i starts at a large finite negative
        # number, so a row whose every key so far is masked gives
        # alpha = exp2(0) = 1 and p = 0 instead of NaN from (-inf) - (-inf).
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser counts dropped entries too
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = _dropout_keep(seed, drop_rows[:, None] + cols[None, :], dropout_p)
            p = tl.where(keep, p, 0.0)  # 1/(1-p) is applied once, at the end
        v = _load_tile(v_ptrs, cols, Tk, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        acc = _dot_acc(p.to(v.dtype), v, acc, UPCAST)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["Tq", "Tk", "TQ_KEY", "TK_KEY", "BH_KEY"])
def _attn_fwd(Q, K, V, O, LSE, SEED,
              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
              H, Tq, Tk, qk_scale, dropout_p,
              TQ_KEY, TK_KEY, BH_KEY,  # autotuning buckets, unused in the body
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
              UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Grid: (query blocks, batch * heads). Under a causal mask the last query
    # blocks have the most keys to visit, so we hand them out first: the
    # heavy programs start early and the tail of the launch is short.
    qk_scale = tl.cast(qk_scale, tl.float32)  # torch.compile passes Python floats as fp64
    dropout_p = tl.cast(dropout_p, tl.float32)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    row0 = pid_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    # Base offsets in int64 (a packed qkv tensor of a long batch passes 2^31
    # elements); offsets inside a tile stay small and int32.
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :]
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    q = _load_tile(q_ptrs, offs_m, Tq, offs_d, True, HEAD_DIM, BLOCK_D)

    # Key range. Query i sees key j iff j <= i + diag (bottom-right aligned).
    # [0, full): every row of the block sees every key, no mask needed.
    # [full, hi): the diagonal band and/or the ragged end of the keys.
    diag = Tk - Tq
    if CAUSAL:
        row_end = tl.minimum(row0 + BLOCK_M, Tq)
        hi = tl.minimum(tl.maximum(row_end + diag, 0), Tk)
        full = tl.minimum(tl.maximum(row0 + diag + 1, 0), Tk)
        full = (full // BLOCK_N) * BLOCK_N
    else:
        hi = Tk
        full = (Tk // BLOCK_N) * BLOCK_N

    if DROPOUT:
        seed = tl.load(SEED)
        drop_rows = (bh.to(tl.int64) * Tq + offs_m) * Tk  # Philox offset of (b, h, i, 0)
    else:
        seed = 0
        drop_rows = offs_m

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, 0, full, offs_m, offs_n, offs_d,
                               stride_kn, stride_vn, Tk, diag, qk_scale, seed, dropout_p, drop_rows,
                               False, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs + full.to(tl.int64) * stride_kn,
                               v_ptrs + full.to(tl.int64) * stride_vn, full, hi, offs_m, offs_n, offs_d,
                               stride_kn, stride_vn, Tk, diag, qk_scale, seed, dropout_p, drop_rows,
                               True, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST)

    # Epilogue: one division per row. A row that saw no key (possible only
    # when Tq > Tk under the causal mask) has l = 0: output 0, lse = -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))  # base 2
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :]
    _store_tile(o_ptrs, out.to(O.dtype.element_ty), offs_m, Tq, offs_d, HEAD_DIM, BLOCK_D)
    tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)


# -----------------------------------------------------------------------------
# Backward


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, lo, hi, offs_m, offs_n, offs_d,
                    stride_qm, stride_dom, Tq, Tk, diag, qk_scale, seed, dropout_p, inv_keep, drop_bh,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr):
    # Stream query blocks [lo, hi) past one block of keys. Everything is
    # computed transposed ([keys, queries]) so that the results land in dK and
    # dV without transposing the big tiles.
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = _load_tile(q_ptrs, rows, Tq, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        do = _load_tile(do_ptrs, rows, Tq, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        if MASKED:
            lse = tl.load(lse_ptr + rows, mask=rows < Tq, other=float("inf"))
            delta = tl.load(delta_ptr + rows, mask=rows < Tq, other=0.0)
        else:
            lse = tl.load(lse_ptr + rows)
            delta = tl.load(delta_ptr + rows)
        # Rows that saw no key store lse = -inf; +inf makes their P exactly 0.
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        # Recompute P^T from the saved log-sum-exp: no running max needed.
        pT = tl.math.exp2(_dot(k, tl.trans(q), UPCAST) * qk_scale - lse[None, :])
        if MASKED:
            if CAUSAL:
                pT = tl.where(offs_n[:, None] <= rows[None, :] + diag, pT, 0.0)
        dpT = _dot(v, tl.trans(do), UPCAST)  # gradient of the (dropped) probabilities
        if DROPOUT:
            keepT = _dropout_keep(seed, (drop_bh + rows[None, :]) * Tk + offs_n[:, None], dropout_p)
            pdT = tl.where(keepT, pT * inv_keep, 0.0)
            dpT = tl.where(keepT, dpT * inv_keep, 0.0)
        else:
            pdT = pT
        dv = _dot_acc(pdT.to(do.dtype), do, dv, UPCAST)
        dsT = pT * (dpT - delta[None, :])
        dk = _dot_acc(dsT.to(q.dtype), q, dk, UPCAST)
        q_ptrs += BLOCK_M * stride_qm
        do_ptrs += BLOCK_M * stride_dom
    return dk, dv


@triton.jit(do_not_specialize=["Tq", "Tk", "TQ_KEY", "TK_KEY", "BH_KEY"])
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, SEED,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                   stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                   H, Tq, Tk, qk_scale, sm_scale, dropout_p,
                   TQ_KEY, TK_KEY, BH_KEY,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                   UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Grid: (key blocks, batch * heads). One program owns BLOCK_N keys and
    # their dK, dV accumulators (fp32, in registers) and streams every query
    # block that can see them. Low key blocks are seen by the most queries,
    # so the natural launch order already starts the heavy programs first.
    qk_scale = tl.cast(qk_scale, tl.float32)
    sm_scale = tl.cast(sm_scale, tl.float32)
    dropout_p = tl.cast(dropout_p, tl.float32)
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    col0 = pid_n * BLOCK_N
    offs_n = col0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    cols = offs_n[:, None].to(tl.int64)
    k = _load_tile(K + b * stride_kb + h * stride_kh + cols * stride_kn + offs_d[None, :],
                   offs_n, Tk, offs_d, True, HEAD_DIM, BLOCK_D)
    v = _load_tile(V + b * stride_vb + h * stride_vh + cols * stride_vn + offs_d[None, :],
                   offs_n, Tk, offs_d, True, HEAD_DIM, BLOCK_D)
    # Keys past Tk read as zero; their dK/dV rows come out as garbage and are
    # never stored, and they cannot disturb the valid rows.

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :]
    lse_ptr = LSE + bh.to(tl.int64) * Tq
    delta_ptr = DELTA + bh.to(tl.int64) * Tq

    # Query range, three phases:
    #   A [lo, mid)   queries on the causal diagonal of this key block: masked
    #   B [mid, end)  queries that see every key of the block: no mask
    #   C [.., Tq)    the ragged last query block: row-checked loads
    # Query i sees key j iff i >= j - diag. Queries before lo see none of the
    # block and are skipped entirely (causal block skipping).
    diag = Tk - Tq
    if CAUSAL:
        lo = tl.maximum(col0 - diag, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        last_col = tl.minimum(col0 + BLOCK_N, Tk) - 1
        mid = tl.maximum(last_col - diag, 0)
        mid = tl.maximum(((mid + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, lo)
    else:
        lo = pid_n * 0
        mid = lo
    full_end = (Tq // BLOCK_M) * BLOCK_M
    tail = tl.maximum(mid, full_end)

    if DROPOUT:
        seed = tl.load(SEED)
    else:
        seed = 0
    drop_bh = bh.to(tl.int64) * Tq
    inv_keep = 1.0 / (1.0 - dropout_p)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs + lo.to(tl.int64) * stride_qm,
                             do_ptrs + lo.to(tl.int64) * stride_dom, lse_ptr, delta_ptr,
                             lo, tl.minimum(mid, Tq), offs_m, offs_n, offs_d, stride_qm, stride_dom,
                             Tq, Tk, diag, qk_scale, seed, dropout_p, inv_keep, drop_bh,
                             True, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs + mid.to(tl.int64) * stride_qm,
                             do_ptrs + mid.to(tl.int64) * stride_dom, lse_ptr, delta_ptr,
                             mid, full_end, offs_m, offs_n, offs_d, stride_qm, stride_dom,
                             Tq, Tk, diag, qk_scale, seed, dropout_p, inv_keep, drop_bh,
                             False, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs + tail.to(tl.int64) * stride_qm,
                             do_ptrs + tail.to(tl.int64) * stride_dom, lse_ptr, delta_ptr,
                             tail, Tq, offs_m, offs_n, offs_d, stride_qm, stride_dom,
                             Tq, Tk, diag, qk_scale, seed, dropout_p, inv_keep, drop_bh,
                             True, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST)

    dk = dk * sm_scale  # S = scale * Q K^T, so the chain rule brings one scale
    _store_tile(DK + b * stride_dkb + h * stride_dkh + cols * stride_dkn + offs_d[None, :],
                dk.to(DK.dtype.element_ty), offs_n, Tk, offs_d, HEAD_DIM, BLOCK_D)
    _store_tile(DV + b * stride_dvb + h * stride_dvh + cols * stride_dvn + offs_d[None, :],
                dv.to(DV.dtype.element_ty), offs_n, Tk, offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, lo, hi, offs_m, offs_n, offs_d, stride_kn, stride_vn,
                  Tk, diag, qk_scale, seed, dropout_p, inv_keep, drop_rows,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_ptrs, cols, Tk, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        v = _load_tile(v_ptrs, cols, Tk, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        p = tl.math.exp2(_dot(q, tl.trans(k), UPCAST) * qk_scale - lse[:, None])
        if MASKED:
            # Must mask, not just rely on zero-padded K: exp2 of a padded
            # score can overflow to inf, and inf * 0 is NaN.
            valid = cols[None, :] < Tk
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + diag)
            p = tl.where(valid, p, 0.0)
        dp = _dot(do, tl.trans(v), UPCAST)
        if DROPOUT:
            keep = _dropout_keep(seed, drop_rows[:, None] + cols[None, :], dropout_p)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        dq = _dot_acc(ds.to(k.dtype), k, dq, UPCAST)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return dq


@triton.jit(do_not_specialize=["Tq", "Tk", "TQ_KEY", "TK_KEY", "BH_KEY"])
def _attn_bwd_dq(Q, K, V, O, DO, DQ, LSE, DELTA, SEED,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                 stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
                 H, Tq, Tk, qk_scale, sm_scale, dropout_p,
                 TQ_KEY, TK_KEY, BH_KEY,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                 UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Grid: (query blocks, batch * heads), heaviest blocks first as in the
    # forward. Same key range and phase split as the forward. Runs before the
    # dK/dV kernel, for which it stores D = rowsum(dO * O) of its rows.
    qk_scale = tl.cast(qk_scale, tl.float32)
    sm_scale = tl.cast(sm_scale, tl.float32)
    dropout_p = tl.cast(dropout_p, tl.float32)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    row0 = pid_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m[:, None].to(tl.int64)
    q = _load_tile(Q + b * stride_qb + h * stride_qh + rows * stride_qm + offs_d[None, :],
                   offs_m, Tq, offs_d, True, HEAD_DIM, BLOCK_D)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + rows * stride_dom + offs_d[None, :],
                    offs_m, Tq, offs_d, True, HEAD_DIM, BLOCK_D)
    lse = tl.load(LSE + bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    # D_i = sum_d dO[i, d] * O[i, d] = rowsum(P * dP), the term the softmax
    # Jacobian subtracts. (With dropout it still holds: O is the dropped and
    # rescaled output.)
    o = _load_tile(O + b * stride_ob + h * stride_oh + rows * stride_om + offs_d[None, :],
                   offs_m, Tq, offs_d, True, HEAD_DIM, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)

    diag = Tk - Tq
    if CAUSAL:
        row_end = tl.minimum(row0 + BLOCK_M, Tq)
        hi = tl.minimum(tl.maximum(row_end + diag, 0), Tk)
        full = tl.minimum(tl.maximum(row0 + diag + 1, 0), Tk)
        full = (full // BLOCK_N) * BLOCK_N
    else:
        hi = Tk
        full = (Tk // BLOCK_N) * BLOCK_N

    if DROPOUT:
        seed = tl.load(SEED)
    else:
        seed = 0
    drop_rows = (bh.to(tl.int64) * Tq + offs_m) * Tk
    inv_keep = 1.0 / (1.0 - dropout_p)

    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, 0, full, offs_m, offs_n, offs_d,
                       stride_kn, stride_vn, Tk, diag, qk_scale, seed, dropout_p, inv_keep, drop_rows,
                       False, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_ptrs + full.to(tl.int64) * stride_kn,
                       v_ptrs + full.to(tl.int64) * stride_vn, full, hi, offs_m, offs_n, offs_d,
                       stride_kn, stride_vn, Tk, diag, qk_scale, seed, dropout_p, inv_keep, drop_rows,
                       True, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST)
    dq = dq * sm_scale
    _store_tile(DQ + b * stride_dqb + h * stride_dqh + rows * stride_dqm + offs_d[None, :],
                dq.to(DQ.dtype.element_ty), offs_m, Tq, offs_d, HEAD_DIM, BLOCK_D)


@triton.jit(do_not_specialize=["Tq", "Tk"])
def _dropout_mask_kernel(SEED, MASK, Tq, Tk, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Writes the keep-mask the attention kernels draw, through the same
    # _dropout_keep and the same offsets. Only for tests and debugging.
    bh = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offsets = (bh * Tq + rows[:, None]) * Tk + cols[None, :]
    keep = _dropout_keep(tl.load(SEED), offsets, tl.cast(dropout_p, tl.float32))
    tl.store(MASK + offsets, keep.to(tl.int8), mask=(rows[:, None] < Tq) & (cols[None, :] < Tk))


# -----------------------------------------------------------------------------
# Block sizes and autotuning
#
# Each entry is (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M always
# counts query rows and BLOCK_N key rows, in every kernel. "small" lists are
# for head dims up to 64, "large" for 80 and 128 (bigger tiles would spill
# the fp32 accumulators out of registers). The first entry of each list is
# the default used without autotuning (FLASH_ATTN_AUTOTUNE=0, tests).

_HOPPER = {  # sm_90: H100, H200 (228 KB shared memory, wgmma)
    "fwd": {"small": [(128, 64, 8, 4), (128, 64, 8, 5), (128, 128, 8, 4), (128, 64, 4, 3), (64, 64, 4, 3)],
            "large": [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3)]},
    "dkdv": {"small": [(64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 8, 3), (32, 64, 4, 4), (64, 128, 8, 3)],
             "large": [(32, 64, 4, 3), (32, 64, 4, 4), (64, 64, 4, 3), (32, 128, 8, 3)]},
    "dq": {"small": [(128, 32, 4, 4), (128, 32, 4, 5), (128, 64, 4, 4), (128, 64, 8, 3), (64, 64, 4, 3)],
           "large": [(128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 4, 4), (64, 64, 4, 3)]},
}
_AMPERE = {  # sm_80/86/89: A100, RTX 30/40 (100-164 KB shared memory)
    "fwd": {"small": [(128, 64, 4, 3), (64, 64, 4, 3)], "large": [(128, 64, 8, 2), (64, 64, 4, 2)]},
    "dkdv": {"small": [(64, 128, 8, 2), (64, 64, 4, 2)], "large": [(64, 64, 4, 2), (32, 64, 4, 2)]},
    "dq": {"small": [(128, 64, 8, 2), (64, 64, 4, 2)], "large": [(64, 64, 4, 2), (128, 32, 8, 2)]},
}
_OLDER = {  # anything else: one conservative config
    "fwd": {"small": [(64, 64, 4, 2)], "large": [(64, 64, 4, 2)]},
    "dkdv": {"small": [(64, 64, 4, 2)], "large": [(32, 64, 4, 2)]},
    "dq": {"small": [(64, 64, 4, 2)], "large": [(64, 32, 4, 2)]},
}
# The interpreter: small, unequal blocks so that even short test sequences
# cross several blocks and every phase boundary.
_INTERPRETER = {
    "fwd": {"small": [(32, 16, 1, 1)], "large": [(32, 16, 1, 1)]},
    "dkdv": {"small": [(16, 32, 1, 1)], "large": [(16, 32, 1, 1)]},
    "dq": {"small": [(32, 16, 1, 1)], "large": [(32, 16, 1, 1)]},
}
_TUNE_KEY = ["TQ_KEY", "TK_KEY", "BH_KEY", "HEAD_DIM", "CAUSAL", "DROPOUT"]
_autotuners = {}

AUTOTUNE = os.environ.get("FLASH_ATTN_AUTOTUNE", "1") != "0"


def set_autotune(enabled: bool) -> None:
    """Autotune block sizes (default) or always use each list's first entry."""
    global AUTOTUNE
    AUTOTUNE = bool(enabled)


def _config_table():
    if INTERPRET:
        return _INTERPRETER
    major = torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 0
    return _HOPPER if major >= 9 else _AMPERE if major == 8 else _OLDER


def _prune(configs, named_args, **kwargs):
    # Drop blocks far larger than the sequence (decode: Tq = 1) and keep the
    # smallest one if nothing is left.
    tq, tk = named_args["TQ_KEY"], named_args["TK_KEY"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, tq) and c.kwargs["BLOCK_N"] <= max(64, tk)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _kernel(jit_fn, head_dim: int):
    """The launchable kernel: an autotuner over this GPU's list, or its default."""
    size = "small" if head_dim <= 64 else "large"
    tuned = AUTOTUNE and not INTERPRET
    key = (jit_fn, size, tuned)
    if key not in _autotuners:
        name = {_attn_fwd: "fwd", _attn_bwd_dkdv: "dkdv", _attn_bwd_dq: "dq"}[jit_fn]
        table = _config_table()[name][size]
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                   for m, n, w, s in (table if tuned else table[:1])]
        # A single config is never benchmarked; outputs are written, never
        # accumulated, so benchmarking needs no reset between runs.
        _autotuners[key] = triton.autotune(configs, key=_TUNE_KEY,
                                           prune_configs_by={"early_config_prune": _prune})(jit_fn)
    return _autotuners[key]


_best_configs = {}  # eager launches: tuning key -> the winning config's launch kwargs


def _run(jit_fn, head_dim, grid, args, kwargs):
    """Eager launch of a tuned kernel. The autotuner runs once per tuning key;
    later calls launch the JIT function directly with the remembered config,
    skipping the autotuner's per-launch argument scans (tens of microseconds
    of host time per launch). (Under torch.compile the autotuner itself goes
    into the graph and Inductor launches it.)"""
    tuner = _kernel(jit_fn, head_dim)
    key = (tuner, args[-3], args[-2], args[-1], kwargs["HEAD_DIM"], kwargs["CAUSAL"], kwargs["DROPOUT"],
           args[0].dtype)
    cfg = _best_configs.get(key)
    with on_device_of(args[0]):
        if cfg is None:
            tuner[grid](*args, **kwargs)
            _best_configs[key] = tuner.best_config.all_kwargs()
        else:
            jit_fn[grid](*args, **kwargs, **cfg)


def on_device_of(tensor):
    """Triton launches on the current CUDA device, and the tensors may be on another: a model
    on cuda:1, or a server's worker thread (a new thread's current device is cuda:0). This
    makes it theirs for the launch. (Under torch.compile, Inductor's code does the same.)"""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def wrap_triton(kernel):
    # Under torch.compile, torch.library.wrap_triton turns a launch into a node
    # of the graph instead of an opaque call (the interpreter runs kernels
    # directly). Keep this name: torch reads the launches `wrap_triton(kernel)`
    # in the triton_op's source to key its compile cache on the kernel code.
    return kernel if INTERPRET else torch.library.wrap_triton(kernel)


def _cdiv(a: int, b: int) -> int:  # triton.cdiv and next_power_of_2 are jit
    return -(-a // b)               # helpers with ~5 us of overhead a call


def _pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def _faking(*tensors) -> bool:
    # Under the interpreter the kernels are plain Python that reads memory, so
    # when torch.compile runs this op on fake tensors to learn output shapes,
    # we skip the launches (on CUDA, wrap_triton handles this itself).
    if not INTERPRET:
        return False
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    if any(isinstance(t, FunctionalTensor) for t in tensors):
        # AOTAutograd would trace this body, but interpreted kernels are
        # invisible to it (no wrap_triton): refuse rather than drop them.
        raise RuntimeError("flash_attn under TRITON_INTERPRET=1 supports torch.compile(backend='eager') only")
    return any(is_fake(t) for t in tensors)


def _btHd(B, H, T, D, like):
    # A (B, T, H, D)-contiguous buffer seen as (B, H, T, D).
    return torch.empty_strided((B, H, T, D), (T * H * D, D, H * D, 1), dtype=like.dtype, device=like.device)


# -----------------------------------------------------------------------------
# Launchers (shared by the eager autograd.Function and the torch.library ops)


def _fwd_impl(q, k, v, seed, causal, dropout_p, softmax_scale, traced):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    out = _btHd(B, H, Tq, D, q)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if traced and _faking(q):
        return out, lse

    def grid(meta):
        return (_cdiv(Tq, meta["BLOCK_M"]), B * H)

    args = (q, k, v, out, lse, seed, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            H, Tq, Tk, softmax_scale * LOG2E, dropout_p,
            _pow2(Tq), _pow2(Tk), _pow2(B * H))  # the last three: autotuning buckets
    kwargs = dict(HEAD_DIM=D, BLOCK_D=_pow2(D), CAUSAL=causal, DROPOUT=dropout_p > 0.0,
                  UPCAST=INTERPRET and q.dtype == torch.bfloat16)
    if traced:
        # torch reads `wrap_triton(kernel)` in this source to find the kernels
        # behind the op (its compile cache is keyed on their code).
        kernel = _kernel(_attn_fwd, D)
        wrap_triton(kernel)[grid](*args, **kwargs)
    else:
        _run(_attn_fwd, D, grid, args, kwargs)
    return out, lse


def _bwd_impl(dout, q, k, v, out, lse, seed, causal, dropout_p, softmax_scale, traced):
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    # autograd may hand back any layout (expanded, transposed): the kernels
    # only need the head dim contiguous.
    # A sequence stride of 2**23 or more would overflow the kernels' int32 tile
    # offsets (unsupported_reason refuses such q, k, v).
    if dout.dtype != q.dtype or dout.stride(-1) != 1 or dout.stride(2) >= 2**23:
        dout = dout.to(q.dtype).contiguous()
    # Gradients in (B, T, H, D) order, like the output, unless an input is a
    # plain contiguous (B, H, T, D) tensor: then its own layout, so autograd
    # can hand the buffer over without a copy.
    dq, dk, dv = (torch.empty_like(t) if t.is_contiguous() else _btHd(B, H, t.shape[2], D, t) for t in (q, k, v))
    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)  # the dQ kernel fills it
    if traced and _faking(q):
        return dq, dk, dv
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    tail = (H, Tq, Tk, softmax_scale * LOG2E, softmax_scale, dropout_p,
            _pow2(Tq), _pow2(Tk), _pow2(B * H))  # the last three: autotuning buckets
    kwargs = dict(HEAD_DIM=D, BLOCK_D=_pow2(D), CAUSAL=causal, DROPOUT=dropout_p > 0.0,
                  UPCAST=INTERPRET and q.dtype == torch.bfloat16)

    # dQ first: it also writes delta, which the dK/dV kernel reads.
    def grid_m(meta):
        return (_cdiv(Tq, meta["BLOCK_M"]), B * H)

    args = (q, k, v, out, dout, dq, lse, delta, seed, *strides, *out.stride()[:3], *dout.stride()[:3],
            *dq.stride()[:3], *tail)
    if traced:
        dq_kernel = _kernel(_attn_bwd_dq, D)
        wrap_triton(dq_kernel)[grid_m](*args, **kwargs)
    else:
        _run(_attn_bwd_dq, D, grid_m, args, kwargs)

    def grid_n(meta):
        return (_cdiv(Tk, meta["BLOCK_N"]), B * H)

    args = (q, k, v, dout, dk, dv, lse, delta, seed, *strides, *dout.stride()[:3],
            *dk.stride()[:3], *dv.stride()[:3], *tail)
    if traced:
        dkdv_kernel = _kernel(_attn_bwd_dkdv, D)
        wrap_triton(dkdv_kernel)[grid_n](*args, **kwargs)
    else:
        _run(_attn_bwd_dkdv, D, grid_n, args, kwargs)
    return dq, dk, dv


# -----------------------------------------------------------------------------
# Autograd, twice over. Under torch.compile the calls go through the
# torch.library ops below (Dynamo sees an op with a registered autograd and a
# fake implementation; AOTAutograd then traces their bodies, so Inductor sees
# the Triton launches themselves). Eager calls take a plain
# torch.autograd.Function over the same launchers: an op call costs some 50 us
# of dispatch on the host, which adds up over 24 layers of token-by-token
# generation.


@torch.library.triton_op("phi1::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: torch.Tensor, causal: bool,
                       dropout_p: float, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    # triton_op also registers this body as the fake (meta) implementation:
    # on fake tensors the wrapped launches do nothing and only shapes flow.
    return _fwd_impl(q, k, v, seed, causal, dropout_p, softmax_scale, traced=True)


@torch.library.triton_op("phi1::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, seed: torch.Tensor, causal: bool, dropout_p: float,
                       softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(dout, q, k, v, out, lse, seed, causal, dropout_p, softmax_scale, traced=True)


def _setup_context(ctx, inputs, output):
    q, k, v, seed, causal, dropout_p, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seed)
    ctx.causal, ctx.dropout_p, ctx.softmax_scale = causal, dropout_p, softmax_scale
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # else autograd fills a zero gradient for lse: a launch per backward


def _gradients(ctx, dout, backward):
    """dq, dk, dv from backward, and None for the settings; all None when no gradient reaches
    out (with materialize_grads off, autograd passes None rather than a tensor of zeros)."""
    if dout is None:
        return (None,) * 7
    q, k, v, out, lse, seed = ctx.saved_tensors
    dq, dk, dv = backward(dout, q, k, v, out, lse, seed, ctx.causal, ctx.dropout_p, ctx.softmax_scale)
    return dq, dk, dv, None, None, None, None


def _first_order_only(backward):
    """backward, refused under create_graph=True: the kernels record no graph, so
    a gradient of the gradient would silently lack this op's terms.
    (once_differentiable is not enough: it refuses only when the incoming
    gradient requires grad, and a linear loss hands in one that does not.)"""
    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():  # autograd runs a backward in grad mode iff create_graph=True
            raise RuntimeError("flash_attn_func has no double backward (create_graph=True): "
                               "use attention_reference or SDPA for higher-order gradients")
        return backward(ctx, *grads)
    return checked


@_first_order_only
def _op_backward(ctx, dout, dlse):
    return _gradients(ctx, dout, _flash_attn_bwd_op)


_flash_attn_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


class _FlashAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seed, causal, dropout_p, softmax_scale):
        out, lse = _fwd_impl(q, k, v, seed, causal, dropout_p, softmax_scale, traced=False)
        _setup_context(ctx, (q, k, v, seed, causal, dropout_p, softmax_scale), (out, lse))
        return out, lse

    @staticmethod
    @_first_order_only
    def backward(ctx, dout, dlse):
        return _gradients(ctx, dout, functools.partial(_bwd_impl, traced=False))


def _attention(q, k, v, seed_t, causal, dropout_p, scale):
    if torch.compiler.is_compiling():
        return torch.ops.phi1.flash_attn_fwd(q, k, v, seed_t, causal, dropout_p, scale)
    return _FlashAttnFunction.apply(q, k, v, seed_t, causal, dropout_p, scale)


# -----------------------------------------------------------------------------
# Public API


def unsupported_reason(q, k, v, dropout_p=0.0):
    """None if the kernel can take these tensors, else a short reason why not."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return "q, k and v must be tensors"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return (f"expected 4-d (batch, heads, seq, head_dim) tensors, got shapes "
                f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} is not supported (float16 or bfloat16 only)"
    if not q.device == k.device == v.device:
        return f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})"
    if q.device.type != "cuda" and not (INTERPRET and q.device.type == "cpu"):
        return f"tensors on {q.device}: the Triton kernel needs a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)"
    B, H, Tq, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H):
        return (f"batch/heads differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                f"(grouped-query attention is not supported)")
    if k.shape[2] != v.shape[2]:
        return f"k and v lengths differ: k {tuple(k.shape)}, v {tuple(v.shape)}"
    if k.shape[3] != D or v.shape[3] != D:
        return f"head dims differ: q {D}, k {k.shape[3]}, v {v.shape[3]}"
    if D not in HEAD_DIMS:
        return f"head_dim {D} is not supported (one of {HEAD_DIMS})"
    if B * H == 0 or Tq == 0 or k.shape[2] == 0:
        return f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}"
    if B * H > 65535:
        return f"batch * heads = {B * H} exceeds the kernel's grid limit of 65535"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(3) != 1:
            return f"{name} must be contiguous in head_dim (stride 1), got strides {tuple(t.stride())}"
        if t.stride(2) >= 2**23:  # tile offsets (stride * block rows) are int32
            return f"{name}'s sequence stride {t.stride(2)} is too large (must be below 2**23)"
    return _dropout_p_reason(dropout_p)


def _dropout_p_reason(dropout_p):
    # (the kernels keep it in fp32, where a p within 2**-25 of 1 rounds to 1: 1 / (1 - p) would be inf)
    if not is_number(dropout_p) or not 0.0 <= dropout_p < 1.0 - 2.0**-25:  # (float() of 10**400 overflows)
        return f"dropout_p must be a number in [0, 1), got {dropout_p!r}"
    return None


def _seed_value(seed, caller: str) -> int:
    """seed as an int in [0, 2**63) (numpy's ints and one-element integer
    tensors too), else a ValueError naming the caller."""
    if isinstance(seed, bool) or (isinstance(seed, torch.Tensor) and seed.dtype == torch.bool):
        value = -1  # operator.index would take them as 0 and 1
    else:
        try:
            value = operator.index(seed)
        except TypeError:
            value = -1
    if not 0 <= value < 2**63:
        raise ValueError(f"{caller}: seed must be an int in [0, 2**63), got {seed!r}")
    return value


_UNUSED_SEED = {}  # device -> a seed tensor the kernels never read (dropout_p = 0)


def _check_and_prepare(q, k, v, causal, dropout_p, softmax_scale, seed):
    reason = unsupported_reason(q, k, v, dropout_p)
    if reason is not None:
        raise ValueError(f"flash_attn_func: {reason}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    elif not (is_number(softmax_scale) and softmax_scale <= MAX_SCALE and 2.0**-126 <= softmax_scale * LOG2E):
        # Below, the fp32 scale the kernels use is 0, and a masked score's -inf x 0 is nan. Above,
        # a row's scores could all fall under the running maximum's start (-1e30), and the row
        # would read as one that sees no key: an fp16 score is at most 128 x 65504^2 ~ 5.5e11
        # (bf16 inputs reach 3e38, and their products overflow whatever the scale).
        raise ValueError(f"flash_attn_func: softmax_scale must be a number from {2.0**-126 / LOG2E:.4g} to {MAX_SCALE:g}, got "
                         f"{softmax_scale!r}")
    if not isinstance(causal, (bool, np.bool_)):  # bool("no") would be True
        raise ValueError(f"flash_attn_func: causal must be True or False, got {causal!r}")
    # A given seed is checked even when dropout_p = 0 leaves it unused.
    seed_value = None if seed is None else _seed_value(seed, "flash_attn_func")
    dropout_p = float(dropout_p)
    if dropout_p > 0.0 and seed is None:
        # Drawn on the device from torch's generator: no host sync, and
        # torch.manual_seed makes the whole run reproducible.
        seed_t = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)
    elif dropout_p > 0.0:
        seed_t = torch.full((1,), seed_value, dtype=torch.int64, device=q.device)
    elif torch.compiler.is_compiling():
        seed_t = torch.zeros((1,), dtype=torch.int64, device=q.device)  # never read
    else:
        seed_t = _UNUSED_SEED.get(q.device)
        if seed_t is None:
            with torch.inference_mode(False):  # made under inference_mode, it could never be saved for backward
                seed_t = _UNUSED_SEED[q.device] = torch.zeros((1,), dtype=torch.int64, device=q.device)
    return seed_t, bool(causal), dropout_p, float(softmax_scale)


def flash_attn_func(q, k, v, causal=True, dropout_p=0.0, softmax_scale=None, seed=None):
    """Scaled dot-product attention, FlashAttention-2 style.

    q: (B, H, Tq, D), k and v: (B, H, Tk, D); fp16 or bf16; D in 32/64/80/128;
    any strides with the head dim contiguous. causal=True masks query i from
    keys j > i + (Tk - Tq) (queries aligned to the end of the keys).
    dropout_p drops attention probabilities (Philox, seeded by `seed`, or by
    torch's generator when seed is None). softmax_scale defaults to
    1/sqrt(D). Returns (B, H, Tq, D) stored as (B, Tq, H, D)-contiguous.
    Raises ValueError for inputs the kernel cannot take (see
    unsupported_reason), for a causal that is not a bool, and for a bad
    softmax_scale or seed (a given seed is checked even when dropout_p = 0).
    Differentiable once: a backward with create_graph=True raises
    RuntimeError.
    """
    seed_t, causal, dropout_p, scale = _check_and_prepare(q, k, v, causal, dropout_p, softmax_scale, seed)
    return _attention(q, k, v, seed_t, causal, dropout_p, scale)[0]


def flash_attn_with_lse(q, k, v, causal=True, dropout_p=0.0, softmax_scale=None, seed=None):
    """flash_attn_func that also returns the (B, H, Tq) fp32 log-sum-exp of
    the scaled, masked scores (natural log; -inf for a row that sees no key).
    The lse is not differentiable."""
    seed_t, causal, dropout_p, scale = _check_and_prepare(q, k, v, causal, dropout_p, softmax_scale, seed)
    out, lse2 = _attention(q, k, v, seed_t, causal, dropout_p, scale)
    return out, lse2 * (1.0 / LOG2E)  # the kernels' base 2, in natural log


def dropout_mask(seed, batch, heads, q_len, k_len, dropout_p, device="cuda"):
    """The bool keep-mask (batch, heads, q_len, k_len) that flash_attn_func
    draws for this seed and shape (True = kept). For tests and debugging.
    seed and dropout_p must be what flash_attn_func accepts (ValueError
    otherwise). Under TRITON_INTERPRET=1 `device` is ignored: the mask is
    drawn on the CPU."""
    reason = _dropout_p_reason(dropout_p)
    if reason is not None:
        raise ValueError(f"dropout_mask: {reason}")
    sizes = (batch, heads, q_len, k_len)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes) or batch * heads > 65535:
        raise ValueError(f"dropout_mask: batch, heads, q_len and k_len must be positive integers, batch * heads "
                         f"at most 65535 (the kernel's grid), as flash_attn_func takes; got {sizes}")
    if INTERPRET:
        device = "cpu"
    elif torch.device(device).type != "cuda":
        raise ValueError(f"dropout_mask: the Triton kernel needs a CUDA GPU (or TRITON_INTERPRET=1), not {device}")
    seed_t = torch.full((1,), _seed_value(seed, "dropout_mask"), dtype=torch.int64, device=device)
    mask = torch.empty((batch, heads, q_len, k_len), dtype=torch.int8, device=device)
    grid = (_cdiv(q_len, 32), _cdiv(k_len, 32), batch * heads)
    with on_device_of(mask):
        _dropout_mask_kernel[grid](seed_t, mask, q_len, k_len, float(dropout_p), BLOCK_M=32, BLOCK_N=32)
    return mask.bool()


def attention_reference(q, k, v, causal=True, softmax_scale=None, keep_mask=None, dropout_p=0.0):
    """Plain float32 softmax attention with the same conventions (bottom-right
    causal alignment, empty rows -> 0, optional explicit keep mask scaled by
    1/(1-p)). Returns (out, lse); differentiable in q, k, v."""
    qf, kf, vf = q.float(), k.float(), v.float()
    Tq, Tk = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    s = (qf @ kf.transpose(-1, -2)) * scale
    empty = torch.zeros(Tq, 1, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(Tq, device=q.device)[:, None]
        j = torch.arange(Tk, device=q.device)[None, :]
        masked = j > i + (Tk - Tq)
        s = s.masked_fill(masked, float("-inf"))
        empty = masked.all(-1, keepdim=True)
    # Rows that see no key: softmax of zeros, then zeroed (keeps grads finite).
    s = s.masked_fill(empty, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, dim=-1).masked_fill(empty[:, 0], float("-inf"))
    if keep_mask is not None:
        p = p * keep_mask.to(p.dtype) / (1.0 - dropout_p)
    return p @ vf, lse


# -----------------------------------------------------------------------------
# Correctness check and benchmark: python flash_attn_triton.py


def _max_errors(q, k, v, causal, dout, scale=None):
    """Max abs errors of out, lse, dq, dk, dv against the float32 reference,
    each over max(reference's max magnitude, 1)."""
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    out_ref, lse_ref = attention_reference(qr, kr, vr, causal, scale)
    out_ref.backward(dout.float())
    qx, kx, vx = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = flash_attn_with_lse(qx, kx, vx, causal=causal, softmax_scale=scale)
    out.backward(dout)
    errs = {}
    for name, a, r in (("out", out, out_ref), ("lse", lse, lse_ref), ("dq", qx.grad, qr.grad),
                       ("dk", kx.grad, kr.grad), ("dv", vx.grad, vr.grad)):
        fin = torch.isfinite(r)
        errs[name] = ((a.float() - r).abs()[fin].max() / r.abs()[fin].max().clamp_min(1.0)).item()
    return errs


def _check(cases, device, dtype, tol):
    ok = True
    for B, H, Tq, Tk, D, causal in cases:
        torch.manual_seed(0)
        q = torch.randn(B, Tq, H, D, device=device, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, Tk, H, D, device=device, dtype=dtype).transpose(1, 2)
        v = torch.randn(B, Tk, H, D, device=device, dtype=dtype).transpose(1, 2)
        dout = torch.randn(B, H, Tq, D, device=device, dtype=dtype)
        errs = _max_errors(q, k, v, causal, dout)
        good = all(e <= tol for e in errs.values())
        ok &= good
        shown = " ".join(f"{n} {e:.1e}" for n, e in errs.items())
        print(f"  B{B} H{H} Tq{Tq} Tk{Tk} D{D} {'causal' if causal else 'full  '} {dtype}: "
              f"rel max err {shown}  {'PASS' if good else 'FAIL'}", flush=True)
    return ok


BENCH_SHAPES = [("phi-1", 8, 32, 2048, 64), ("phi-1-small", 16, 16, 2048, 64),
                ("", 4, 16, 4096, 128), ("", 8, 16, 1024, 64)]


def _benchmark(shapes=BENCH_SHAPES, dev="cuda", do_bench=None):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if do_bench is None:
        from triton.testing import do_bench
    dtype = torch.bfloat16
    card = torch.cuda.get_device_name() if dev == "cuda" else dev
    print(f"\nTFLOP/s, causal, bf16, {card} "
          f"(ours on (B,T,H,D)-strided inputs as model.py passes them; SDPA on contiguous (B,H,T,D))")
    head = (f"{'shape':<28}{'fwd ours':>9}{'flash':>7}{'cuDNN':>7}{'ours/cuDNN':>11}"
            f"{'f+b ours':>10}{'flash':>7}{'cuDNN':>7}{'ours/flash':>11}{'ours/cuDNN':>11}")
    print(head)
    print("-" * len(head))

    def sdpa(backend):
        def f(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return f

    impls = [("ours", lambda q, k, v: flash_attn_func(q, k, v, causal=True)),
             ("flash", sdpa(SDPBackend.FLASH_ATTENTION)), ("cudnn", sdpa(SDPBackend.CUDNN_ATTENTION))]
    for name, B, H, T, D in shapes:
        fwd_flops = 2.0 * B * H * T * T * D  # causal: half of 4*B*H*T^2*D
        res = {}
        for impl, fn in impls:
            torch.manual_seed(0)
            if impl == "ours":
                mk = lambda: torch.randn(B, T, H, D, device=dev, dtype=dtype).transpose(1, 2)
            else:
                mk = lambda: torch.randn(B, H, T, D, device=dev, dtype=dtype)
            q, k, v = mk().requires_grad_(), mk().requires_grad_(), mk().requires_grad_()
            dout = torch.randn(B, H, T, D, device=dev, dtype=dtype)
            try:
                with torch.no_grad():
                    ms_f = do_bench(lambda: fn(q, k, v), return_mode="median")

                def fb():
                    fn(q, k, v).backward(dout)

                ms_fb = do_bench(fb, grad_to_none=[q, k, v], return_mode="median")
                res[impl] = (fwd_flops / ms_f * 1e-9, 3.5 * fwd_flops / ms_fb * 1e-9)
            except Exception as e:  # a backend this build or card lacks
                print(f"  ({impl} unavailable for this shape: {type(e).__name__}: {str(e)[:120]})")
                res[impl] = (float("nan"), float("nan"))
        label = f"{name + ' ' if name else ''}B{B} H{H} T{T} D{D}"
        o, f, c = res["ours"], res["flash"], res["cudnn"]
        print(f"{label:<28}{o[0]:>9.0f}{f[0]:>7.0f}{c[0]:>7.0f}{o[0] / c[0]:>11.2f}"
              f"{o[1]:>10.0f}{f[1]:>7.0f}{c[1]:>7.0f}{o[1] / f[1]:>11.2f}{o[1] / c[1]:>11.2f}", flush=True)


def main():
    from config import UserError, parse_args
    if parse_args({}, __doc__)[1]:
        raise UserError("flash_attn_triton.py takes no arguments (see --help)")
    if not torch.cuda.is_available() and not INTERPRET:  # TRITON_INTERPRET is set, but not to on
        raise UserError(f"no CUDA GPU: run with TRITON_INTERPRET=1 for the CPU check "
                        f"(TRITON_INTERPRET is {os.environ.get('TRITON_INTERPRET')!r})")
    if torch.cuda.is_available():
        print(f"correctness vs float32 reference on {torch.cuda.get_device_name()} "
              f"(autotune {'on' if AUTOTUNE else 'off'}):", flush=True)
        # The benchmark shapes at batch 2 (plus one KV-cache-style case).
        cases = [(2, 32, 2048, 2048, 64, True), (2, 16, 4096, 4096, 128, True),
                 (2, 16, 1024, 1024, 64, True), (2, 16, 512, 2048, 64, True)]
        ok = _check(cases, "cuda", torch.bfloat16, tol=2e-2)
        print("correctness:", "PASS" if ok else "FAIL", flush=True)
        _benchmark()
        sys.exit(0 if ok else 1)
    print("no CUDA: correctness check under the Triton interpreter on small shapes", flush=True)
    cases = [(1, 2, 17, 17, 64, True), (1, 2, 33, 65, 80, True), (1, 2, 40, 24, 32, False)]
    ok = _check(cases, "cpu", torch.float16, tol=1e-2)
    print("correctness:", "PASS" if ok else "FAIL")
    print("the benchmark table needs a CUDA GPU")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    from config import run
    run(main)
