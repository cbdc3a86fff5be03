"""losses/: each objective against an independent float64 transcription of its paper's formula.

The implementation runs in fp32 (as in training) on random inputs; the reference is written here from the
formula, in float64, on its own layout (padded [B, L] for GRPO, per-sequence loops for the sums). Values
and gradients (autograd on both sides) must agree.
"""

import math
import statistics

import pytest
import torch

from losses import (
    dpo_loss,
    group_advantages,
    grpo_loss,
    grpo_loss_unit,
    k3_kl,
    overlong_penalty,
    redi_loss,
    sequence_lengths,
    sequence_logps,
    sft_loss,
    simpo_loss,
)

RTOL, ATOL = 1e-5, 1e-6  # fp32 implementation vs float64 reference


def leaf(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return x.detach().to(dtype).requires_grad_(True)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL, atol: float = ATOL):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def random_pairs(gen: torch.Generator, batch: int):
    """Sequence log-prob sums (negative, tens to hundreds) and completion lengths of chosen and rejected."""
    chosen_lens = torch.randint(1, 300, (batch,), generator=gen)
    rejected_lens = torch.randint(1, 300, (batch,), generator=gen)
    chosen = -chosen_lens * torch.rand(batch, generator=gen, dtype=torch.float64) * 1.5
    rejected = -rejected_lens * torch.rand(batch, generator=gen, dtype=torch.float64) * 1.5
    return chosen, chosen_lens, rejected, rejected_lens


# ---------------------------------------------------------------------------------------------- SFT


def test_sft_matches_float64_formula():
    gen = torch.Generator().manual_seed(0)
    logps = -torch.rand(257, generator=gen, dtype=torch.float64) * 8
    mask = torch.rand(257, generator=gen) < 0.6
    x32, x64 = leaf(logps), leaf(logps, torch.float64)
    loss = sft_loss(x32, mask)
    m = mask.double()
    expected = -(x64 * m).sum() / m.sum()
    assert loss.dtype == torch.float32
    assert_close(loss, expected)
    loss.backward()
    expected.backward()
    assert_close(x32.grad, x64.grad)
    assert torch.all(x32.grad[~mask] == 0)


def test_sft_without_loss_tokens_is_zero_with_a_graph():
    logps = leaf(-torch.rand(9))
    loss = sft_loss(logps, torch.zeros(9, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logps.grad, torch.zeros(9))


def test_sft_upcasts_bf16():
    logps = (-torch.rand(64, generator=torch.Generator().manual_seed(1)) * 4).bfloat16()
    mask = torch.ones(64)
    loss = sft_loss(logps, mask)
    assert loss.dtype == torch.float32
    assert_close(loss, -logps.double().mean())


# ---------------------------------------------------------------------------------------------- DPO


def dpo_reference(c, r, rc, rr, beta):
    """-log σ(β[(log π_w - log π_ref,w) - (log π_l - log π_ref,l)]), mean over pairs (DPO Eq. 7)."""
    z = beta * ((c - rc) - (r - rr))
    return (-torch.log(1.0 / (1.0 + torch.exp(-z)))).mean()


@pytest.mark.parametrize("beta", [0.001, 0.1, 0.5])
def test_dpo_matches_float64_formula(beta):
    gen = torch.Generator().manual_seed(2)
    c, _, r, _ = random_pairs(gen, 33)
    rc = c + torch.randn(33, generator=gen, dtype=torch.float64) * 20
    rr = r + torch.randn(33, generator=gen, dtype=torch.float64) * 20
    c32, r32, c64, r64 = leaf(c), leaf(r), leaf(c, torch.float64), leaf(r, torch.float64)
    loss = dpo_loss(c32, r32, rc.float(), rr.float(), beta=beta)
    expected = dpo_reference(c64, r64, rc, rr, beta)
    assert_close(loss, expected)
    loss.backward()
    expected.backward()
    assert_close(c32.grad, c64.grad)
    assert_close(r32.grad, r64.grad)


def test_dpo_is_log2_when_policy_equals_reference():
    gen = torch.Generator().manual_seed(3)
    c, _, r, _ = random_pairs(gen, 8)
    for beta in (1e-3, 0.1, 10.0):
        c32, r32 = leaf(c), leaf(r)
        ref_c, ref_r = leaf(c), leaf(r)  # the reference must not receive a gradient even if it asks for one
        loss = dpo_loss(c32, r32, ref_c, ref_r, beta=beta)
        assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6)
        loss.backward()
        # d/dc -log σ(β·0) = -β/2 per pair, averaged over the B pairs
        assert_close(c32.grad, torch.full((8,), -beta / 2 / 8))
        assert_close(r32.grad, torch.full((8,), beta / 2 / 8))
        assert ref_c.grad is None and ref_r.grad is None


def test_dpo_beta_limits():
    gen = torch.Generator().manual_seed(4)
    c, _, r, _ = random_pairs(gen, 16)
    ref_c, ref_r = c - 5.0, r + 5.0  # the policy prefers the chosen by a margin of 10 over the reference
    assert dpo_loss(c, r, ref_c, ref_r, beta=1e-7).item() == pytest.approx(math.log(2.0), abs=1e-6)
    assert dpo_loss(c, r, ref_c, ref_r, beta=10.0).item() < 1e-20
    # wrong way round: -log σ(-β·10) ≈ 10β for large β
    assert dpo_loss(r, c, ref_r, ref_c, beta=10.0).item() == pytest.approx(100.0, rel=1e-6)


# -------------------------------------------------------------------------------------------- SimPO


def simpo_reference(c, cl, r, rl, beta, gamma):
    """-log σ(β/|y_w| log π(y_w|x) - β/|y_l| log π(y_l|x) - γ), mean over pairs (SimPO Eq. 6)."""
    z = beta / cl.double() * c - beta / rl.double() * r - gamma
    return torch.log1p(torch.exp(-z)).mean()


@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (2.5, 0.3), (10.0, 4.0)])
def test_simpo_matches_float64_formula(beta, gamma):
    gen = torch.Generator().manual_seed(5)
    c, cl, r, rl = random_pairs(gen, 29)
    c32, r32, c64, r64 = leaf(c), leaf(r), leaf(c, torch.float64), leaf(r, torch.float64)
    loss = simpo_loss(c32, cl, r32, rl, beta=beta, gamma=gamma)
    expected = simpo_reference(c64, cl, r64, rl, beta, gamma)
    assert_close(loss, expected)
    loss.backward()
    expected.backward()
    assert_close(c32.grad, c64.grad)
    assert_close(r32.grad, r64.grad)


def test_simpo_gamma_is_the_full_margin():
    # equal average log-probs: the loss is softplus(γ) whatever β — γ is not scaled by β
    c, cl = torch.tensor([-30.0, -7.5]), torch.tensor([60, 15])
    r, rl = torch.tensor([-10.0, -50.0]), torch.tensor([20, 100])
    for beta in (2.0, 4.0):
        for gamma in (0.0, 1.0, 2.5):
            loss = simpo_loss(c, cl, r, rl, beta=beta, gamma=gamma)
            assert loss.item() == pytest.approx(math.log1p(math.exp(gamma)), rel=1e-6)
    gen = torch.Generator().manual_seed(6)
    c, cl, r, rl = random_pairs(gen, 12)
    losses = [simpo_loss(c, cl, r, rl, gamma=g).item() for g in (0.0, 0.5, 1.0, 2.0)]
    assert losses == sorted(losses) and losses[0] < losses[-1]  # a larger margin is harder to meet


# --------------------------------------------------------------------------------------------- REDI


def redi_reference(c, cl, r, rl, alpha):
    """-log π(y_w|x)/|y_w| + α·log π(y_l|x)/|y_l|, mean over pairs (REDI)."""
    return (-c / cl.double() + alpha * r / rl.double()).mean()


@pytest.mark.parametrize("alpha", [0.8, 1.0, 0.3])
def test_redi_matches_float64_formula(alpha):
    gen = torch.Generator().manual_seed(7)
    c, cl, r, rl = random_pairs(gen, 31)
    c32, r32, c64, r64 = leaf(c), leaf(r), leaf(c, torch.float64), leaf(r, torch.float64)
    loss = redi_loss(c32, cl, r32, rl, alpha=alpha)
    expected = redi_reference(c64, cl, r64, rl, alpha)
    assert_close(loss, expected)
    loss.backward()
    expected.backward()
    assert_close(c32.grad, c64.grad)
    assert_close(r32.grad, r64.grad)


def test_redi_gradient_raises_chosen_and_lowers_rejected():
    gen = torch.Generator().manual_seed(8)
    c, cl, r, rl = random_pairs(gen, 16)
    c32, r32 = leaf(c), leaf(r)
    redi_loss(c32, cl, r32, rl, alpha=0.8).backward()
    assert torch.all(c32.grad < 0) and torch.all(r32.grad > 0)  # descent: chosen up, rejected down
    assert_close(c32.grad, -1.0 / (16 * cl.double()))
    assert_close(r32.grad, 0.8 / (16 * rl.double()))

    # one SGD step on a toy policy (free logits per position) moves every sequence the right way
    vocab, lens = 11, [5, 9, 3, 7]  # chosen, rejected, chosen, rejected
    seq_id = torch.repeat_interleave(torch.arange(4), torch.tensor(lens))
    logits = torch.randn(sum(lens), vocab, generator=gen, requires_grad=True)
    targets = torch.randint(0, vocab, (sum(lens),), generator=gen)

    def seq_logps():
        token_logps = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
        return sequence_logps(token_logps, seq_id, 4)

    before = seq_logps()
    lengths = sequence_lengths(torch.ones(sum(lens)), seq_id, 4)
    redi_loss(before[0::2], lengths[0::2], before[1::2], lengths[1::2]).backward()
    with torch.no_grad():
        logits -= 1.0 * logits.grad
        after = seq_logps()
    assert torch.all(after[0::2] > before[0::2]) and torch.all(after[1::2] < before[1::2])


def test_redi_alpha_zero_is_per_sequence_normalised_sft_on_the_chosen():
    gen = torch.Generator().manual_seed(9)
    lens = torch.tensor([4, 17, 9, 30])
    seq_id = torch.repeat_interleave(torch.arange(4), lens)
    token_logps = leaf(-torch.rand(int(lens.sum()), generator=gen) * 5)
    mask = torch.ones(int(lens.sum()), dtype=torch.bool)
    rejected = leaf(-torch.rand(4, generator=gen) * 100)

    redi = redi_loss(sequence_logps(token_logps, seq_id, 4), sequence_lengths(mask, seq_id, 4),
                     rejected, torch.full((4,), 50), alpha=0.0)
    (redi_grad,) = torch.autograd.grad(redi, token_logps)
    per_sequence_sft = torch.stack([sft_loss(token_logps, mask & (seq_id == s)) for s in range(4)]).mean()
    (sft_grad,) = torch.autograd.grad(per_sequence_sft, token_logps)
    assert_close(redi, per_sequence_sft)
    assert_close(redi_grad, sft_grad)
    # ... and the token-level SFT of the whole batch is a different loss when lengths differ
    assert abs(redi.item() - sft_loss(token_logps, mask).item()) > 1e-3

    # equal lengths: both normalisations coincide
    seq_id = torch.arange(4).repeat_interleave(8)
    token_logps = -torch.rand(32, generator=gen) * 5
    mask = torch.ones(32)
    redi = redi_loss(sequence_logps(token_logps, seq_id, 4), sequence_lengths(mask, seq_id, 4),
                     rejected.detach(), torch.full((4,), 50), alpha=0.0)
    assert_close(redi, sft_loss(token_logps, mask))


def test_pair_losses_name_the_bad_tensor():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="rejected_lens"):
        redi_loss(x, x, x, torch.zeros(4))
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(x, x, x, torch.zeros(2))
    with pytest.raises(ValueError, match="chosen_lens"):
        simpo_loss(x, torch.zeros(3, 1), x, x)


# --------------------------------------------------------------------------------------------- GRPO


def test_group_advantages_match_float64_formula():
    gen = torch.Generator().manual_seed(10)
    group = 8
    rewards = torch.cat([torch.randint(0, 2, (4 * group,), generator=gen).double() * 2 - 1,
                         torch.randn(3 * group, generator=gen, dtype=torch.float64)])
    expected_std, expected_no_std = [], []
    for g in range(rewards.numel() // group):
        values = rewards[g * group:(g + 1) * group].tolist()
        mean, std = statistics.fmean(values), statistics.stdev(values) if len(set(values)) > 1 else 0.0
        expected_std += [(v - mean) / (std + 1e-6) for v in values]
        expected_no_std += [v - mean for v in values]
    assert_close(group_advantages(rewards.float(), group), torch.tensor(expected_std), rtol=1e-5, atol=1e-5)
    assert_close(group_advantages(rewards.float(), group, scale_by_std=False), torch.tensor(expected_no_std))


def test_group_advantages_of_equal_rewards_are_zero():
    rewards = torch.tensor([0.1] * 7 + [1.0] * 7 + [-1.0] * 7 + [0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 1.3])
    for scale_by_std in (True, False):
        advantages = group_advantages(rewards, 7, scale_by_std=scale_by_std)
        assert torch.isfinite(advantages).all()
        assert torch.equal(advantages[:21], torch.zeros(21))
        assert advantages[-1] > 0 and torch.all(advantages[21:27] < 0)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(rewards, 5)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(rewards, 1)


def test_overlong_penalty_piecewise():
    lengths = torch.tensor([0, 11, 12, 13, 14, 15, 16, 17, 100])
    expected = torch.tensor([0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0])
    assert torch.equal(overlong_penalty(lengths, max_len=16, cache_len=4), expected)
    # DAPO's setting: expected maximum 16384 tokens, 4096 of soft band
    penalty = overlong_penalty(torch.tensor([12288, 14336, 16384, 20480]), max_len=16384, cache_len=4096)
    assert torch.equal(penalty, torch.tensor([0.0, -0.5, -1.0, -1.0]))
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(lengths, max_len=16, cache_len=0)


def test_k3_kl_is_nonnegative_and_zero_at_equality():
    gen = torch.Generator().manual_seed(11)
    logps = -torch.rand(1000, generator=gen, dtype=torch.float64) * 10
    ref = logps + torch.randn(1000, generator=gen, dtype=torch.float64) * 3
    kl = k3_kl(logps.float(), ref.float())
    assert torch.all(kl >= 0)
    assert_close(kl, torch.exp(ref - logps) - (ref - logps) - 1, rtol=1e-5, atol=1e-5)
    assert torch.equal(k3_kl(logps.float(), logps.float()), torch.zeros(1000))


def random_grpo_batch(gen: torch.Generator, num_seqs: int = 9, max_completion: int = 23):
    """Padded float64 completions [S, L] plus the same tokens packed [T] behind random-length prompts."""
    completion_lens = torch.randint(1, max_completion + 1, (num_seqs,), generator=gen)
    prompt_lens = torch.randint(0, 6, (num_seqs,), generator=gen)
    width = int(completion_lens.max())
    valid = torch.arange(width)[None, :] < completion_lens[:, None]
    logps = -torch.rand(num_seqs, width, generator=gen, dtype=torch.float64) * 4
    old = logps + torch.randn(num_seqs, width, generator=gen, dtype=torch.float64) * 0.3  # spans both clips
    ref = logps + torch.randn(num_seqs, width, generator=gen, dtype=torch.float64) * 0.5
    advantages = torch.randn(num_seqs, generator=gen, dtype=torch.float64)
    advantages[0] = 0.0

    def pack(padded, prompt_value):
        pieces = []
        for s in range(num_seqs):
            pieces += [torch.full((int(prompt_lens[s]),), prompt_value, dtype=torch.float64),
                       padded[s, :completion_lens[s]]]
        return torch.cat(pieces)

    lens = prompt_lens + completion_lens
    seq_id = torch.repeat_interleave(torch.arange(num_seqs), lens)
    loss_mask = pack(valid.double(), 0.0).bool()
    # prompt tokens carry wild values: exp(200) would overflow if they were not masked out
    packed = {"logps": pack(logps, 0.0), "old_logps": pack(old, -200.0), "ref_logps": pack(ref, 200.0)}
    padded = {"logps": logps, "old_logps": old, "ref_logps": ref, "valid": valid.double()}
    return padded, packed, advantages, seq_id, loss_mask


def grpo_reference(padded, logps, advantages, *, beta, eps_low, eps_high, aggregation, max_len):
    """The GRPO family on a padded [S, L] float64 layout, straight from the formulas."""
    valid, a = padded["valid"], advantages[:, None]
    ratio = torch.exp(logps - padded["old_logps"])
    surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)
    d = padded["ref_logps"] - logps
    kl = torch.exp(d) - d - 1
    per_token = (-surrogate + beta * kl) * valid
    if aggregation == "grpo":
        return (per_token.sum(1) / valid.sum(1)).mean()
    if aggregation == "dapo":
        return per_token.sum() / valid.sum()
    return per_token.sum() / (logps.shape[0] * max_len)


@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta,eps_low,eps_high", [(0.0, 0.2, 0.2), (0.04, 0.2, 0.28)])
def test_grpo_loss_matches_padded_float64_formula(aggregation, beta, eps_low, eps_high):
    gen = torch.Generator().manual_seed(12)
    padded, packed, advantages, seq_id, loss_mask = random_grpo_batch(gen)
    logps32, logps64 = leaf(packed["logps"]), leaf(padded["logps"], torch.float64)
    old, ref = leaf(packed["old_logps"]), leaf(packed["ref_logps"])  # constants: must get no gradient
    loss = grpo_loss(logps32, old, advantages.float(), seq_id, loss_mask, ref_logps=ref, beta=beta,
                     eps_low=eps_low, eps_high=eps_high, aggregation=aggregation, max_len=37)
    expected = grpo_reference(padded, logps64, advantages, beta=beta, eps_low=eps_low, eps_high=eps_high,
                              aggregation=aggregation, max_len=37)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert_close(loss, expected)
    loss.backward()
    expected.backward()
    assert_close(logps32.grad[loss_mask], logps64.grad[padded["valid"].bool()])
    assert torch.all(logps32.grad[~loss_mask] == 0)
    assert old.grad is None and ref.grad is None


def test_grpo_loss_unit():
    assert [grpo_loss_unit(a) for a in ("grpo", "dapo", "dr_grpo")] == ["sequences", "tokens", "sequences"]
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss_unit("ppo")
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="max_len"):
        grpo_loss(x, x, x, torch.arange(4), x, aggregation="dr_grpo")
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(x, x, x, torch.arange(4), x, beta=0.1)
    with pytest.raises(ValueError, match="loss_mask"):
        grpo_loss(x, x, x, torch.arange(4), torch.zeros(5))


def test_grpo_gradient_is_zero_exactly_where_clipped():
    gen = torch.Generator().manual_seed(13)
    padded, packed, advantages, seq_id, loss_mask = random_grpo_batch(gen, num_seqs=16)
    logps = leaf(packed["logps"])
    old, eps_low, eps_high = packed["old_logps"].float(), 0.2, 0.28
    grpo_loss(logps, old, advantages.float(), seq_id, loss_mask, eps_low=eps_low, eps_high=eps_high,
              aggregation="dapo").backward()
    ratio = torch.exp(logps.detach() - old)
    a = advantages.float()[seq_id]
    clipped = ((a > 0) & (ratio > 1 + eps_high)) | ((a < 0) & (ratio < 1 - eps_low))
    expected_zero = clipped | ~loss_mask | (a == 0)
    assert clipped[loss_mask].any() and (~clipped[loss_mask]).any()  # the batch visits both regions
    assert torch.equal(logps.grad == 0, expected_zero)
    # the pessimistic side is never clipped: A < 0 with r > 1 + ε, A > 0 with r < 1 - ε keep their gradient
    unclipped_far = loss_mask & (((a < 0) & (ratio > 1 + eps_high)) | ((a > 0) & (ratio < 1 - eps_low)))
    assert unclipped_far.any() and torch.all(logps.grad[unclipped_far] != 0)


def test_grpo_decoupled_clip_eps_low_and_eps_high():
    # sequence 0 has A = +1, sequence 1 has A = -1; two tokens each with chosen ratios r
    ratios = torch.tensor([1.25, 1.30, 0.85, 0.75])
    old = torch.zeros(4)
    seq_id, mask, advantages = torch.tensor([0, 0, 1, 1]), torch.ones(4), torch.tensor([1.0, -1.0])

    def run(eps_high):
        logps = leaf(torch.log(ratios))
        loss, stats = grpo_loss(logps, old, advantages, seq_id, mask, eps_low=0.2, eps_high=eps_high,
                                aggregation="dapo", return_stats=True)
        loss.backward()
        return loss, logps.grad, stats

    loss, grad, stats = run(0.28)  # DAPO: r = 1.25 is inside [0.8, 1.28]
    assert loss.item() == pytest.approx((-1.25 - 1.28 + 0.85 + 0.8) / 4, rel=1e-6)
    assert_close(grad, torch.tensor([-1.25 / 4, 0.0, 0.85 / 4, 0.0]))
    assert stats["clip_high_fraction"].item() == 0.25 and stats["clip_low_fraction"].item() == 0.25

    loss, grad, stats = run(0.2)  # symmetric PPO clip: r = 1.25 is clipped too
    assert loss.item() == pytest.approx((-1.2 - 1.2 + 0.85 + 0.8) / 4, rel=1e-6)
    assert_close(grad, torch.tensor([0.0, 0.0, 0.85 / 4, 0.0]))
    assert stats["clip_high_fraction"].item() == 0.5 and stats["clip_low_fraction"].item() == 0.25


def test_grpo_kl_term_alone():
    gen = torch.Generator().manual_seed(14)
    padded, packed, advantages, seq_id, loss_mask = random_grpo_batch(gen)
    zero_advantages = torch.zeros_like(advantages).float()
    logps = leaf(packed["logps"])
    # at π = π_ref (and A = 0) the loss, its gradient and the KL statistic are all exactly 0
    loss, stats = grpo_loss(logps, packed["old_logps"].float(), zero_advantages, seq_id, loss_mask,
                            ref_logps=logps.detach(), beta=0.5, return_stats=True)
    loss.backward()
    assert loss.item() == 0.0 and stats["kl_mean"].item() == 0.0
    assert torch.equal(logps.grad, torch.zeros_like(logps))
    # elsewhere the loss is β times the mean k3 over tokens, and positive
    loss = grpo_loss(logps, packed["old_logps"].float(), zero_advantages, seq_id, loss_mask,
                     ref_logps=packed["ref_logps"].float(), beta=0.5, aggregation="dapo")
    d = padded["ref_logps"] - padded["logps"]
    expected = 0.5 * ((torch.exp(d) - d - 1) * padded["valid"]).sum() / padded["valid"].sum()
    assert loss.item() > 0
    assert_close(loss, expected)


def test_grpo_return_stats():
    gen = torch.Generator().manual_seed(15)
    padded, packed, advantages, seq_id, loss_mask = random_grpo_batch(gen, num_seqs=12)
    logps = leaf(packed["logps"])
    loss, stats = grpo_loss(logps, packed["old_logps"].float(), advantages.float(), seq_id, loss_mask,
                            ref_logps=packed["ref_logps"].float(), beta=0.1, eps_low=0.2, eps_high=0.28,
                            return_stats=True)
    valid, a = padded["valid"].bool(), advantages[:, None].expand_as(padded["logps"])
    ratio = torch.exp(padded["logps"] - padded["old_logps"])
    d = padded["ref_logps"] - padded["logps"]
    expected = {
        "clip_low_fraction": ((ratio < 0.8) & (a < 0))[valid].double().mean(),
        "clip_high_fraction": ((ratio > 1.28) & (a > 0))[valid].double().mean(),
        "ratio_mean": ratio[valid].mean(),
        "kl_mean": (torch.exp(d) - d - 1)[valid].mean(),
        "advantage_abs_mean": advantages.abs().mean(),
    }
    assert set(stats) == set(expected)
    for name, value in stats.items():
        assert value.dtype == torch.float32 and value.dim() == 0 and not value.requires_grad, name
        assert_close(value, expected[name])
    assert expected["clip_low_fraction"] > 0 and expected["clip_high_fraction"] > 0
    assert_close(loss, grpo_loss(logps, packed["old_logps"].float(), advantages.float(), seq_id, loss_mask,
                                 ref_logps=packed["ref_logps"].float(), beta=0.1, eps_high=0.28))


def test_grpo_does_not_depend_on_packing_order():
    gen = torch.Generator().manual_seed(16)
    _, packed, advantages, seq_id, loss_mask = random_grpo_batch(gen)
    order = torch.randperm(advantages.numel(), generator=gen)
    tokens = torch.cat([torch.nonzero(seq_id == s).flatten() for s in order.tolist()])
    new_id = torch.empty_like(order)
    new_id[order] = torch.arange(order.numel())
    for aggregation in ("grpo", "dapo", "dr_grpo"):
        kwargs = {"beta": 0.1, "aggregation": aggregation, "max_len": 30}
        logps, old, ref = (packed[k].float() for k in ("logps", "old_logps", "ref_logps"))
        a = grpo_loss(logps, old, advantages.float(), seq_id, loss_mask, ref_logps=ref, **kwargs)
        b = grpo_loss(logps[tokens], old[tokens], advantages.float()[order], new_id[seq_id[tokens]],
                      loss_mask[tokens], ref_logps=ref[tokens], **kwargs)
        assert_close(a, b)


# ------------------------------------------------------------------------- per-sequence sums, syncs


def test_sequence_sums_match_float64_and_are_deterministic():
    gen = torch.Generator().manual_seed(17)
    num_seqs, num_tokens = 37, 20_000
    for seq_id in (torch.sort(torch.randint(0, num_seqs, (num_tokens,), generator=gen)).values,
                   torch.randint(0, num_seqs, (num_tokens,), generator=gen)):
        token_logps = -torch.rand(num_tokens, generator=gen) * 10
        mask = torch.rand(num_tokens, generator=gen) < 0.7
        first = sequence_logps(token_logps, seq_id, num_seqs)
        for _ in range(3):
            assert torch.equal(sequence_logps(token_logps, seq_id, num_seqs), first)
        expected = [token_logps.double()[seq_id == s].sum() for s in range(num_seqs)]
        assert_close(first, torch.stack(expected), rtol=1e-5, atol=1e-3)
        lengths = sequence_lengths(mask, seq_id, num_seqs)
        assert lengths.dtype == torch.int64
        assert lengths.tolist() == [int(mask[seq_id == s].sum()) for s in range(num_seqs)]
        # the backward is a gather: each token gets its sequence's upstream gradient
        x = leaf(token_logps)
        upstream = torch.randn(num_seqs, generator=gen)
        (sequence_logps(x, seq_id, num_seqs) * upstream).sum().backward()
        assert torch.equal(x.grad, upstream[seq_id])
    # runs under torch's deterministic mode (which would reject a nondeterministic CUDA op by name)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        again = sequence_logps(token_logps, seq_id, num_seqs)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(again, sequence_logps(token_logps, seq_id, num_seqs))


def test_grpo_is_bit_identical_run_to_run():
    gen = torch.Generator().manual_seed(18)
    _, packed, advantages, seq_id, loss_mask = random_grpo_batch(gen, num_seqs=32, max_completion=200)
    results = []
    for _ in range(2):
        logps = leaf(packed["logps"])
        loss = grpo_loss(logps, packed["old_logps"].float(), advantages.float(), seq_id, loss_mask,
                         ref_logps=packed["ref_logps"].float(), beta=0.1)
        loss.backward()
        results.append((loss.detach(), logps.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: float atomics only exist there")
def test_sequence_sums_bit_identical_on_cuda():
    gen = torch.Generator().manual_seed(19)
    num_seqs, num_tokens = 8, 1 << 20  # long runs of equal ids: float atomics would reorder these sums
    seq_id = torch.sort(torch.randint(0, num_seqs, (num_tokens,), generator=gen)).values.cuda()
    token_logps = (-torch.rand(num_tokens, generator=gen) * 10).cuda().requires_grad_(True)
    first = sequence_logps(token_logps, seq_id, num_seqs)
    for _ in range(10):
        assert torch.equal(sequence_logps(token_logps, seq_id, num_seqs), first)
    expected = [token_logps.detach().double()[seq_id == s].sum() for s in range(num_seqs)]
    assert_close(first, torch.stack(expected), rtol=1e-5, atol=1e-2)


def test_no_host_syncs():
    """Meta tensors have no values: any .item(), nonzero or data-dependent shape inside would raise."""
    meta = {"device": "meta"}
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.empty(1, **meta).item()
    t, s = 50, 6
    x, seq_id, mask = torch.empty(t, **meta), torch.zeros(t, dtype=torch.long, **meta), torch.empty(t, **meta)
    loss, stats = grpo_loss(x, x, torch.empty(s, **meta), seq_id, mask, ref_logps=x, beta=0.1,
                            return_stats=True)
    assert loss.device.type == "meta" and all(v.device.type == "meta" for v in stats.values())
    for aggregation in ("dapo", "dr_grpo"):
        grpo_loss(x, x, torch.empty(s, **meta), seq_id, mask, aggregation=aggregation, max_len=64)
    pair = torch.empty(s, **meta)
    sequence_logps(x, seq_id, s), sequence_lengths(mask, seq_id, s), sft_loss(x, mask)
    redi_loss(pair, pair, pair, pair), dpo_loss(pair, pair, pair, pair), simpo_loss(pair, pair, pair, pair)
    group_advantages(torch.empty(24, **meta), 8), overlong_penalty(pair, 16, 4)
