"""Top-p's prefilter (model/generate.py: `_sample_truncated`) against the full sort of the vocabulary.

The reference is `bench.cpu_top_p.full_sort_sample`: the sampler's definition written with a stable sort
of the whole vocabulary. On fixed seeds the sampler must give the same token for every row, across
temperatures, top-p values, top-k on and off (and above the prefilter's size), peaked rows (the nucleus
among the candidates), flat rows (a nucleus of thousands of tokens: the exact fallback), ties (bf16-rounded
logits) and batches mixing both; eagerly, and traced by torch.compile (fullgraph: no host branch). In the
common case the vocabulary is not sorted at all (an op-by-op count of aten.sort's input sizes).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.cpu_top_p import full_sort_sample
from model.generate import sample_tokens

VOCAB, CANDIDATES = 3000, 256  # small enough for the tests, a nucleus beyond the prefilter when flat


def rows(spreads: list[float], seed: int, bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(spreads), VOCAB, generator=gen) * torch.tensor(spreads)[:, None]
    if bf16:  # many exact ties, also at the prefilter's edge
        logits = logits.bfloat16().float()
    return logits, torch.rand(len(spreads), generator=gen)


def ours(logits, uniform, temperature, top_k, top_p):
    return sample_tokens(logits, uniform, temperature, top_k, top_p, greedy=False, truncate=True,
                         candidates=CANDIDATES)[0]


def nucleus_sizes(logits, temperature, top_p) -> torch.Tensor:
    probs = (logits / temperature).softmax(-1).sort(-1, descending=True).values
    return ((probs.cumsum(-1) - probs) < top_p).sum(-1)


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.3])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("top_k", [VOCAB, 40, 1000])
@pytest.mark.parametrize("bf16", [False, True])
def test_prefilter_is_token_identical_to_the_full_sort(temperature, top_p, top_k, bf16):
    spreads = [6.0, 4.0, 0.3, 3.0, 0.05, 8.0, 2.0, 0.5]  # peaked and flat rows in one batch
    for seed in range(3):
        logits, uniform = rows(spreads, seed=seed * 100 + int(top_p * 1000), bf16=bf16)
        expected = full_sort_sample(logits, uniform, temperature, top_k, top_p)
        assert torch.equal(ours(logits, uniform, temperature, top_k, top_p), expected)


def test_the_cases_above_include_rows_that_need_the_fallback_and_rows_that_do_not():
    logits, _ = rows([6.0, 0.3], seed=0)
    small, large = nucleus_sizes(logits, 1.0, 0.95).tolist()
    assert small < CANDIDATES < large


def test_every_token_of_a_flat_row_can_come_from_the_fallback():
    """A nearly uniform row (nucleus ≈ 0.95·V): the draw spreads over the whole nucleus, like the sort."""
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(1)).mul(0.01).expand(4000, -1)
    uniform = torch.rand(4000, generator=torch.Generator().manual_seed(2))
    tokens = ours(logits, uniform, 1.0, VOCAB, 0.95)
    assert torch.equal(tokens, full_sort_sample(logits, uniform, 1.0, VOCAB, 0.95))
    assert tokens.unique().numel() > 5 * CANDIDATES


def test_traced_sampler_holds_no_host_branch_and_gives_the_same_tokens():
    torch._dynamo.reset()
    logits, uniform = rows([6.0, 0.3, 2.0], seed=5)
    compiled = torch.compile(ours, backend="eager", fullgraph=True)
    for top_k in (VOCAB, 40):
        top_k_t, top_p_t = torch.tensor(top_k), torch.tensor(0.95)
        assert torch.equal(compiled(logits, uniform, 0.8, top_k_t, top_p_t),
                           full_sort_sample(logits, uniform, 0.8, top_k, 0.95))


class SortSizes(TorchDispatchMode):
    """The last-dimension size of every aten.sort's input."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.sort:
            self.sizes.append(args[0].shape[-1])
        return func(*args, **(kwargs or {}))


def test_the_vocabulary_is_sorted_only_for_a_short_row():
    peaked, uniform = rows([6.0, 5.0], seed=3)
    with SortSizes() as sorts:
        ours(peaked, uniform, 0.6, VOCAB, 0.95)
    assert sorts.sizes and max(sorts.sizes) == CANDIDATES
    mixed, uniform = rows([6.0, 0.3], seed=3)
    with SortSizes() as sorts:
        ours(mixed, uniform, 1.0, VOCAB, 0.95)
    assert max(sorts.sizes) == VOCAB
