"""kernels.cross_entropy over given logits against the float64 formula, values and gradients.

Implementations: the CPU fallback (F.cross_entropy in fp32) and the Triton kernels run under
TRITON_INTERPRET=1 on CPU tensors, with and without the gradient written in place of the logits.
"""

import functools
import os

import pytest
import torch

from kernels.cross_entropy import cross_entropy_triton
from kernels.reference import IGNORE_INDEX, cross_entropy_fallback, cross_entropy_reference

# The Triton path runs on CUDA when there is a GPU, else under the interpreter on CPU tensors (CI exports
# TRITON_INTERPRET=1 before triton compiles anything).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
needs_triton = pytest.mark.skipif(
    TRITON_DEVICE == "cpu" and not INTERPRET, reason="no GPU and TRITON_INTERPRET=1 not exported"
)
SMALL_BLOCK = 256  # columns per loop step, so test rows take several steps and a ragged last one

TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 1e-2)}  # (loss atol, grad rel)



def on_device(fn):
    """Run `fn` on TRITON_DEVICE logits made from the CPU leaf by a multiply (so they are a non-leaf
    whose producer's backward does not need them, the case inplace_backward is for)."""

    def wrapped(logits, targets):
        return fn(logits.to(TRITON_DEVICE) * 1.0, targets.to(TRITON_DEVICE)).cpu()

    return wrapped


CROSS_ENTROPY = {
    "fallback": cross_entropy_fallback,
    "triton": on_device(functools.partial(cross_entropy_triton, block_v=SMALL_BLOCK)),
    "triton_inplace": on_device(functools.partial(cross_entropy_triton, inplace_backward=True,
                                                  block_v=SMALL_BLOCK)),
}
MARKS = {"fallback": (), "triton": (needs_triton,), "triton_inplace": (needs_triton,)}


def random_logits(n: int, vocab: int, dtype: torch.dtype, ignored: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < ignored] = IGNORE_INDEX
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    return logits, targets, g


def loss_and_grad(fn, logits, targets, g):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, targets)
    (loss.double() * g).sum().backward()
    return loss, x.grad


@pytest.fixture(params=[pytest.param(name, marks=MARKS[name]) for name in sorted(CROSS_ENTROPY)])
def impl(request):
    return CROSS_ENTROPY[request.param]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, vocab", [(7, 1000), (1, 1037), (3, 50257)])
def test_cross_entropy_vs_float64(impl, dtype, n, vocab):
    logits, targets, g = random_logits(n, vocab, dtype, ignored=0.3 if n > 1 else 0.0, seed=vocab + n)
    loss, grad = loss_and_grad(impl, logits, targets, g)
    rloss, rgrad = loss_and_grad(cross_entropy_reference, logits.double(), targets, g)
    atol, rtol = TOLERANCES[dtype]
    assert loss.dtype == torch.float32 and loss.shape == (n,)
    torch.testing.assert_close(loss.double(), rloss, atol=atol, rtol=atol)
    assert grad.dtype == dtype
    err = (grad.double() - rgrad).norm() / rgrad.norm()
    assert err <= rtol, f"grad relative error {err:.2e}"
    ignored = targets == IGNORE_INDEX
    assert (loss[ignored] == 0).all() and (grad[ignored] == 0).all()


def test_cross_entropy_all_ignored(impl):
    logits, _, g = random_logits(5, 1000, torch.float32, 0.0, seed=1)
    loss, grad = loss_and_grad(impl, logits, torch.full((5,), IGNORE_INDEX), g)
    assert (loss == 0).all() and (grad == 0).all()


def test_cross_entropy_deterministic(impl):
    logits, targets, g = random_logits(6, 1037, torch.bfloat16, 0.2, seed=2)
    first = loss_and_grad(impl, logits, targets, g)
    second = loss_and_grad(impl, logits, targets, g)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@needs_triton
@pytest.mark.parametrize("inplace", [False, True])
def test_inplace_backward_reuses_the_logits_storage(inplace):
    logits, targets, g = random_logits(4, 1037, torch.bfloat16, 0.25, seed=3)
    leaf = logits.to(TRITON_DEVICE).requires_grad_(True)
    x = leaf * 1.0
    seen = {}
    x.register_hook(lambda grad: seen.update(ptr=grad.data_ptr(), grad=grad.clone()))
    loss = cross_entropy_triton(x, targets.to(TRITON_DEVICE), inplace_backward=inplace)
    (loss * g.float().to(TRITON_DEVICE)).sum().backward()
    assert (seen["ptr"] == x.data_ptr()) == inplace
    if inplace:  # the logits now hold their gradient
        assert torch.equal(x.detach(), seen["grad"])
    else:
        assert torch.equal(x.detach(), leaf.detach())
    _, rgrad = loss_and_grad(cross_entropy_reference, logits.double(), targets, g)
    assert (seen["grad"].cpu().double() - rgrad).norm() / rgrad.norm() <= 1e-2


@needs_triton
def test_inplace_backward_refuses_when_another_node_saved_the_logits():
    logits, targets, _ = random_logits(3, 1000, torch.float32, 0.0, seed=4)
    x = logits.to(TRITON_DEVICE).requires_grad_(True) * 1.0
    earlier = x.sin().sum()  # sin saved x; its backward runs after the cross-entropy's (created later)
    total = earlier + cross_entropy_triton(x, targets.to(TRITON_DEVICE), inplace_backward=True).sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        total.backward()
