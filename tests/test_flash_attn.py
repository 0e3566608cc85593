"""flash_attn_triton against a float32 softmax-attention reference.

On a CPU-only machine the kernels run under TRITON_INTERPRET=1 (set in
conftest.py before anything imports triton) on small shapes; with CUDA the
same tests run on the GPU at full shapes (and the small CPU cases are
skipped, since they exist only to keep the interpreter fast).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import flash_attn_triton as fa  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and not fa.INTERPRET:
    raise RuntimeError("flash_attn_triton was imported before TRITON_INTERPRET=1 was set; "
                       "set it in the environment or in tests/conftest.py")
if CUDA:
    fa.set_autotune(False)  # one default config per kernel: tests should not spend minutes tuning

cpu_only = pytest.mark.skipif(CUDA, reason="small interpreter shape; the CUDA run uses the full shapes")
cuda_only = pytest.mark.skipif(not CUDA, reason="full-size shape, needs a CUDA GPU")

# Errors are measured as max |ours - reference| / max(max |reference|, 1), per
# tensor: relative for large values, absolute where the reference is small
# (with a single key, dq and dk are exactly zero and only rounding remains).
TOL = {torch.float16: 2e-3, torch.bfloat16: 3e-2}
TOL_LSE = 1e-5  # the log-sum-exp is fp32 arithmetic on exact products: rounding only (seen: ~1e-7)
F16, BF16 = torch.float16, torch.bfloat16

# (B, H, Tq, Tk, D, causal, dtype, layout). Together: every head dim, both
# dtypes, causal and not, lengths 1 / odd / past several blocks, Tq < Tk
# (KV-cache prefill chunk, single-token decode), Tq > Tk (with and without
# rows that see no key), and the three layouts model.py can hand over. The
# last two cases, Tk = Tq + 1, put a key block's first visible query just below
# a query-block boundary, where the dK/dV kernel's causal skip starts, the second
# with unmasked query blocks after it (a skip not rounded to a block counted rows twice).
SMALL = [
    (1, 2, 1, 1, 32, True, F16, "bhtd"),
    (2, 2, 17, 17, 64, True, BF16, "qkv"),
    (1, 2, 129, 129, 80, False, F16, "bthd"),
    (1, 1, 129, 129, 128, True, BF16, "bhtd"),
    (1, 2, 17, 129, 64, True, F16, "bthd"),
    (1, 2, 1, 33, 128, True, BF16, "bthd"),
    (1, 2, 65, 17, 32, False, BF16, "bhtd"),
    (1, 2, 40, 17, 80, True, F16, "bhtd"),
    (1, 2, 50, 64, 32, True, F16, "bhtd"),
    (1, 1, 32, 33, 32, True, F16, "bhtd"),
    (1, 1, 100, 101, 32, True, F16, "bhtd"),
]
FULL = [
    (2, 4, 1, 1, 32, True, F16, "bhtd"),
    (2, 8, 2048, 2048, 64, True, BF16, "qkv"),
    (2, 4, 1000, 1000, 80, False, F16, "bthd"),
    (1, 8, 4096, 4096, 128, True, BF16, "bhtd"),
    (2, 8, 257, 2048, 64, True, F16, "bthd"),
    (4, 8, 1, 3001, 128, True, BF16, "bthd"),
    (2, 4, 1531, 300, 32, False, BF16, "bhtd"),
    (2, 4, 777, 301, 80, True, F16, "bhtd"),
    (2, 4, 1000, 1111, 32, True, F16, "bhtd"),
    (2, 4, 1024, 1025, 64, True, BF16, "bthd"),
]
CASES = [pytest.param(*c, marks=cpu_only) for c in SMALL] + [pytest.param(*c, marks=cuda_only) for c in FULL]


def make_qkv(B, H, Tq, Tk, D, dtype, layout, seed=0):
    """q, k, v as (B, H, T, D) views in the requested memory layout, plus the
    leaf tensors that receive the gradients and a getter for (dq, dk, dv)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=DEVICE, dtype=torch.float32).to(dtype)

    if layout == "qkv":  # model.py: one (B, T, 3, H, D) projection output
        assert Tq == Tk
        qkv = randn(B, Tq, 3, H, D).requires_grad_()
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        return q, k, v, [qkv], lambda: tuple(qkv.grad[:, :, i].transpose(1, 2) for i in range(3))
    if layout == "bthd":  # e.g. a KV cache kept as (B, T, H, D)
        leaves = [randn(B, T, H, D).requires_grad_() for T in (Tq, Tk, Tk)]
        q, k, v = (t.transpose(1, 2) for t in leaves)
        return q, k, v, leaves, lambda: tuple(t.grad.transpose(1, 2) for t in leaves)
    leaves = [randn(B, H, T, D).requires_grad_() for T in (Tq, Tk, Tk)]
    return (*leaves, leaves, lambda: tuple(t.grad for t in leaves))


def rel_err(x, ref):
    """Max error over max(max magnitude, 1) on the reference's finite entries;
    the non-finite entries (lse = -inf of rows that see no key) must match."""
    x, ref = x.float(), ref.float()
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(x)), "non-finite entries differ from the reference"
    if not fin.any():
        return 0.0
    assert torch.equal(x[~fin], ref[~fin])
    return ((x - ref).abs()[fin].max() / ref.abs()[fin].max().clamp_min(1.0)).item()


def run_both(B, H, Tq, Tk, D, causal, dtype, layout, dropout_p=0.0, seed=None):
    """Forward and backward through the kernel and the float32 reference (with
    the kernel's own dropout mask); returns {name: (ours, reference)}."""
    q, k, v, _, grads = make_qkv(B, H, Tq, Tk, D, dtype, layout)
    out, lse = fa.flash_attn_with_lse(q, k, v, causal=causal, dropout_p=dropout_p, seed=seed)
    assert out.shape == (B, H, Tq, D) and out.dtype == dtype and lse.shape == (B, H, Tq)
    assert out.transpose(1, 2).is_contiguous(), "output must be (B, Tq, H, D)-contiguous"
    dout = torch.randn(B, H, Tq, D, device=DEVICE, dtype=dtype, generator=torch.Generator(DEVICE).manual_seed(1))
    out.backward(dout)
    dq, dk, dv = grads()

    mask = fa.dropout_mask(seed, B, H, Tq, Tk, dropout_p, device=DEVICE) if dropout_p > 0 else None
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    out_ref, lse_ref = fa.attention_reference(qr, kr, vr, causal, keep_mask=mask, dropout_p=dropout_p)
    out_ref.backward(dout.float())
    return {"out": (out, out_ref), "lse": (lse, lse_ref), "dq": (dq, qr.grad), "dk": (dk, kr.grad),
            "dv": (dv, vr.grad)}


@pytest.mark.parametrize("B,H,Tq,Tk,D,causal,dtype,layout", CASES)
def test_matches_reference(B, H, Tq, Tk, D, causal, dtype, layout):
    res = run_both(B, H, Tq, Tk, D, causal, dtype, layout)
    errs = {name: rel_err(x, ref) for name, (x, ref) in res.items()}
    if not causal or Tq <= Tk:  # every row sees a key: PyTorch's SDPA is a second, independent reference
        q, k, v, _, _ = make_qkv(B, H, Tq, Tk, D, dtype, layout)
        allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=DEVICE).tril(Tk - Tq) if causal else None
        errs["out vs SDPA"] = rel_err(res["out"][0], F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=allowed))
    print(B, H, Tq, Tk, D, causal, dtype, layout, {n: f"{e:.1e}" for n, e in errs.items()})
    assert all(e <= (TOL_LSE if name == "lse" else TOL[dtype]) for name, e in errs.items()), errs


@cpu_only  # the backward's exp2 overflows above the diagonal, where the causal mask then drops it (numpy warns)
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
def test_dv_holds_at_a_large_softmax_scale():
    """The lse went to natural log and back between the passes: a few ulp of the row's maximum,
    which the backward's exp2 made a 6% error of dV at scale 1e5 (the winning key's P off)."""
    q, k, v, leaves, grads = make_qkv(1, 2, 20, 20, 32, F16, "bhtd")
    fa.flash_attn_func(q, k, v, softmax_scale=1e5).backward(torch.ones_like(q))
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    fa.attention_reference(qr, kr, vr, softmax_scale=1e5)[0].backward(torch.ones_like(qr))
    assert rel_err(grads()[2], vr.grad) <= TOL[F16]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA GPU")
def test_tensors_on_a_gpu_that_is_not_the_current_one():
    """Triton launches on the current device: a model on cuda:1 (sample.py --device=cuda:1)
    ran the kernels on cuda:0, with cuda:1's pointers."""
    q, k, v = (torch.randn(1, 2, 100, 64, device="cuda:1", dtype=F16, requires_grad=True) for _ in range(3))
    assert torch.cuda.current_device() == 0
    out = fa.flash_attn_func(q, k, v)
    out.backward(torch.ones_like(out))
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = fa.attention_reference(qr, kr, vr)[0]
    ref.backward(torch.ones_like(ref))
    assert rel_err(out, ref) <= TOL[F16] and rel_err(q.grad, qr.grad) <= TOL[F16]
    mask = fa.dropout_mask(1, 1, 2, 100, 100, 0.5, device="cuda:1")
    assert mask.device == torch.device("cuda:1") and mask.cpu().equal(fa.dropout_mask(1, 1, 2, 100, 100, 0.5).cpu())


def test_dropout_zero_is_no_dropout():
    q, k, v, leaves, grads = make_qkv(1, 2, 33, 33, 64, F16, "bhtd")
    a = fa.flash_attn_func(q, k, v)
    a.sum().backward()
    ga = [g.clone() for g in grads()]
    for t in leaves:
        t.grad = None
    b = fa.flash_attn_func(q, k, v, dropout_p=0.0, seed=123)
    b.sum().backward()
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, grads()))


def test_dropout_deterministic_for_seed():
    q, k, v, leaves, grads = make_qkv(1, 2, 33, 40, 32, BF16, "bthd")
    dout = torch.randn(1, 2, 33, 32, device=DEVICE, dtype=BF16)
    runs = []
    for seed in (7, 7, 8):
        out = fa.flash_attn_func(q, k, v, dropout_p=0.3, seed=seed)
        out.backward(dout)
        runs.append((out.detach().clone(), *(g.clone() for g in grads())))
        for t in leaves:
            t.grad = None
    assert all(torch.equal(x, y) for x, y in zip(runs[0], runs[1])), "same seed, different result"
    assert not torch.equal(runs[0][0], runs[2][0]), "different seeds gave the same output"
    # seed=None draws from torch's generator: torch.manual_seed reproduces it.
    torch.manual_seed(0)
    a = fa.flash_attn_func(q, k, v, dropout_p=0.3)
    torch.manual_seed(0)
    b = fa.flash_attn_func(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_fraction(p):
    Tq, Tk = (64, 96) if not CUDA else (1024, 1024)
    mask = fa.dropout_mask(1234, 2, 3, Tq, Tk, p, device=DEVICE)
    n = mask.numel()
    kept = mask.float().mean().item()
    assert abs(kept - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5 + 1e-3, kept
    # Every (batch, head) draws its own mask.
    flat = mask.view(6, -1)
    assert all(not torch.equal(flat[0], flat[i]) for i in range(1, 6))


@pytest.mark.parametrize("B,H,Tq,Tk,D,causal,dtype,layout", [
    pytest.param(1, 2, 33, 33, 64, True, F16, "bhtd", marks=cpu_only),
    pytest.param(1, 2, 17, 40, 80, False, BF16, "bthd", marks=cpu_only),
    pytest.param(2, 8, 1024, 1024, 64, True, BF16, "qkv", marks=cuda_only),
    pytest.param(2, 4, 333, 1000, 128, True, F16, "bthd", marks=cuda_only),
])
def test_dropout_matches_masked_reference(B, H, Tq, Tk, D, causal, dtype, layout):
    # The reference applies the mask dropout_mask() returns, so this checks at
    # once that the forward, both backward kernels and the helper draw the
    # same mask, and the gradients through the mask.
    res = run_both(B, H, Tq, Tk, D, causal, dtype, layout, dropout_p=0.25, seed=99)
    errs = {name: rel_err(x, ref) for name, (x, ref) in res.items()}
    print(B, H, Tq, Tk, D, causal, dtype, layout, {n: f"{e:.1e}" for n, e in errs.items()})
    assert all(e <= (TOL_LSE if name == "lse" else TOL[dtype]) for name, e in errs.items()), errs


def test_bad_inputs_raise_clear_errors():
    def t(*shape, dtype=F16):
        return torch.randn(*shape, device=DEVICE).to(dtype)

    q = t(1, 2, 8, 64)
    good = (q, t(1, 2, 8, 64), t(1, 2, 8, 64))
    assert fa.unsupported_reason(*good) is None
    bad = [
        ((t(1, 2, 8, 64, dtype=torch.float32),) * 3, {}, "dtype"),
        ((q, t(1, 2, 8, 64, dtype=BF16), t(1, 2, 8, 64)), {}, "dtypes differ"),
        ((t(1, 2, 8, 96),) * 3, {}, "head_dim 96"),
        ((q, t(2, 2, 8, 64), t(2, 2, 8, 64)), {}, "batch/heads"),
        ((q, t(1, 2, 8, 64), t(1, 2, 9, 64)), {}, "lengths differ"),
        ((q, t(1, 2, 8, 32), t(1, 2, 8, 32)), {}, "head dims differ"),
        ((t(2, 8, 64),) * 3, {}, "4-d"),
        ((t(1, 2, 64, 8).transpose(-1, -2), *good[1:]), {}, "contiguous in head_dim"),
        ((t(1, 2, 0, 64), *good[1:]), {}, "empty"),
        (good, {"dropout_p": 1.0}, "dropout_p"),
        (good, {"softmax_scale": -1.0}, "softmax_scale"),
        (good, {"dropout_p": 0.1, "seed": -1}, "seed"),
        (good, {"dropout_p": 0.1, "seed": True}, "seed"),
        (good, {"dropout_p": None}, "dropout_p"),
        (good, {"dropout_p": "0.1"}, "dropout_p"),
        (good, {"softmax_scale": True}, "softmax_scale"),
        (good, {"dropout_p": 1 - 2**-26, "seed": 1}, "dropout_p"),  # 1 in fp32: an output of nan
        (good, {"softmax_scale": 1e-46}, "softmax_scale"),  # 0 in fp32: nan where the causal mask is
        (good, {"softmax_scale": 1e30}, "softmax_scale"),  # every score under the running max's start: 0
        (good, {"softmax_scale": 10**400}, "softmax_scale"),  # an int no float holds: it was an OverflowError
        (good, {"dropout_p": 10**400, "seed": 1}, "dropout_p"),
    ]
    if CUDA:
        bad.append(((t(1, 2, 8, 64).cpu(),) * 3, {}, "CUDA"))
    for args, kwargs, words in bad:
        with pytest.raises(ValueError, match=words):
            fa.flash_attn_func(*args, **kwargs)
    numpy = pytest.importorskip("numpy")  # numpy's numbers are numbers
    fa.flash_attn_func(*good, softmax_scale=numpy.float32(0.1), dropout_p=numpy.float64(0.1), seed=numpy.int64(3))


def test_a_call_under_inference_mode_leaves_later_calls_differentiable():
    """The seed tensor of dropout_p=0, made once per device, was an inference tensor when the
    first call ran under inference_mode, and no later call could save it for backward."""
    fa._UNUSED_SEED.clear()
    q, k, v, leaves, _ = make_qkv(1, 2, 17, 17, 32, F16, "qkv")
    with torch.inference_mode():
        fa.flash_attn_func(q.detach(), k.detach(), v.detach())
    fa.flash_attn_func(q, k, v).float().sum().backward()
    assert leaves[0].grad is not None


def test_the_script_without_triton_says_what_it_needs():
    code = ("import runpy, sys; sys.modules['triton'] = None; sys.argv = ['flash_attn_triton.py']; "
            f"runpy.run_path({str(Path(fa.__file__))!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip() == (
        "error: flash_attn_triton.py needs triton (pip install triton; CUDA builds of torch bring theirs)")


def test_a_second_derivative_is_an_error_not_a_wrong_number():
    """The kernels record no graph, so create_graph=True must fail at once, also for a linear
    loss: its gradient reaches the backward detached, and a penalty on the result would
    silently lose this op's share. A first-order backward still runs, and twice with
    retain_graph."""
    q, k, v, leaves, _ = make_qkv(1, 2, 17, 17, 32, F16, "qkv")
    seed = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    for out in (fa.flash_attn_func(q, k, v),  # eager, and the registered op that compiled graphs call
                torch.ops.phi1.flash_attn_fwd(q, k, v, seed, True, 0.0, 32 ** -0.5)[0]):
        for loss in (out.float().sum(), out.float().square().sum()):
            with pytest.raises(RuntimeError, match="no double backward"):
                torch.autograd.grad(loss, leaves[0], create_graph=True)
        (a,) = torch.autograd.grad(loss, leaves[0], retain_graph=True)
        (b,) = torch.autograd.grad(loss, leaves[0])
        assert torch.equal(a, b)


def test_the_backward_fills_no_gradient_for_the_lse():
    # lse is not differentiable: autograd must not build a zero gradient for it (a fill
    # launch per layer and step) on either path. (Leaf inputs: slicing a packed qkv has its own fill.)
    q, k, v, _, _ = make_qkv(1, 2, 17, 17, 32, F16, "bhtd")
    seed = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    for out in (fa.flash_attn_func(q, k, v), torch.ops.phi1.flash_attn_fwd(q, k, v, seed, True, 0.0, 32 ** -0.5)[0]):
        dout = torch.ones_like(out)
        with torch.profiler.profile() as prof:
            out.backward(dout)
        ops = {e.key for e in prof.key_averages()}
        assert not ops & {"aten::zeros", "aten::zero_", "aten::fill_"}, sorted(ops)


def test_torch_compile_traces_without_graph_break():
    # fullgraph=True turns any graph break into an error. Under the
    # interpreter only the "eager" backend can run the kernels; on CUDA this
    # goes through Inductor.
    backend = "inductor" if CUDA else "eager"
    B, H, T, D = (2, 4, 256, 64) if CUDA else (1, 2, 17, 32)
    q, k, v, leaves, grads = make_qkv(B, H, T, T, D, F16, "qkv")

    def f(q, k, v):
        return fa.flash_attn_func(q, k, v, causal=True).float().square().sum()

    f(q, k, v).backward()
    expected = tuple(g.clone() for g in grads())
    leaves[0].grad = None
    loss = torch.compile(f, backend=backend, fullgraph=True)(q, k, v)
    loss.backward()
    for got, want in zip(grads(), expected):
        assert torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-3)
    # The registered op (what compiled graphs call) with its registered
    # autograd, called directly, agrees with the eager path bitwise.
    leaves[0].grad = None
    seed = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    out, _ = torch.ops.phi1.flash_attn_fwd(q, k, v, seed, True, 0.0, D ** -0.5)
    out.float().square().sum().backward()
    assert all(torch.equal(got, want) for got, want in zip(grads(), expected))


def test_every_input_is_checked_not_only_the_first():
    """The checks must look at all of q, k and v and stop exactly at their documented bounds:
    test_bad_inputs_raise_clear_errors mostly varies q or k, so a check that skips v (or k),
    a missing Tk = 0 check, or an off-by-one bound would go unnoticed there."""
    def t(*shape, dtype=F16, device=DEVICE):
        return torch.randn(*shape, device=device).to(dtype)

    q, k, v = t(1, 2, 8, 64), t(1, 2, 8, 64), t(1, 2, 8, 64)
    bad = [
        ((q, k, t(1, 2, 8, 64, dtype=BF16)), {}, "dtypes differ"),
        ((q, k, t(1, 2, 8, 32)), {}, "head dims differ"),
        ((q, k, t(2, 2, 8, 64)), {}, "batch/heads"),
        ((q, k, t(1, 2, 8, 64, device="meta")), {}, "different devices"),
        ((q, t(1, 2, 64, 8).transpose(-1, -2), v), {}, "k must be contiguous in head_dim"),
        ((q, k, t(1, 2, 64, 8).transpose(-1, -2)), {}, "v must be contiguous in head_dim"),
        ((q, t(1, 2, 0, 64), t(1, 2, 0, 64)), {}, "empty"),
        ((q, k, v), {"softmax_scale": 0.0}, "softmax_scale"),
        ((q, k, v), {"softmax_scale": float("inf")}, "softmax_scale"),
    ]
    for args, kwargs, words in bad:
        with pytest.raises(ValueError, match=words):
            fa.flash_attn_func(*args, **kwargs)
    # Tile offsets are int32: a sequence stride of exactly 2**23 is already refused.
    big = torch.empty_strided((1, 1, 2, 32), (2 ** 24, 2 ** 24, 2 ** 23, 1), dtype=F16, device=DEVICE)
    assert "sequence stride 8388608 is too large (must be below 2**23)" in fa.unsupported_reason(big, big, big)
    # 0 is a valid seed.
    assert fa.flash_attn_func(q, k, v, dropout_p=0.5, seed=0).isfinite().all()


def test_unseeded_dropout_draws_a_new_mask_each_call():
    """seed=None must take a fresh seed from torch's generator on every call (two training steps
    dropping the same entries is a silent bug); the deterministic-seed test only checks that
    torch.manual_seed reproduces it."""
    q, k, v, _, _ = make_qkv(1, 1, 16, 16, 32, F16, "bhtd")
    a = fa.flash_attn_func(q, k, v, dropout_p=0.5)
    b = fa.flash_attn_func(q, k, v, dropout_p=0.5)
    assert not torch.equal(a, b)


def test_the_lse_is_not_differentiable():
    """lse is documented as not differentiable, on the eager path and the registered op alike."""
    q, k, v, _, _ = make_qkv(1, 1, 16, 16, 32, F16, "bhtd")
    seed = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    for out, lse in (fa.flash_attn_with_lse(q, k, v), torch.ops.phi1.flash_attn_fwd(q, k, v, seed, True, 0.0, 0.1)):
        assert out.requires_grad and not lse.requires_grad


def test_backward_reads_dout_by_its_strides():
    """autograd may hand the backward a transposed or expanded (x.sum()) gradient whose head dim
    is not contiguous; it must give the same gradients as the packed copy of that tensor."""
    B, H, T, D = 1, 1, 17, 32
    q, k, v, _, _ = make_qkv(B, H, T, T, D, F16, "bhtd")
    out = fa.flash_attn_func(q, k, v)
    g = torch.Generator(device=DEVICE).manual_seed(2)
    for dout in (torch.randn(B, H, D, T, generator=g, device=DEVICE).to(F16).transpose(-1, -2),
                 torch.ones(1, 1, 1, 1, dtype=F16, device=DEVICE).expand(B, H, T, D)):
        got = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        want = torch.autograd.grad(out, (q, k, v), dout.contiguous(), retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_gradients_come_back_in_the_documented_layout():
    """A plain contiguous (B, H, T, D) input gets its gradient in that layout (autograd hands the
    buffer over without a copy); any other input's gradient is (B, T, H, D)-contiguous."""
    for layout in ("bhtd", "bthd"):
        q, k, v, _, _ = make_qkv(1, 2, 17, 17, 32, F16, layout)
        out = fa.flash_attn_func(q, k, v)
        for grad in torch.autograd.grad(out, (q, k, v), torch.ones_like(out)):
            assert (grad if layout == "bhtd" else grad.transpose(1, 2)).is_contiguous(), (layout, grad.stride())


def test_q_k_v_and_dout_may_each_have_their_own_strides():
    """model.py passes q and k as rotary writes them and v as a view into the fused projection, so
    the inputs (and dout, and the output) differ in every stride; the reference tests give all of
    them one layout, where a kernel reading one tensor with another's strides goes unnoticed."""
    B, H, Tq, Tk, D = 2, 2, 20, 37, 32
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=DEVICE).to(F16)

    q = randn(B, H, Tq, D).requires_grad_()                       # contiguous (B, H, T, D)
    k_leaf = randn(B, Tk, H, D).requires_grad_()                  # (B, T, H, D)
    proj = randn(B, Tk, 4 * H * D).requires_grad_()               # v: a slice of a wider projection
    k = k_leaf.transpose(1, 2)
    v = proj[:, :, 2 * H * D:3 * H * D].unflatten(-1, (H, D)).transpose(1, 2)
    dout = randn(B, Tq, H, D).transpose(1, 2)
    out, lse = fa.flash_attn_with_lse(q, k, v, causal=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    out_ref, lse_ref = fa.attention_reference(qr, kr, vr, causal=True)
    refs = torch.autograd.grad(out_ref, (qr, kr, vr), dout.float())
    errs = {name: rel_err(x, r) for name, x, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (out_ref, *refs))}
    errs["lse"] = rel_err(lse, lse_ref) / TOL_LSE * TOL[F16]
    assert all(e <= TOL[F16] for e in errs.values()), errs


def test_no_gradient_through_the_output_is_no_gradient_for_q_k_v():
    """The backward skips autograd's zero fill (materialize_grads off), so it is handed None
    when nothing flows back through the output; it must answer None, as SDPA does, not crash."""
    class Blocked(torch.autograd.Function):  # passes no gradient back, as a custom op may
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return None

    q, k, v, _, _ = make_qkv(1, 1, 16, 16, 32, F16, "bhtd")
    seed = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    for attend in (lambda: fa.flash_attn_func(q, k, v),
                   lambda: torch.ops.phi1.flash_attn_fwd(q, k, v, seed, True, 0.0, 32 ** -0.5)[0]):
        q.grad = k.grad = v.grad = None
        (Blocked.apply(attend()).float().sum() + q.float().sum()).backward()
        assert torch.equal(q.grad, torch.ones_like(q)) and k.grad is None and v.grad is None


def test_backward_copies_a_dout_whose_sequence_stride_overflows_int32_offsets(monkeypatch):
    """The int32 tile-offset limit that unsupported_reason puts on q, k and v holds for dout
    too: the kernels get a packed copy. (A dout that overflows for real takes gigabytes, so
    this watches the launch arguments.)"""
    q, k, v, _, _ = make_qkv(1, 1, 2, 2, 32, F16, "bhtd")
    out = fa.flash_attn_func(q, k, v)
    dout = torch.empty(2**23 + 32, dtype=F16, device=DEVICE).as_strided((1, 1, 2, 32), (2**24, 2**24, 2**23, 1))
    dout.copy_(torch.randn(1, 1, 2, 32, generator=torch.Generator(DEVICE).manual_seed(3), device=DEVICE))
    want = torch.autograd.grad(out, (q, k, v), dout.contiguous(), retain_graph=True)
    strides, run = [], fa._run

    def spy(jit_fn, head_dim, grid, args, kwargs):
        strides.extend(a.stride(2) for a in args if isinstance(a, torch.Tensor) and a.dim() == 4)
        run(jit_fn, head_dim, grid, args, kwargs)

    monkeypatch.setattr(fa, "_run", spy)
    got = torch.autograd.grad(out, (q, k, v), dout)
    assert strides and max(strides) < 2**23
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_causal_must_be_a_bool_and_a_given_seed_is_always_checked():
    """causal went through bool(), so causal="no" ran causal; a bad seed was ignored when
    dropout_p = 0 left it unused; a bool tensor passed as the seed 1 where True is refused."""
    q, k, v, _, _ = make_qkv(1, 1, 8, 8, 32, F16, "bhtd")
    for kwargs in ({"causal": "no"}, {"causal": 0}, {"causal": torch.tensor(False)}, {"seed": -1},
                   {"seed": 1.7}, {"dropout_p": 0.1, "seed": torch.tensor(True)}):
        with pytest.raises(ValueError, match="causal must be True or False" if "causal" in kwargs else "seed"):
            fa.flash_attn_func(q, k, v, **kwargs)
    assert torch.equal(fa.flash_attn_func(q, k, v, causal=np.bool_(False), seed=torch.tensor(5)),
                       fa.flash_attn_func(q, k, v, causal=False))


def test_dropout_mask_checks_seed_and_p_as_flash_attn_func_does():
    """dropout_mask used to turn 1.7 and True into seed 1, wrap -1, overflow on 2**63 and
    drop everything for p = 1.5: flash_attn_func refuses all of these, so must the helper
    that claims to draw its mask."""
    for seed, p in ((-1, 0.5), (True, 0.5), (1.7, 0.5), (2**63, 0.5), (None, 0.5), (1, 1.5), (1, -0.1)):
        with pytest.raises(ValueError, match="dropout_mask: " + ("seed" if p == 0.5 else "dropout_p")):
            fa.dropout_mask(seed, 1, 1, 4, 4, p, device=DEVICE)
    for sizes in ((1, 1, -4, 4), (1, 1, 4.0, 4), (0, 1, 4, 4), (2048, 64, 8, 8)):  # torch's errors, a grid past CUDA's
        with pytest.raises(ValueError, match=r"dropout_mask: batch, heads, q_len and k_len must be positive integers"):
            fa.dropout_mask(1, *sizes, 0.5, device=DEVICE)


def test_the_script_agrees_with_triton_on_TRITON_INTERPRET():
    """Triton reads TRITON_INTERPRET=true (or on, yes) as on, and this module must agree; set to
    something off on a machine without CUDA, the script's CPU check must end in one clear line,
    not a traceback."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")

    def python(value, *args):
        return subprocess.run([sys.executable, *args], cwd=root, env=dict(env, TRITON_INTERPRET=value),
                              capture_output=True, text=True, timeout=120)

    result = python("true", "-c", "import flash_attn_triton as fa; print(fa.INTERPRET)")
    assert result.stdout.strip() == "True", result.stderr
    result = python("0", "flash_attn_triton.py")
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr, result
    assert result.stderr.endswith("error: no CUDA GPU: run with TRITON_INTERPRET=1 for the CPU check "
                                  "(TRITON_INTERPRET is '0')\n"), result.stderr
    # the mask helper too ("RuntimeError: 0 active drivers", from Triton)
    result = python("0", "-c", "import flash_attn_triton as fa; fa.dropout_mask(1, 1, 1, 4, 4, 0.5, device='cpu')")
    assert result.stderr.strip().endswith("ValueError: dropout_mask: the Triton kernel needs a CUDA GPU (or "
                                          "TRITON_INTERPRET=1), not cpu"), result.stderr
