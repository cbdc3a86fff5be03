"""The embedded default: `python train.py --objective ...` with no --data, --model or --init.

    python train.py --objective redi              # task → SFT → control, REDI, symmetric REDI, DPO, SimPO
    python train.py --objective redi --full       # the full protocol: 3 task draws × 2 seeds, the fine grid
    python train.py --objective redi --seeds 3    # the pair stages repeated over 3 seeds of pair order
    python train.py --objective redi --lr 3e-5    # one learning rate for every pair stage (no sweep)
    python train.py --objective sft --max-steps 6 # only the SFT stage, with these flags
    python train.py --objective grpo              # task → SFT → GRPO
    python train.py --recipe phi-embedded         # task → mid-training → SFT → rollout DPO → GRPO
    python -m embedded --help                     # the same command line, and the demo's own flags

No network, no weights: it builds the synthetic task (data/synthetic.py, under <out>/task), trains the `tiny`
model through the experiment's stages, each as `python train.py --config <out>/<stage>/stage.toml`, and
evaluates every model on the task's held-out problems. The package, one concept a file:

    command.py      the command line (train.py's flags, the demo's own), the task, the experiment, the report
    stages.py       a stage's settings (defaults ← embedded/recipes/*.toml ← the user's flags), as stage.toml
    runner.py       the stage cache, a stage as its own train.py process, waves of jobs on pinned cores
    grading.py      greedy pass@1 and the way each answer took; a model's own rollout pairs
    comparison.py   the REDI comparison: protocol, task draws, sweep, stability runs (and --objective grpo)
    bias.py         the control's bias: what the pairs' chosen traces teach against what all positives do
    phi_chain.py    the Phi-4-mini-reasoning chain
    stats.py        the tables' statistics over problems, draws and seeds, with their formulas
    report.py       the tables, results.json and the figures

Results: <out>/results.md (the table printed), <out>/results.json ({"run", "task", "models"}) and the
figures; a stage's own files (stage.toml, train.log, metrics.jsonl, hf/) in <out>/<stage>/.
"""
