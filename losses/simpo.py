"""SimPO (Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
arXiv:2405.14734, Eq. 6): length-normalised and reference-free,

    L = -log σ( β/|y_w| · log π(y_w|x) - β/|y_l| · log π(y_l|x) - γ )

log π(y|x) is the sum of the completion's token log-probs, |y| its completion tokens (EOS included).
γ is the full reward margin, outside the β, as in the paper's formula. The authors' code takes
`gamma_beta_ratio` = γ/β and computes β·(Δ - γ/β); TRL's CPO trainer (which REDI's baseline ran) takes
`simpo_gamma` = γ and divides it by β the same way. All three are this formula, so β = 2, γ = 1 here is
their β = 2, gamma_beta_ratio = 0.5. At equal average log-probs the loss is softplus(γ).
Unit: pairs (the mean over the local batch of pairs). Lengths are clamped to ≥ 1 (an empty completion
gives 0, not NaN).
"""

import torch
import torch.nn.functional as F

from losses.common import at_least_fp32


def simpo_loss(
    chosen_logps: torch.Tensor,
    chosen_lens: torch.Tensor,
    rejected_logps: torch.Tensor,
    rejected_lens: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 1.0,
) -> torch.Tensor:
    """Log-prob sums [B] and completion lengths [B], chosen and rejected -> scalar mean over pairs."""
    tensors = {"chosen_logps": chosen_logps, "chosen_lens": chosen_lens,
               "rejected_logps": rejected_logps, "rejected_lens": rejected_lens}
    for name, t in tensors.items():
        if t.dim() != 1 or t.shape != chosen_logps.shape:
            raise ValueError(f"simpo_loss: {name} has shape {tuple(t.shape)}, expected [B] = "
                             f"{tuple(chosen_logps.shape)} like chosen_logps")
    chosen, rejected = at_least_fp32(chosen_logps), at_least_fp32(rejected_logps)
    chosen_avg = chosen / chosen_lens.to(chosen.dtype).clamp(min=1.0)
    rejected_avg = rejected / rejected_lens.to(rejected.dtype).clamp(min=1.0)
    return -F.logsigmoid(beta * chosen_avg - beta * rejected_avg - gamma).mean()
