"""Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your Language
Model is Secretly a Reward Model", arXiv:2305.18290, Eq. 7):

    L = -log σ( β · [ (log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x)) ] )

log π(y|x) is the *sum* of the completion's token log-probs (no length normalisation). Unit: pairs (the
mean over the local batch of pairs). The reference log-probs are constants: they are detached here.
When π = π_ref the loss is log 2 for every β. REDI's baseline uses β = 0.001; the DPO paper's is 0.1.
"""

import torch
import torch.nn.functional as F

from losses.common import at_least_fp32


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """Sequence log-probs [B] of policy and reference, chosen and rejected -> scalar mean over pairs."""
    tensors = {"chosen_logps": chosen_logps, "rejected_logps": rejected_logps,
               "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    for name, t in tensors.items():
        if t.dim() != 1 or t.shape != chosen_logps.shape:
            raise ValueError(f"dpo_loss: {name} has shape {tuple(t.shape)}, expected [B] = "
                             f"{tuple(chosen_logps.shape)} like chosen_logps")
    chosen, rejected = at_least_fp32(chosen_logps), at_least_fp32(rejected_logps)
    ref_chosen = at_least_fp32(ref_chosen_logps.detach())
    ref_rejected = at_least_fp32(ref_rejected_logps.detach())
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()
