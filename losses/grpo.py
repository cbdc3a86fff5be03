"""The GRPO family: group-relative advantages, the clipped surrogate, three ways to average it.

Advantages of sequence i in its group G (the completions of one prompt), with rewards R:
    A_i = (R_i - mean_G R) / (std_G R + ε)   GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300)
    A_i =  R_i - mean_G R                    Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like
                                             Training: A Critical Perspective", arXiv:2503.20783)
std is Bessel-corrected (torch.std, as TRL and verl compute it). A group of equal rewards gets A = 0.

Per loss token t of sequence i, with r_t = π(o_t)/π_old(o_t) = exp(logp_t - old_logp_t):
    ℓ_t = -min(r_t·A_i, clip(r_t, 1 - ε_low, 1 + ε_high)·A_i) + β·KL_k3,t
    KL_k3 = exp(ref - logp) - (ref - logp) - 1    (Schulman's k3 estimate of KL(π ‖ π_ref): ≥ 0, 0 at
                                                   equality; needs the reference log-probs)
ε_low = ε_high = 0.2 is PPO's clip; DAPO (Yu et al. 2025, arXiv:2503.14476) decouples them: ε_low 0.2,
ε_high 0.28. Where the clip is active (A > 0 and r > 1 + ε_high, or A < 0 and r < 1 - ε_low) the min
picks the constant and the token gets no gradient from the surrogate.

Aggregation over the S sequences of the local batch, |o_i| = loss tokens of sequence i:
    "grpo":    1/S · Σ_i 1/|o_i| · Σ_{t∈o_i} ℓ_t    unit: sequences (GRPO)
    "dapo":    Σ_i Σ_{t∈o_i} ℓ_t / Σ_i |o_i|        unit: tokens    (DAPO's token-level loss)
    "dr_grpo": Σ_i Σ_{t∈o_i} ℓ_t / (S · L_max)      unit: sequences (Dr. GRPO; L_max = generation budget)
train.py weights each micro-batch's loss by its share of the global units (`grpo_loss_unit`).

Soft overlong punishment (DAPO Eq. 13), added to the reward; L_max is the expected maximum length and
L_cache the soft band before it:
    R_length(L) = 0                                if L ≤ L_max - L_cache
                = (L_max - L_cache - L) / L_cache  if L_max - L_cache < L ≤ L_max
                = -1                               if L > L_max

Inputs are packed: per-token tensors are [T] and `seq_id[T]` maps each token to its sequence 0..S-1.
Per-sequence sums go through `losses.common.segment_sum` (deterministic on CUDA). No host syncs here.
"""

from typing import Literal

import torch

from losses.common import at_least_fp32, segment_sum

Aggregation = Literal["grpo", "dapo", "dr_grpo"]
AGGREGATION_UNITS = {"grpo": "sequences", "dapo": "tokens", "dr_grpo": "sequences"}


def grpo_loss_unit(aggregation: Aggregation) -> Literal["tokens", "sequences"]:
    """What `grpo_loss(..., aggregation=aggregation)` is a local mean over: "tokens" or "sequences"."""
    if aggregation not in AGGREGATION_UNITS:
        raise ValueError(f"aggregation={aggregation!r}: expected one of {sorted(AGGREGATION_UNITS)}")
    return AGGREGATION_UNITS[aggregation]


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """A = (R - mean_G) / (std_G + eps), or R - mean_G without the std (Dr. GRPO): [B] -> [B], fp32.

    Groups are consecutive blocks of `group_size` rewards. Rewards are shifted by their group's first one
    before averaging, so a group of equal rewards gives exactly 0 (no rounding residue over a tiny std).
    """
    if rewards.dim() != 1 or group_size < 2 or rewards.numel() % group_size != 0:
        raise ValueError(f"group_advantages: rewards {tuple(rewards.shape)} must be [B] with B a multiple "
                         f"of group_size={group_size} ≥ 2")
    grouped = at_least_fp32(rewards.detach()).view(-1, group_size)
    shifted = grouped - grouped[:, :1]
    advantages = shifted - shifted.mean(dim=1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (shifted.std(dim=1, keepdim=True) + eps)
    return advantages.flatten()


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO's soft overlong punishment R_length(L) (module docstring): [B] -> fp32 [B], in [-1, 0]."""
    if not 0 < cache_len <= max_len:
        raise ValueError(f"overlong_penalty: need 0 < cache_len ≤ max_len, got cache_len={cache_len}, "
                         f"max_len={max_len}")
    lengths = at_least_fp32(lengths)
    soft_band = ((max_len - cache_len - lengths) / cache_len).clamp(max=0.0)
    return torch.where(lengths > max_len, torch.full_like(soft_band, -1.0), soft_band)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL_k3 = exp(ref - logp) - (ref - logp) - 1, as expm1(d) - d (exact near 0); ≥ 0."""
    d = ref_logps - logps
    return torch.expm1(d) - d


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    seq_id: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: Aggregation = "grpo",
    max_len: int | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped GRPO-family loss over packed tokens (formulas in the module docstring).

    logps, old_logps, seq_id, loss_mask (and ref_logps) are [T]; advantages is [S], one per sequence.
    old_logps, ref_logps and advantages are constants (detached here). The KL term needs ref_logps when
    beta ≠ 0; max_len (the generation budget L_max) is needed by "dr_grpo" and ignored otherwise. Tokens
    outside loss_mask count for nothing, whatever log-probs they carry.

    With return_stats, also a dict of detached fp32 scalars: clip_low_fraction / clip_high_fraction
    (loss tokens where the lower / upper clip is active, so no surrogate gradient), ratio_mean and
    kl_mean (over loss tokens; kl_mean is 0 without ref_logps), advantage_abs_mean (over sequences).
    """
    per_token_inputs = {"old_logps": old_logps, "seq_id": seq_id, "loss_mask": loss_mask,
                        "ref_logps": ref_logps}
    for name, t in per_token_inputs.items():
        if t is not None and t.shape != logps.shape:
            raise ValueError(f"grpo_loss: {name} has shape {tuple(t.shape)}, expected [T] = "
                             f"{tuple(logps.shape)} like logps")
    if logps.dim() != 1 or advantages.dim() != 1:
        raise ValueError(f"grpo_loss: logps {tuple(logps.shape)} must be [T] and advantages "
                         f"{tuple(advantages.shape)} must be [S]")
    grpo_loss_unit(aggregation)  # rejects an unknown name
    if aggregation == "dr_grpo" and max_len is None:
        raise ValueError("grpo_loss: aggregation='dr_grpo' needs max_len (the generation budget L_max)")
    if beta != 0.0 and ref_logps is None:
        raise ValueError(f"grpo_loss: beta={beta} needs ref_logps for the KL term")

    num_seqs = advantages.shape[0]
    logps = at_least_fp32(logps)
    mask = loss_mask.bool()
    token_advantages = at_least_fp32(advantages.detach())[seq_id.long()]  # A_i on each token of i

    # r = exp(logp - old_logp); off the loss tokens the log-ratio is 0, so stray values cannot overflow.
    log_ratio = torch.where(mask, logps - at_least_fp32(old_logps.detach()), 0.0)
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * token_advantages, clipped_ratio * token_advantages)
    kl = None
    if ref_logps is not None:
        ref = at_least_fp32(ref_logps.detach())
        kl = k3_kl(torch.where(mask, logps, 0.0), torch.where(mask, ref, 0.0))
        per_token = per_token + beta * kl
    per_token = torch.where(mask, per_token, 0.0)

    token_weight = mask.to(per_token.dtype)
    if aggregation == "grpo":
        seq_sums = segment_sum(per_token, seq_id, num_seqs)
        seq_lens = segment_sum(token_weight, seq_id, num_seqs)
        loss = (seq_sums / seq_lens.clamp(min=1.0)).sum() / max(num_seqs, 1)
    elif aggregation == "dapo":
        loss = per_token.sum() / token_weight.sum().clamp(min=1.0)
    else:  # dr_grpo
        loss = per_token.sum() / (max(num_seqs, 1) * max_len)
    if not return_stats:
        return loss

    with torch.no_grad():
        num_loss_tokens = token_weight.sum().clamp(min=1.0)
        clipped_low = mask & (ratio < 1.0 - eps_low) & (token_advantages < 0)
        clipped_high = mask & (ratio > 1.0 + eps_high) & (token_advantages > 0)
        kl_sum = (kl * token_weight).sum() if kl is not None else logps.new_zeros(())
        stats = {
            "clip_low_fraction": clipped_low.sum() / num_loss_tokens,
            "clip_high_fraction": clipped_high.sum() / num_loss_tokens,
            "ratio_mean": (ratio * token_weight).sum() / num_loss_tokens,
            "kl_mean": kl_sum / num_loss_tokens,
            "advantage_abs_mean": at_least_fp32(advantages.detach()).abs().sum() / max(num_seqs, 1),
        }
    return loss, {name: value.detach().float() for name, value in stats.items()}
