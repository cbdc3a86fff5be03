"""Sampling evaluation on math benchmarks, and rollouts -> preference pairs.

    python eval.py --model runs/redi/hf --benchmark all --n 16 --temperature 0.6 --top-p 0.95 \\
        --max-new-tokens 32768 --out results/redi.json          # the REDI table (stop and rerun: it resumes)
    python eval.py --model runs/sft/hf --benchmark data_out/synthetic/test.jsonl --n 4 \\
        --max-new-tokens 256 --out results/sft.json             # any JSONL with problem/answer fields
    python eval.py --model runs/sft/hf --benchmark data_out/synthetic/rl.jsonl --n 8 --temperature 1.0 \\
        --top-p 1.0 --max-new-tokens 256 --out rollouts.json --pairs-out pairs.jsonl   # Phi stage 3 data

A problem's prompt is the chat template applied to one user message, the problem text followed by
"\\n" + --prompt-suffix (default: "Please reason step by step, and put your final answer within \\boxed{}."
for the five benchmarks, by name or as a file named like one; none for other files such as the synthetic
task's), plus "<think>\\n" with --think-prefix. Each of the n completions is graded by
data.rewards.math_reward (with --think-prefix the stored completion starts with that "<think>\\n", so the
answer is what follows "</think>").

Metrics over a benchmark's P problems, problem i having c_i correct of n completions:
    pass@1        = (1/P) sum_i c_i / n                               (the mean over the n samples)
    pass@1_stderr = std_i(c_i / n) / sqrt(P)   (ddof = 1; the spread over problems, P = 1 gives 0)
    pass@k        = (1/P) sum_i [1 - C(n - c_i, k) / C(n, k)]         for k = 1, 2, 4, ... <= n: the
                    unbiased estimator of "one of k samples is correct" (Chen et al. 2021)
    maj@n         = (1/P) sum_i [the most frequent final boxed answer of the n is correct]: answers compared
                    as strings (spaces removed), ties to the answer seen first; no boxed answer, no vote
overall: the unweighted mean over benchmarks of each metric (the REDI table's average), its stderr
sqrt(sum_b se_b^2) / B.

Output: --out JSON {"config": {...}, "benchmarks": {name: {"pass@1", "pass@1_stderr", "maj@n", "pass@k",
"prompt_suffix", "problems": [{"id", "problem", "answer", "completions", "rewards"}]}}, "overall": {...}},
rewritten (atomically) at least every --save-every seconds and after each benchmark; a markdown table on
stdout. Resumable: rerun the same command and the problems already in --out are skipped (its config must
equal this run's, else an error names what differs); the rest are sampled from a generator seeded with
(--seed, the number already done), so a resumed run is a valid sample, not the same random numbers.

--pairs-out FILE writes one line {"id", "prompt", "chosen", "rejected"} for each problem with at least one
correct and one incorrect completion: the first correct and the first incorrect (the rule of REDI's data,
data.recipes.openr1.select_chosen_rejected), prompt = the user message sampled from. That is the pairs
format `train.py --objective dpo|simpo|redi` reads.

Benchmarks (--benchmark, several allowed, `all` = the five REDI ones; data/benchmarks.py): a name reads
DIR/<name>.jsonl where a local copy is given (--benchmark-dir DIR, or NANOREASON_BENCHMARKS=DIR), else its
hub dataset (network and huggingface_hub; `python -m data.benchmarks --out DIR all` saves local copies); a
path reads that JSONL file; `hub:owner/name` that hub dataset's test split. A benchmark gets its prompt
suffix however it is given (a file named math500.jsonl gets what --benchmark math500 gets).

From code: `from eval import evaluate, evaluate_shards` (no side effects on import); training's in-run
evaluation is `evaluate_shards` on `data.benchmarks.load_problems(--eval-data)` with that benchmark's prompt
suffix, so a model scores the same on the same problems through train.py and through eval.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import errors
from data import prompts
from data.benchmarks import BENCHMARKS, LOCAL_ENV, Problem, load_problems
from data.recipes.openr1 import select_chosen_rejected
from data.rewards import answer_text, extract_boxed, math_reward
from flags import HelpFormatter
from model.generate import generate

# ---- metrics -------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k): the probability that k of the n samples, drawn without replacement,
    hold a correct one (the unbiased estimator of pass@k from n samples with c correct)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(completions: Sequence[str], rewards: Sequence[float]) -> float:
    """The reward of the most frequent final boxed answer (spaces removed; ties: the first seen); 0.0 when
    no completion has one."""
    answers = [extract_boxed(answer_text(c)) for c in completions]
    keys = [None if a is None else "".join(a.split()) for a in answers]
    counts = Counter(k for k in keys if k)
    if not counts:
        return 0.0
    top = max(counts.values())
    winner = next(k for k in keys if k and counts[k] == top)
    return float(rewards[keys.index(winner)])


@dataclass
class ProblemResult:
    id: str
    problem: str
    answer: str
    completions: list[str]
    rewards: list[float]


def benchmark_metrics(problems: Sequence[ProblemResult]) -> dict:
    """pass@1 (mean over n) with its stderr over problems, maj@n, pass@k for k = 1, 2, 4, ... <= n."""
    if not problems:
        return {"problems": 0, "n": 0, "pass@1": 0.0, "pass@1_stderr": 0.0, "maj@n": 0.0, "pass@k": {}}
    n = len(problems[0].completions)
    if any(len(p.rewards) != n for p in problems):
        raise ValueError("every problem needs the same number of graded completions")
    correct = [sum(r == 1.0 for r in p.rewards) for p in problems]
    per_problem = [c / n for c in correct]
    mean = sum(per_problem) / len(problems)
    variance = sum((x - mean) ** 2 for x in per_problem) / (len(problems) - 1) if len(problems) > 1 else 0.0
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return {
        "problems": len(problems),
        "n": n,
        "pass@1": mean,
        "pass@1_stderr": math.sqrt(variance / len(problems)),
        "maj@n": sum(majority_vote(p.completions, p.rewards) for p in problems) / len(problems),
        "pass@k": {str(k): sum(pass_at_k(n, c, k) for c in correct) / len(problems) for k in ks},
    }


def overall_metrics(per_benchmark: Sequence[dict]) -> dict:
    """The unweighted mean over benchmarks; stderr sqrt(sum se^2) / B."""
    per_benchmark = [m for m in per_benchmark if m["problems"]]
    if not per_benchmark:
        return {"benchmarks": 0, "pass@1": 0.0, "pass@1_stderr": 0.0, "maj@n": 0.0, "pass@k": {}}
    count = len(per_benchmark)
    ks = set.intersection(*(set(m["pass@k"]) for m in per_benchmark))
    return {
        "benchmarks": count,
        "pass@1": sum(m["pass@1"] for m in per_benchmark) / count,
        "pass@1_stderr": math.sqrt(sum(m["pass@1_stderr"] ** 2 for m in per_benchmark)) / count,
        "maj@n": sum(m["maj@n"] for m in per_benchmark) / count,
        "pass@k": {k: sum(m["pass@k"][k] for m in per_benchmark) / count for k in sorted(ks, key=int)},
    }


@dataclass
class EvalResult:
    problems: list[ProblemResult]

    def metrics(self) -> dict:
        return benchmark_metrics(self.problems)

    @property
    def pass_at_1(self) -> float:
        return self.metrics()["pass@1"]

    @property
    def pass_at_1_stderr(self) -> float:
        return self.metrics()["pass@1_stderr"]

    @property
    def maj_at_n(self) -> float:
        return self.metrics()["maj@n"]

    @property
    def pass_at_k(self) -> dict[int, float]:
        return {int(k): v for k, v in self.metrics()["pass@k"].items()}


# ---- sampling and grading ------------------------------------------------------------------------------


def sample_completions(
    model,  # noqa: ANN001 (model.Transformer)
    tok,  # noqa: ANN001 (data.tokenizer.Tokenizer)
    problems: Sequence[str],
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    think_prefix: bool = False,
    batch_size: int,
    generator: torch.Generator | None,
    prompt_suffix: str = "",
    top_k: int = 0,
    stop_ids: Sequence[int] | None = None,
    compile: bool = False,
) -> list[list[str]]:
    """n completion texts per problem (the stop token removed; "<think>\\n" in front with think_prefix)."""
    stop = list(stop_ids) if stop_ids is not None else prompts.stop_ids(tok)
    ids = [prompts.problem_prompt(tok, p, suffix=prompt_suffix, think_prefix=think_prefix) for p in problems]
    gen = generate(model, ids, max_new_tokens=max_new_tokens, n=n, temperature=temperature, top_p=top_p,
                   top_k=top_k, eos_ids=stop, generator=generator, compile=compile, batch_size=batch_size)
    texts = [prompts.completion_text(tok, tokens, finished, stop, think_prefix)
             for tokens, finished in zip(gen.tokens, gen.finished, strict=True)]
    return [texts[i * n:(i + 1) * n] for i in range(len(problems))]


def evaluate(
    model,  # noqa: ANN001
    tok,  # noqa: ANN001
    problems: Sequence[Problem],
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    think_prefix: bool = False,
    seed: int = 0,
    progress: bool = True,
    prompt_suffix: str = "",
    top_k: int = 0,
    stop_ids: Sequence[int] | None = None,
    compile: bool = False,
    on_results: Callable[[list[ProblemResult]], None] | None = None,
) -> EvalResult:
    """Sample n completions per problem, grade them with math_reward -> EvalResult (completions, rewards,
    metrics). Problems go max(1, batch_size // n) at a time (one generation wave); `on_results` sees each
    finished group (eval.py's resumable output)."""
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    per_wave = max(1, batch_size // n)
    results: list[ProblemResult] = []
    bar = tqdm(total=len(problems), desc="eval", unit="problem", disable=not progress, file=sys.stderr)
    for start in range(0, len(problems), per_wave):
        group = problems[start:start + per_wave]
        texts = sample_completions(
            model, tok, [p.problem for p in group], n=n, temperature=temperature, top_p=top_p,
            max_new_tokens=max_new_tokens, think_prefix=think_prefix, batch_size=batch_size,
            generator=generator, prompt_suffix=prompt_suffix, top_k=top_k, stop_ids=stop_ids, compile=compile,
        )
        done = [ProblemResult(p.id, p.problem, p.answer, cs, [math_reward(c, p.answer) for c in cs])
                for p, cs in zip(group, texts, strict=True)]
        results += done
        if on_results is not None:
            on_results(done)
        bar.update(len(group))
        bar.set_postfix({"pass@1": f"{benchmark_metrics(results)['pass@1']:.3f}"})
    bar.close()
    return EvalResult(results)


def evaluate_shards(
    model,  # noqa: ANN001
    tok,  # noqa: ANN001
    problems: Sequence[Problem],
    *,
    rank: int = 0,
    world: int = 1,
    device: torch.device | str = "cpu",
    seed: int = 0,
    **options,
) -> EvalResult:
    """`evaluate` split over the ranks of a process group: rank r samples problems r::world (seed + r) and
    every rank gets the whole EvalResult back, in the problems' order. What training calls for in-run and
    end-of-stage evaluation; `options` are evaluate's (n, temperature, prompt_suffix, ...)."""
    import torch.distributed as dist

    mine = list(problems[rank::world])
    local = evaluate(model, tok, mine, seed=seed + rank, progress=False, **options).problems if mine else []
    if world == 1:
        return EvalResult(local)
    shards: list = [None] * world
    dist.all_gather_object(shards, local)
    ordered = [None] * len(problems)
    for r, shard in enumerate(shards):
        ordered[r::world] = shard
    return EvalResult(ordered)


def preference_pairs(results: Sequence[ProblemResult], prompt_suffix: str = "") -> list[dict]:
    """{"id", "prompt", "chosen", "rejected"} for each problem with a correct and an incorrect completion."""
    pairs = []
    for r in results:
        chosen, rejected = select_chosen_rejected([reward == 1.0 for reward in r.rewards])
        if chosen is not None and rejected is not None:
            pairs.append({"id": r.id, "prompt": prompts.user_message(r.problem, prompt_suffix),
                          "chosen": r.completions[chosen], "rejected": r.completions[rejected]})
    return pairs


# ---- the command line ----------------------------------------------------------------------------------


def markdown_table(report: dict) -> str:
    """One row per benchmark and the overall mean: pass@1 ± stderr, maj@n, pass@k."""
    ks = sorted({k for b in report["benchmarks"].values() for k in b["pass@k"]}, key=int)
    n = report["config"]["n"]
    headers = ["benchmark", "problems", "pass@1 (± se)", f"maj@{n}", *(f"pass@{k}" for k in ks)]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|---|---:|---:|" + "---:|" * (1 + len(ks)),
    ]

    def row(name: str, count, m: dict) -> str:  # noqa: ANN001
        cells = [f"{100 * m['maj@n']:.1f}", *(f"{100 * m['pass@k'][k]:.1f}" if k in m["pass@k"] else "-"
                                             for k in ks)]
        return (f"| {name} | {count} | {100 * m['pass@1']:.1f} ± {100 * m['pass@1_stderr']:.1f} | "
                + " | ".join(cells) + " |")

    for name, b in report["benchmarks"].items():
        lines.append(row(name, len(b["problems"]), b))
    if len(report["benchmarks"]) > 1:
        lines.append(row("overall", sum(len(b["problems"]) for b in report["benchmarks"].values()),
                         report["overall"]))
    return "\n".join(lines)


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1))
    os.replace(tmp, path)


def _benchmark_entry(results: list[ProblemResult], prompt_suffix: str) -> dict:
    metrics = benchmark_metrics(results)
    return {"pass@1": metrics["pass@1"], "pass@1_stderr": metrics["pass@1_stderr"], "maj@n": metrics["maj@n"],
            "pass@k": metrics["pass@k"], "prompt_suffix": prompt_suffix,
            "problems": [asdict(r) for r in results]}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = errors.ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0],
                              formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--benchmark", nargs="+", required=True,
                   help=f"names ({', '.join(BENCHMARKS)}), `all`, JSONL paths, or hub:owner/name")
    p.add_argument("--benchmark-dir", type=Path, default=None,
                   help=f"a directory of local copies, <name>.jsonl, read for the benchmark names instead of "
                        f"the hub (default: ${LOCAL_ENV} where set)")
    p.add_argument("--n", type=int, default=16, help="completions per problem")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--max-new-tokens", type=int, default=32768, help="completion budget in tokens")
    p.add_argument("--batch-size", type=int, default=64, help="rows (problems x n) sampled together")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--think-prefix", action="store_true", help="start each completion after '<think>\\n'")
    p.add_argument("--prompt-suffix", default=None,
                   help="text after the problem (default: the boxed-answer instruction for named benchmarks, "
                        "nothing for files)")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems of each benchmark")
    p.add_argument("--out", required=True, help="JSON with metrics and every completion (resumed if present)")
    p.add_argument("--pairs-out", help="also write (chosen, rejected) preference pairs here (JSONL)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model runs: cuda, cuda:<i> or cpu (default: cuda when a GPU is visible, "
                   "else cpu)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs)")
    p.add_argument("--save-every", type=float, default=60.0, help="seconds between rewrites of --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help=errors.DEBUG_HELP)
    args = p.parse_args(argv)
    errors.check_ranges(vars(args), LEGAL)
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise errors.UserError(f"--device {args.device}: no CUDA device here (--device cpu)")
    return args


LEGAL = {"n": ">= 1", "temperature": ">= 0", "top_p": "(0, 1]", "top_k": ">= 0", "max_new_tokens": ">= 1",
         "batch_size": ">= 1", "seed": ">= 0", "limit": ">= 1", "save_every": ">= 0"}  # errors.check_ranges


def main(argv: Sequence[str] | None = None) -> dict:
    from data.tokenizer import Tokenizer
    from model import Transformer

    args = parse_args(argv)
    dtype = args.dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32")
    config = {
        "model": str(Path(args.model).resolve()), "n": args.n, "temperature": args.temperature,
        "top_p": args.top_p, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
        "think_prefix": args.think_prefix, "prompt_suffix": args.prompt_suffix, "dtype": dtype,
    }
    out = Path(args.out)
    report = {"config": config, "benchmarks": {}, "overall": {}}
    if out.is_file():
        report = _read_report(out)
        differing = {k: (report.get("config", {}).get(k), v) for k, v in config.items()
                     if report.get("config", {}).get(k) != v}
        if differing:
            raise errors.UserError(f"{out}: written with another config; differing (theirs, ours): "
                                   f"{differing}. Use another --out or the same settings.")
    specs = [s for spec in args.benchmark for s in (BENCHMARKS if spec == "all" else (spec,))]
    benchmarks = [load_problems(spec, benchmark_dir=args.benchmark_dir) for spec in specs]

    model = Transformer.from_pretrained(args.model, dtype=getattr(torch, dtype), device=args.device)
    tok = Tokenizer.from_pretrained(args.tokenizer or args.model)
    stop_ids = prompts.stop_ids(tok, args.model)
    last_save = time.monotonic()

    for name, problems, default_suffix in benchmarks:
        suffix = default_suffix if args.prompt_suffix is None else args.prompt_suffix
        problems = problems[:args.limit] if args.limit is not None else problems
        entry = report["benchmarks"].get(name, {})
        results = [ProblemResult(**r) for r in entry.get("problems", [])]
        done = {r.id for r in results}
        todo = [p for p in problems if p.id not in done]
        print(f"{name}: {len(problems)} problems, {len(problems) - len(todo)} already in {out}, "
              f"sampling {len(todo)}", file=sys.stderr)

        def save(new: list[ProblemResult], name=name, results=results, suffix=suffix) -> None:  # noqa: ANN001
            nonlocal last_save
            results.extend(new)
            if time.monotonic() - last_save >= args.save_every:
                report["benchmarks"][name] = _benchmark_entry(results, suffix)
                _write_json(out, report)
                last_save = time.monotonic()

        if todo:
            evaluate(model, tok, todo, n=args.n, temperature=args.temperature, top_p=args.top_p,
                     top_k=args.top_k, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                     think_prefix=args.think_prefix, seed=args.seed * 1_000_003 + len(done),
                     progress=not args.no_progress, prompt_suffix=suffix, stop_ids=stop_ids,
                     compile=args.compile, on_results=save)
        report["benchmarks"][name] = _benchmark_entry(results, suffix)
        report["overall"] = overall_metrics([benchmark_metrics(_results(b))
                                             for b in report["benchmarks"].values()])
        _write_json(out, report)
        last_save = time.monotonic()

    print(markdown_table(report))
    if args.pairs_out:
        pairs, total = [], 0
        for name, _, _ in benchmarks:
            entry = report["benchmarks"][name]
            results = _results(entry)
            total += len(results)
            pairs += preference_pairs(results, entry["prompt_suffix"])
        path = Path(args.pairs_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
        print(f"pairs: {len(pairs)} of {total} problems had a correct and an incorrect completion -> {path}",
              file=sys.stderr)
    return report


def _results(entry: dict) -> list[ProblemResult]:
    return [ProblemResult(**r) for r in entry["problems"]]


def _read_report(out: Path) -> dict:
    """An --out written by an earlier run (to resume); anything else there is an error naming it."""
    why = "no config"
    try:
        report = json.loads(out.read_text(encoding="utf-8"))
        for entry in report["benchmarks"].values():
            _results(entry)
        if isinstance(report["config"], dict):
            return report
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
        why = f"{type(e).__name__}: {e}"
    raise errors.UserError(f"{out}: not an eval.py output to resume ({why}): use another --out or delete it")


if __name__ == "__main__":
    errors.run(main, "eval.py")
