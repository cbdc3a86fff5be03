"""REDI, Reinforcement Distillation (Xu et al. 2025, "Harnessing Negative Signals: Reinforcement
Distillation from Teacher Data for LLM Reasoning"; github.com/Tim-Siu/reinforcement-distillation):

    L = -log π(y_w|x) / |y_w|  +  α · log π(y_l|x) / |y_l|

reference-free, with y_w the teacher's correct trace and y_l an incorrect one for the same problem,
log π(y|x) the sum of the completion's token log-probs and |y| its completion tokens, EOS included.
α = 0.8 is the paper's choice (α = 1 is "symmetric REDI"). The gradient raises log π(y_w|x) and lowers
log π(y_l|x), the latter α times as hard (per token of each). Unit: pairs (the mean over the local batch
of pairs). Lengths are clamped to ≥ 1 (an empty completion gives 0, not NaN).

With α = 0 this is SFT on the chosen traces normalised *per sequence*: mean_i(-log π(y_w,i|x_i)/|y_w,i|),
the mean over pairs of each chosen trace's own `sft_loss`. It equals the token-level `sft_loss` over the
whole batch only when every chosen trace has the same length (or B = 1).
"""

import torch

from losses.common import at_least_fp32


def redi_loss(
    chosen_logps: torch.Tensor,
    chosen_lens: torch.Tensor,
    rejected_logps: torch.Tensor,
    rejected_lens: torch.Tensor,
    alpha: float = 0.8,
) -> torch.Tensor:
    """Log-prob sums [B] and completion lengths [B], chosen and rejected -> scalar mean over pairs."""
    tensors = {"chosen_logps": chosen_logps, "chosen_lens": chosen_lens,
               "rejected_logps": rejected_logps, "rejected_lens": rejected_lens}
    for name, t in tensors.items():
        if t.dim() != 1 or t.shape != chosen_logps.shape:
            raise ValueError(f"redi_loss: {name} has shape {tuple(t.shape)}, expected [B] = "
                             f"{tuple(chosen_logps.shape)} like chosen_logps")
    chosen, rejected = at_least_fp32(chosen_logps), at_least_fp32(rejected_logps)
    chosen_avg = chosen / chosen_lens.to(chosen.dtype).clamp(min=1.0)
    rejected_avg = rejected / rejected_lens.to(rejected.dtype).clamp(min=1.0)
    return (-chosen_avg + alpha * rejected_avg).mean()
