"""kernels.linear_logprobs / linear_cross_entropy against the float64 formula, values and gradients.

Each implementation (the chunked CPU fallback; the Triton path, run here under TRITON_INTERPRET=1 on CPU
tensors) gets fresh random inputs in fp32 or bf16; the reference is `linear_logprobs_reference` on float64
copies of the same (already rounded) inputs. Gradients flow from a random mix of log-probs and entropies,
so every output's gradient formula is exercised, not just the sum.
"""

import functools
import os

import pytest
import torch

from kernels.linear_logprobs import addmm_fp32_, linear_cross_entropy_triton, linear_logprobs_triton, mm_fp32
from kernels.reference import (
    IGNORE_INDEX,
    linear_cross_entropy_chunked,
    linear_logprobs_chunked,
    linear_logprobs_reference,
)

# The Triton path runs on CUDA when there is a GPU, else under the interpreter on CPU tensors (CI exports
# TRITON_INTERPRET=1; it must be set before triton compiles anything, so it cannot be switched on here).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
needs_triton = pytest.mark.skipif(
    TRITON_DEVICE == "cpu" and not INTERPRET, reason="no GPU and TRITON_INTERPRET=1 not exported"
)
SMALL_CHUNKS = 16 * 2**10  # bytes: several row chunks and 256-column vocabulary chunks even at test sizes

# fp32: (value atol, grad relative error). bf16: the Triton path rounds the logits to bf16 before the softmax
# (as cuBLAS-based peers do), so log-probs may be off by 2^-8·max|z| and entropies by twice that; gradients
# are checked in norm, ‖error‖ / ‖reference‖, which bf16 rounding of the inputs' gradients keeps near 2^-8.
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (None, 2e-2)}


def on_device(fn):
    """Run `fn` on TRITON_DEVICE copies of the tensors, results back on CPU (autograd flows through .to)."""

    def wrapped(h, w, targets, **kwargs):
        out = fn(h.to(TRITON_DEVICE), w.to(TRITON_DEVICE), targets.to(TRITON_DEVICE), **kwargs)
        return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()

    return wrapped


LINEAR_LOGPROBS = {
    "fallback": functools.partial(linear_logprobs_chunked, chunk_rows=3),
    "triton": on_device(functools.partial(linear_logprobs_triton, chunk_bytes=SMALL_CHUNKS)),
}
LINEAR_CROSS_ENTROPY = {
    "fallback": functools.partial(linear_cross_entropy_chunked, chunk_rows=3),
    "triton": on_device(functools.partial(linear_cross_entropy_triton, chunk_bytes=SMALL_CHUNKS)),
}
MARKS = {"fallback": (), "triton": (needs_triton,)}
LINEAR_CROSS_ENTROPY_NAMES = [pytest.param(name, marks=MARKS[name]) for name in sorted(LINEAR_CROSS_ENTROPY)]


def coarser(fn):
    """The same implementation with chunks big enough that a 50k vocabulary takes a few steps, not 200."""
    return functools.partial(fn, chunk_bytes=2**20) if fn is LINEAR_LOGPROBS["triton"] else fn


def random_problem(n: int, vocab: int, hidden: int, dtype: torch.dtype, ignored: float, seed: int):
    """hidden [n, H], weight [V, H] with logits of std ~3 (a peaked but not one-hot softmax), targets [n]."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen) * 3 / hidden**0.5).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < ignored] = IGNORE_INDEX
    g_logp = torch.randn(n, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(n, generator=gen, dtype=torch.float64)
    return h, w, targets, g_logp, g_ent


def run(fn, h, w, targets, g_logp, g_ent, temperature, entropy, dtype):
    """Outputs and (dH, dW) of Σ g_logp·logp (+ Σ g_ent·entropy) through `fn` on leaves of `dtype`."""
    h = h.detach().to(dtype).requires_grad_(True)
    w = w.detach().to(dtype).requires_grad_(True)
    out = fn(h, w, targets, temperature=temperature, return_entropy=entropy)
    logp, ent = out if entropy else (out, None)
    loss = (logp.double() * g_logp).sum()
    if entropy:
        loss = loss + (ent.double() * g_ent).sum()
    loss.backward()
    return logp, ent, h.grad, w.grad


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str):
    err = (actual.double() - expected).norm() / expected.norm().clamp(min=1e-30)
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


def check_against_reference(fn, n, vocab, hidden, dtype, temperature=1.0, entropy=False, ignored=0.25,
                            seed=0):
    h, w, targets, g_logp, g_ent = random_problem(n, vocab, hidden, dtype, ignored, seed)
    logp, ent, dh, dw = run(fn, h, w, targets, g_logp, g_ent, temperature, entropy, dtype)
    rlogp, rent, rdh, rdw = run(linear_logprobs_reference, h, w, targets, g_logp, g_ent, temperature, entropy,
                                torch.float64)
    atol, rtol = TOLERANCES[dtype]
    if atol is None:
        atol = 2**-8 * (h.double() @ w.double().T / temperature).abs().max().item()
    assert logp.dtype == torch.float32 and logp.shape == (n,)
    torch.testing.assert_close(logp.double(), rlogp, atol=atol, rtol=0)
    if entropy:
        assert ent.dtype == torch.float32 and ent.shape == (n,)
        torch.testing.assert_close(ent.double(), rent, atol=2 * atol, rtol=0)
    assert dh.dtype == dtype and dw.dtype == dtype
    assert_rel_close(dh, rdh, rtol, "dH")
    assert_rel_close(dw, rdw, rtol, "dW")
    ignored_rows = targets == IGNORE_INDEX
    assert (logp[ignored_rows] == 0).all()
    assert (dh[ignored_rows] == 0).all(), "ignored rows must get exactly zero gradient"
    if entropy:
        assert (ent[ignored_rows] == 0).all()
    return targets


@pytest.fixture(params=[pytest.param(name, marks=MARKS[name]) for name in sorted(LINEAR_LOGPROBS)])
def impl(request):
    return LINEAR_LOGPROBS[request.param]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1000, 1037])
def test_logprobs_and_entropy_vs_float64(impl, dtype, vocab):
    check_against_reference(impl, n=13, vocab=vocab, hidden=48, dtype=dtype, entropy=True, seed=vocab)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_temperature(impl, temperature):
    check_against_reference(impl, n=9, vocab=1000, hidden=32, dtype=torch.float32, temperature=temperature,
                            entropy=True, seed=int(temperature * 10))


def test_logprobs_only_large_odd_vocab(impl):
    check_against_reference(coarser(impl), n=5, vocab=50257, hidden=32, dtype=torch.float32, ignored=0.2,
                            seed=1)


def test_entropy_large_odd_vocab_bf16(impl):
    check_against_reference(coarser(impl), n=4, vocab=50257, hidden=32, dtype=torch.bfloat16, entropy=True,
                            ignored=0.0, seed=2)


def test_single_row(impl):
    targets = check_against_reference(impl, n=1, vocab=1000, hidden=16, dtype=torch.float32, entropy=True,
                                      ignored=0.0, seed=3)
    assert (targets != IGNORE_INDEX).all()


def test_all_rows_ignored(impl):
    h, w, _, g_logp, g_ent = random_problem(6, 1000, 16, torch.float32, 0.0, seed=4)
    targets = torch.full((6,), IGNORE_INDEX)
    logp, ent, dh, dw = run(impl, h, w, targets, g_logp, g_ent, 1.0, True, torch.float32)
    assert (logp == 0).all() and (ent == 0).all()
    assert (dh == 0).all() and (dw == 0).all()


def test_deterministic(impl):
    h, w, targets, g_logp, g_ent = random_problem(11, 1000, 32, torch.bfloat16, 0.2, seed=5)
    first = run(impl, h, w, targets, g_logp, g_ent, 0.7, True, torch.bfloat16)
    second = run(impl, h, w, targets, g_logp, g_ent, 0.7, True, torch.bfloat16)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_no_entropy_output_unless_asked(impl):
    h, w, targets, *_ = random_problem(3, 1000, 16, torch.float32, 0.0, seed=6)
    out = impl(h, w, targets)
    assert isinstance(out, torch.Tensor) and out.shape == (3,)


# ------------------------------------------------------------------------------------- linear_cross_entropy


@pytest.mark.parametrize("name", LINEAR_CROSS_ENTROPY_NAMES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_vs_float64(name, reduction, dtype):
    fn = LINEAR_CROSS_ENTROPY[name]
    h, w, targets, *_ = random_problem(13, 1037, 48, dtype, 0.3, seed=7)
    scale = torch.tensor(0.37, dtype=torch.float64)  # a non-unit upstream gradient

    def grads(f, dt):
        hh, ww = h.detach().to(dt).requires_grad_(True), w.detach().to(dt).requires_grad_(True)
        loss = f(hh, ww, targets, dt)
        (loss.double() * scale).backward()
        return loss, hh.grad, ww.grad

    def reference(hh, ww, t, dt):
        logp = linear_logprobs_reference(hh, ww, t, temperature=0.7)
        total = -logp.sum()
        return total if reduction == "sum" else total / (t != IGNORE_INDEX).sum()

    loss, dh, dw = grads(lambda hh, ww, t, dt: fn(hh, ww, t, temperature=0.7, reduction=reduction), dtype)
    rloss, rdh, rdw = grads(reference, torch.float64)
    atol, rtol = TOLERANCES[dtype]
    if atol is None:  # the mean of per-row errors each within 2^-8·max|z|
        atol = 2**-8 * (h.double() @ w.double().T / 0.7).abs().max().item()
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), rloss, atol=atol * (13 if reduction == "sum" else 1), rtol=rtol)
    assert_rel_close(dh, rdh, rtol, "dH")
    assert_rel_close(dw, rdw, rtol, "dW")
    assert (dh[targets == IGNORE_INDEX] == 0).all()


@pytest.mark.parametrize("name", LINEAR_CROSS_ENTROPY_NAMES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,ignored", [(13, 0.3), (1, 0.0), (50, 0.1), (5, 1.0)])
def test_weighted_linear_cross_entropy_vs_float64(name, reduction, dtype, n, ignored):
    """Σ w_i·(−logp_i) with weights of both signs (REDI's chosen and rejected rows), and the detached
    per-row log-probs and entropies it returns beside the loss; one row, many chunks (50 rows in chunks of
    3: the last one short), and every row ignored."""
    fn = LINEAR_CROSS_ENTROPY[name]
    h, w, targets, row_weights, _ = random_problem(n, 1037, 48, dtype, ignored, seed=17 + n)
    row_weights = (row_weights.abs() * (1 - 2 * (torch.arange(n) % 2))).float()  # +, −, +, ...

    def grads(f, dt):
        hh, ww = h.detach().to(dt).requires_grad_(True), w.detach().to(dt).requires_grad_(True)
        loss, logp, ent = f(hh, ww, targets)
        (loss.double() * 0.37).backward()
        return loss, logp, ent, hh.grad, ww.grad

    def reference(hh, ww, t):
        logp, ent = linear_logprobs_reference(hh, ww, t, temperature=0.7, return_entropy=True)
        total = -(logp * row_weights.double()).sum()
        return (total if reduction == "sum" else total / (t != IGNORE_INDEX).sum().clamp(min=1)), logp, ent

    loss, logp, ent, dh, dw = grads(lambda hh, ww, t: fn(
        hh, ww, t, temperature=0.7, reduction=reduction, row_weights=row_weights, return_logprobs=True,
        return_entropy=True), dtype)
    rloss, rlogp, rent, rdh, rdw = grads(reference, torch.float64)
    atol, rtol = TOLERANCES[dtype]
    if atol is None:
        atol = 2**-8 * (h.double() @ w.double().T / 0.7).abs().max().item()
    assert loss.dtype == logp.dtype == ent.dtype == torch.float32 and loss.shape == ()
    assert not logp.requires_grad and not ent.requires_grad
    torch.testing.assert_close(loss.double(), rloss, atol=atol * (n * 3 if reduction == "sum" else 3),
                               rtol=rtol)
    torch.testing.assert_close(logp.double(), rlogp.detach(), atol=atol, rtol=0)
    torch.testing.assert_close(ent.double(), rent.detach(), atol=2 * atol, rtol=0)
    if ignored == 1.0:  # no loss token: zero loss, zero gradients (the reference's are zero too)
        assert loss.item() == 0 and (dh == 0).all() and (dw == 0).all()
    else:
        assert_rel_close(dh, rdh, rtol, "dH")
        assert_rel_close(dw, rdw, rtol, "dW")
    assert (dh[targets == IGNORE_INDEX] == 0).all()
    assert (logp[targets == IGNORE_INDEX] == 0).all() and (ent[targets == IGNORE_INDEX] == 0).all()
    only_loss = fn(h, w, targets, temperature=0.7, reduction=reduction, row_weights=row_weights)
    assert isinstance(only_loss, torch.Tensor) and only_loss.shape == ()
    with pytest.raises(ValueError, match="row_weights"):
        fn(h, w, targets, row_weights=row_weights[:-1])


@pytest.mark.parametrize("name", LINEAR_CROSS_ENTROPY_NAMES)
def test_linear_cross_entropy_all_ignored_mean_is_zero(name):
    h, w, _, *_ = random_problem(4, 1000, 16, torch.float32, 0.0, seed=8)
    h.requires_grad_(True), w.requires_grad_(True)
    loss = LINEAR_CROSS_ENTROPY[name](h, w, torch.full((4,), IGNORE_INDEX), reduction="mean")
    loss.backward()
    assert loss.item() == 0 and (h.grad == 0).all() and (w.grad == 0).all()


@pytest.mark.parametrize("name", LINEAR_CROSS_ENTROPY_NAMES)
def test_linear_cross_entropy_frozen_head_and_no_grad(name):
    """Only dH when the weight is frozen; under no_grad the same value and nothing to differentiate."""
    fn = LINEAR_CROSS_ENTROPY[name]
    h, w, targets, *_ = random_problem(7, 1000, 16, torch.float32, 0.3, seed=10)
    with torch.no_grad():
        value = fn(h, w, targets, reduction="sum")
    assert not value.requires_grad
    hh = h.clone().requires_grad_(True)
    loss = fn(hh, w, targets, reduction="sum")
    loss.backward()
    hr = h.double().requires_grad_(True)
    (-linear_logprobs_reference(hr, w.double(), targets).sum()).backward()
    torch.testing.assert_close(loss.double(), value.double(), atol=0, rtol=0)
    assert w.grad is None
    assert_rel_close(hh.grad, hr.grad, 2e-5, "dH")


def test_linear_cross_entropy_rejects_unknown_reduction():
    h, w, targets, *_ = random_problem(2, 100, 8, torch.float32, 0.0, seed=9)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy_chunked(h, w, targets, reduction="none")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fp32-output GEMMs are a CUDA feature")
def test_fp32_accumulating_gemms_on_cuda():
    """addmm_fp32_ keeps a running fp32 sum that bf16 would round away (1 + 200 × 2^-10 in bf16 stays 1)."""
    acc = torch.ones(64, 64, device="cuda")
    a = torch.full((64, 32), 2**-5, device="cuda", dtype=torch.bfloat16)
    b = torch.full((32, 64), 2**-10, device="cuda", dtype=torch.bfloat16)  # a @ b = 2^-10 per element
    for _ in range(200):
        addmm_fp32_(acc, a, b)
    assert torch.equal(acc, torch.full_like(acc, 1 + 200 * 2**-10))
    assert mm_fp32(a, b).dtype == torch.float32
