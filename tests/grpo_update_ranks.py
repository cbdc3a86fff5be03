"""One GRPO update on fixed rollouts, run by tests/test_train.py under `python` and under torchrun: prints the
step's metrics and the updated weights' checksum (rank 0), which must not depend on the number of ranks.
argv: the aggregation, then the updates per rollout (1: the on-policy, 3-GEMM path; 2: the clipped one,
whose first mini-batch is what is updated here)."""

import json
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from losses import group_advantages  # noqa: E402
from rollouts import Rollouts  # noqa: E402

aggregation, updates = sys.argv[1], sys.argv[2]
args = train.parse_args(["--objective", "grpo", "--model", "tiny", "--batch-tokens", "160", "--lr", "1e-3",
                         "--group-size", "4", "--max-new-tokens", "24", "--aggregation", aggregation,
                         "--eps-high", "0.28", "--precision", "fp32", "--updates-per-rollout", updates])
d = train.setup_distributed()
model = train.build_model(args, train.model_config(args), d)
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
run = train.Run(args, d, Path("."), None, train.model_config(args), None, model, None, None, None, optimizer,
                scheduler, torch.Generator(), 1, 0)

g = torch.Generator().manual_seed(0)
groups, size = 6, args.group_size
prompts, completions, logps = [], [], []
for _ in range(groups):
    prompt = torch.randint(0, 512, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
    for _ in range(size):
        n = int(torch.randint(1, 24, (1,), generator=g))
        prompts.append(prompt)
        completions.append(torch.randint(0, 512, (n,), generator=g).tolist())
        logps.append((-6.2 + 0.3 * torch.randn(n, generator=g)).tolist())  # near log(1/512): some ratios clip
rewards = torch.randint(0, 2, (groups * size,), generator=g).float()
batch = Rollouts(prompts, completions, logps, rewards, rewards, torch.zeros_like(rewards), size, pad_id=0)
advantages = group_advantages(rewards, size)
units = [u for u in range(groups * size) if (u // size) % d.world == d.rank]  # whole groups per rank
sums, _ = train.grpo_update(args, model, None, batch, advantages, units, 1.0, d)
row = train.optimizer_step(run, sums)
state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
row["checksum"] = float(
    sum((v.double() * (1 + torch.arange(v.numel()).view(v.shape) % 7)).sum() for v in state.values())
)
if d.main:
    print("RESULT " + json.dumps(row))
torch.distributed.destroy_process_group()
