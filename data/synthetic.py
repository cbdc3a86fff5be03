"""The embedded default task: multi-step arithmetic word problems, and a teacher that sometimes slips.

    python -m data.synthetic --out data_out/synthetic      # a few seconds; a finished output is reused

A problem is a start value and 2-3 steps (+ or - a two-digit number, * a one-digit one), told as a story:
    "Mia has 47 points in a game. Mia wins 38 points. Then a penalty takes away 19 points.
     How many points does Mia have now?"                                                     answer: 66
The teacher writes `samples_per_problem` traces per training problem, one `a op b = c` line per step:
    <think>
    47 + 38 = 85
    85 - 19 = 66
    </think>
    The answer is \\boxed{66}.
With probability `error_rate` a trace has one realistic mistake, at a random step, carried to the end (the
later steps are right about the wrong value, so the final answer follows from the mistake):
    carry    a dropped carry or borrow of the units column   47 + 38 = 75,  52 - 38 = 24,  47 * 3 = 121
    sign     a negative result written as positive           12 - 19 = 7
    operand  another number of the problem used              85 - 38 = 47   (38 belongs to another step)
Whether a trace is correct is then decided by math_reward(trace, answer), exactly as for real data, and the
positives (first correct trace) and pairs (first correct, first incorrect) are chosen from teacher rows in the
OpenR1-Math-Raw schema by data.recipes.openr1.select, the function the OpenR1 recipe uses.

build_task(out_dir, ...) writes
    tokenizer/     byte-level BPE (tokenizers) trained on the training text: vocab <= 512, one token per
                   digit, <|endoftext|> (pad), <|im_start|>, <|im_end|> (EOS), <think>, </think>; a ChatML
                   chat template in tokenizer_config.json (transformers.AutoTokenizer loads it too)
    sft.jsonl      {"id", "messages": [user problem, assistant trace]}: the positives
    pairs.jsonl    {"id", "prompt", "chosen", "rejected"}
    rl.jsonl       {"id", "problem", "answer"}: every training problem
    test.jsonl     {"id", "problem", "answer"}: held-out problems, none of whose texts or number tuples
                   (start, operands...) is in any training file; data.benchmarks.load_benchmark reads it
    teacher.jsonl  every trace, one row per problem in the OpenR1-Math-Raw schema (`generations`,
                   `correctness.math_verify_answer`, ...) plus each trace's `mistakes`; the OpenR1 recipe
                   runs on it with --verifiers math_verify_answer
    stats.json     counts, the teacher's error rate as math_reward measures it, mistake kinds, token lengths
    manifest.json  the parameters and a sha256 per file, written last: its presence marks a finished output
The same parameters give byte-identical files. The output is built in a temporary directory and renamed into
place, so a reader (or a second rank building the same task) never sees half of one.
"""

import hashlib
import json
import os
import random
import re
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

from data.recipes.openr1 import select
from data.rewards import math_reward

FORMAT_VERSION = 1  # bump when the generated text changes, so that older outputs are rebuilt
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # pad, message start, EOS: special
THINK_TOKENS = ("<think>", "</think>")  # added but not special: decoding keeps them, like Qwen3's
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
VERIFIER = "math_verify_answer"  # the teacher rows' verifier field: math_reward against `answer`

NAMES = ("Ava", "Ben", "Mia", "Leo", "Zoe", "Sam", "Ivy", "Max", "Nia", "Omar", "Lena", "Raj")
STORIES = (  # the start, one phrase per operation (a few ways to say each), the question
    {
        "start": "{name} has {a} points in a game.",
        "+": ("{name} wins {b} points.", "Then {name} scores {b} more points."),
        "-": ("{name} loses {b} points.", "Then a penalty takes away {b} points."),
        "*": ("A bonus multiplies the score by {b}.", "Then the score is multiplied by {b}."),
        "question": "How many points does {name} have now?",
    },
    {
        "start": "{name}'s bank account holds {a} dollars.",
        "+": ("{name} deposits {b} dollars.", "Then {name} is paid {b} dollars."),
        "-": ("{name} spends {b} dollars.", "Then {name} withdraws {b} dollars."),
        "*": ("The balance is multiplied by {b}.", "Then the bank multiplies the balance by {b}."),
        "question": "What is the balance now, in dollars?",
    },
    {
        "start": "{name} thinks of the number {a}.",
        "+": ("{name} adds {b} to it.", "Then {name} increases it by {b}."),
        "-": ("{name} subtracts {b} from it.", "Then {name} takes {b} away from it."),
        "*": ("{name} multiplies it by {b}.", "Then {name} makes it {b} times as large."),
        "question": "What number does {name} have now?",
    },
)


@dataclass(frozen=True)
class TaskParams:
    """Everything the output depends on; the manifest records it. See PARAM_HELP for each field."""

    seed: int = 0
    n_train_problems: int = 20_000
    n_test_problems: int = 500
    samples_per_problem: int = 4
    error_rate: float = 0.35
    min_steps: int = 2
    max_steps: int = 3
    operand_min: int = 10
    operand_max: int = 99
    multiplier_max: int = 9
    max_value: int = 999
    ops: str = "+-*"
    vocab_size: int = 512

    def __post_init__(self):
        checks = {
            "n_train_problems": self.n_train_problems >= 1,
            "n_test_problems": self.n_test_problems >= 1,
            "samples_per_problem": self.samples_per_problem >= 1,
            "error_rate": 0.0 <= self.error_rate <= 1.0,
            "min_steps": 1 <= self.min_steps <= self.max_steps,
            "operand_min": 0 <= self.operand_min <= self.operand_max,
            "multiplier_max": self.multiplier_max >= 2,
            "max_value": self.max_value >= self.operand_max,
            "ops": bool(self.ops) and set(self.ops) <= set("+-*"),
            "vocab_size": 256 + len(SPECIAL_TOKENS) + len(THINK_TOKENS) <= self.vocab_size,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"TaskParams.{name} = {getattr(self, name)!r}: {PARAM_HELP[name]}")


PARAM_HELP = {
    "seed": "random seed: the same seed and parameters give byte-identical files",
    "n_train_problems": "training problems (each gets samples_per_problem teacher traces)",
    "n_test_problems": "held-out problems in test.jsonl, disjoint from training by text and by numbers",
    "samples_per_problem": "teacher traces per training problem",
    "error_rate": "probability in [0, 1] that a teacher trace has one mistake",
    "min_steps": "fewest operations per problem (>= 1, <= max_steps)",
    "max_steps": "most operations per problem",
    "operand_min": "smallest start value and +/- operand (>= 0)",
    "operand_max": "largest start value and +/- operand",
    "multiplier_max": "largest * operand (the smallest is 2)",
    "max_value": "every intermediate value of a problem stays within +-max_value (>= operand_max)",
    "ops": "operations to draw from, a string of + - *",
    "vocab_size": "tokenizer vocabulary size, special tokens included (>= 261: 256 bytes + 5 specials)",
}


@dataclass(frozen=True)
class WordProblem:
    id: str
    start: int
    steps: tuple[tuple[str, int], ...]  # (operation, operand) in order
    text: str

    @property
    def numbers(self) -> tuple[int, ...]:
        """(start, operand, operand, ...): two problems with the same numbers count as the same problem."""
        return (self.start, *(operand for _, operand in self.steps))

    @cached_property
    def values(self) -> list[int]:
        """The value after each step; the last is the answer."""
        values, value = [], self.start
        for op, operand in self.steps:
            value = apply(op, value, operand)
            values.append(value)
        return values

    @property
    def answer(self) -> int:
        return self.values[-1]

    @cached_property
    def mistake_options(self) -> list[dict[str, list[tuple[int, int]]]]:
        """Per step, the mistakes that can happen there (see mistakes_at), the steps before it being right."""
        before = [self.start, *self.values[:-1]]
        return [mistakes_at(op, a, b, self) for (op, b), a in zip(self.steps, before, strict=True)]


def apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def sample_problem(rng: random.Random, id_: str, params: TaskParams) -> WordProblem:
    """A start in [operand_min, operand_max], then min_steps..max_steps operations of `ops` with operands in
    [operand_min, operand_max] for + and -, in [2, multiplier_max] for *, drawn again until every
    intermediate value is within +-max_value; told as one of the STORIES."""
    while True:
        start = rng.randint(params.operand_min, params.operand_max)
        steps = []
        for _ in range(rng.randint(params.min_steps, params.max_steps)):
            op = rng.choice(params.ops)
            high = params.multiplier_max if op == "*" else params.operand_max
            steps.append((op, rng.randint(2 if op == "*" else params.operand_min, high)))
        story, name = rng.choice(STORIES), rng.choice(NAMES)
        sentences = [story["start"].format(name=name, a=start)]
        sentences += [rng.choice(story[op]).format(name=name, b=operand) for op, operand in steps]
        sentences.append(story["question"].format(name=name))
        problem = WordProblem(id=id_, start=start, steps=tuple(steps), text=" ".join(sentences))
        if all(abs(v) <= params.max_value for v in problem.values):
            return problem


def mistakes_at(op: str, a: int, b: int, problem: WordProblem) -> dict[str, list[tuple[int, int]]]:
    """The mistakes that can happen at step `a op b` of `problem`: kind -> the (operand written, result
    written) options. Every option's result differs from the right one."""
    right = apply(op, a, b)
    options = {}
    if a >= 0:  # the carry (or borrow) of the units column is forgotten
        if op == "+" and a % 10 + b % 10 >= 10:
            options["carry"] = [(b, right - 10)]
        elif op == "-" and a >= b and a % 10 < b % 10:
            options["carry"] = [(b, right + 10)]
        elif op == "*" and a >= 10 and (a % 10) * b >= 10:
            options["carry"] = [(b, right - 10 * ((a % 10) * b // 10))]
    if right < 0:  # the minus sign is dropped
        options["sign"] = [(b, -right)]
    # another number of the problem, of the same kind (a multiplier for *, else the start or a +/- operand)
    same_kind = [n for o, n in problem.steps if (o == "*") == (op == "*")]
    same_kind += [] if op == "*" else [problem.start]
    others = sorted({n for n in same_kind if n != b and apply(op, a, n) != right})
    if others:
        options["operand"] = [(n, apply(op, a, n)) for n in others]
    return options


def teacher_trace(problem: WordProblem, rng: random.Random, error_rate: float) -> tuple[str, dict | None]:
    """One trace of `problem`, and its mistake {"kind", "step"} or None. With probability error_rate the
    teacher picks a step where a mistake can happen (the rare problem with none gets a right trace), one of
    the mistakes possible there, and carries the wrong value on through the later steps."""
    options = problem.mistake_options
    possible = [i for i, at_step in enumerate(options) if at_step]
    mistake = None
    if rng.random() < error_rate and possible:
        step = rng.choice(possible)
        mistake = {"kind": rng.choice(sorted(options[step])), "step": step}
    lines, value = [], problem.start
    for i, (op, operand) in enumerate(problem.steps):
        written, result = operand, apply(op, value, operand)
        if mistake is not None and i == mistake["step"]:
            written, result = rng.choice(options[i][mistake["kind"]])
        lines.append(f"{value} {op} {written} = {result}")
        value = result
    return "<think>\n" + "\n".join(lines) + "\n</think>\nThe answer is \\boxed{" + str(value) + "}.", mistake


def sample_problems(params: TaskParams) -> tuple[list[WordProblem], list[WordProblem]]:
    """(training problems, held-out problems), all with distinct number tuples. The held-out set is drawn
    first, from its own stream, so it depends only on the seed, n_test_problems and the difficulty."""
    seen, splits = set(), {}
    for split, count in (("test", params.n_test_problems), ("train", params.n_train_problems)):
        rng, drawn, attempts = random.Random(f"nanoreason-synthetic:{params.seed}:{split}"), [], 0
        while len(drawn) < count:
            attempts += 1
            if attempts > 100 * count + 1000:
                raise ValueError(f"only {len(drawn)} distinct {split} problems in {attempts} draws: "
                                 "widen operand_min..operand_max, the steps or max_value")
            problem = sample_problem(rng, f"{split}-{len(drawn):06d}", params)
            if problem.numbers not in seen:
                seen.add(problem.numbers)
                drawn.append(problem)
        splits[split] = drawn
    return splits["train"], splits["test"]


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE on `texts`: every digit its own token, <think>/</think> whole tokens (added, not
    special, as in Qwen3), <|endoftext|> <|im_start|> <|im_end|> special. Deterministic for the same texts."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(THINK_TOKENS),
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tags = re.compile("|".join(re.escape(t) for t in (*SPECIAL_TOKENS, *THINK_TOKENS)))
    # the tags are whole tokens already: no merges spent on their pieces
    tokenizer.train_from_iterator([tags.sub("\n", text) for text in texts], trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return tokenizer


def tokenizer_config(tokenizer) -> dict:
    """tokenizer_config.json as transformers writes it for a Qwen-style ChatML tokenizer."""
    added = {}
    for token in (*SPECIAL_TOKENS, *THINK_TOKENS):
        added[str(tokenizer.token_to_id(token))] = {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": token in SPECIAL_TOKENS,
        }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 2048,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def chatml(problem: str, completion: str | None = None) -> str:
    """The CHAT_TEMPLATE's text for [user problem] + generation prompt, or + the assistant completion."""
    prompt = f"<|im_start|>user\n{problem}<|im_end|>\n<|im_start|>assistant\n"
    return prompt if completion is None else f"{prompt}{completion}<|im_end|>\n"


OUTPUT_FILES = {
    "tokenizer": "tokenizer", "sft": "sft.jsonl", "pairs": "pairs.jsonl", "rl": "rl.jsonl",
    "test": "test.jsonl", "teacher": "teacher.jsonl", "stats": "stats.json", "manifest": "manifest.json",
}


def build_task(out_dir: str | os.PathLike, **params) -> dict[str, Path]:
    """Generate the task into out_dir (see the module docstring) and return {name: path}. An out_dir that
    holds a finished output of the same parameters is reused as is; one of other parameters is replaced;
    a non-empty directory that is not a task output is an error. Parameters: the fields of TaskParams."""
    params = TaskParams(**params)
    out = Path(out_dir)
    paths = {name: out / file for name, file in OUTPUT_FILES.items()}
    if _finished(out, params):
        return paths
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").exists():
        raise FileExistsError(f"{out}: not empty and not a synthetic task output; choose another --out")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _generate(tmp, params)
        _install(tmp, out, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def teach(train: list[WordProblem], params: TaskParams) -> tuple[list[dict], list[dict], list[dict], dict]:
    """The teacher's traces of every training problem, judged by math_reward, as OpenR1-Math-Raw rows; the
    positives and pairs that data.recipes.openr1.select takes from them; and the counts."""
    rng = random.Random(f"nanoreason-synthetic:{params.seed}:teacher")
    counts, mistakes, rows, positives, pairs = Counter(), Counter(), [], [], []
    judged_wrong = mistaken_but_judged_right = clean_but_judged_wrong = 0
    for problem in train:
        traces = [teacher_trace(problem, rng, params.error_rate) for _ in range(params.samples_per_problem)]
        verdicts = [math_reward(trace, problem.answer) == 1.0 for trace, _ in traces]
        for (_, mistake), right in zip(traces, verdicts, strict=True):
            mistakes[mistake["kind"] if mistake else "none"] += 1
            judged_wrong += not right
            mistaken_but_judged_right += mistake is not None and right
            clean_but_judged_wrong += mistake is None and not right
        row = {
            "uuid": problem.id, "problem": problem.text, "answer": str(problem.answer),
            "problem_type": "Arithmetic", "question_type": "math-word-problem", "problem_is_valid": "Yes",
            "solution_is_valid": "Yes", "source": "synthetic", "synthetic": True,
            "generations": [trace for trace, _ in traces], "generations_count": len(traces),
            "correctness": {VERIFIER: verdicts}, "mistakes": [mistake for _, mistake in traces],
        }
        positive, pair = select(row, counts, verifiers=(VERIFIER,))
        rows.append(row)
        positives += [positive] if positive else []
        pairs += [pair] if pair else []
    n_traces = len(train) * params.samples_per_problem
    teacher = {
        "traces": n_traces,
        "error_rate_set": params.error_rate,
        "error_rate_measured": judged_wrong / n_traces,  # by math_reward, as the selection sees it
        "mistakes": dict(sorted(mistakes.items())),
        "mistaken_but_judged_correct": mistaken_but_judged_right,
        "clean_but_judged_incorrect": clean_but_judged_wrong,
    }
    return rows, positives, pairs, {"counts": dict(sorted(counts.items())), "teacher": teacher}


def _generate(out: Path, params: TaskParams) -> None:
    """Every output file into `out`, the manifest last."""
    train, test = sample_problems(params)
    rows, positives, pairs, stats = teach(train, params)
    # the first 2,000 problems' traces, in the chat template, hold every word the stories use: enough BPE text
    texts = [chatml(row["problem"], trace) for row in rows[:2000] for trace in row["generations"]]
    tokenizer = train_tokenizer(texts, params.vocab_size)
    (out / "tokenizer").mkdir(parents=True)
    tokenizer.save(str(out / "tokenizer" / "tokenizer.json"))
    _write_json(out / "tokenizer" / "tokenizer_config.json", tokenizer_config(tokenizer))
    _write_jsonl(out / "sft.jsonl", positives)
    _write_jsonl(out / "pairs.jsonl", pairs)
    _write_jsonl(out / "rl.jsonl", [{"id": p.id, "problem": p.text, "answer": str(p.answer)} for p in train])
    _write_jsonl(out / "test.jsonl", [{"id": p.id, "problem": p.text, "answer": str(p.answer)} for p in test])
    _write_jsonl(out / "teacher.jsonl", rows)

    examples = [(row["problem"], trace) for row in rows[:500] for trace in row["generations"]]
    sequences = [len(e.ids) for e in tokenizer.encode_batch([chatml(p, c) for p, c in examples])]
    completions = [len(e.ids) for e in tokenizer.encode_batch([c for _, c in examples])]
    stats = {
        "params": asdict(params),
        "problems": {"train": len(train), "test": len(test)},
        **stats,
        "tokens": {  # over the traces of the first 500 problems; in the chat template; completions bare
            "vocab_size": tokenizer.get_vocab_size(),
            "sequence_max": max(sequences),
            "sequence_mean": round(sum(sequences) / len(sequences), 1),
            "completion_max": max(completions),
            "completion_mean": round(sum(completions) / len(completions), 1),
        },
    }
    _write_json(out / "stats.json", stats)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    digests = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    _write_json(out / "manifest.json", {"format_version": FORMAT_VERSION, "params": asdict(params),
                                        "files": digests})


def _finished(out: Path, params: TaskParams) -> bool:
    """out holds a complete output (every file of its manifest, unchanged) of these parameters."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        return (manifest["format_version"] == FORMAT_VERSION and manifest["params"] == asdict(params)
                and all(hashlib.sha256((out / f).read_bytes()).hexdigest() == digest
                        for f, digest in manifest["files"].items()))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _install(tmp: Path, out: Path, params: TaskParams) -> None:
    """Rename the finished tmp into out. A stale output moves aside first; if another process installed the
    same output meanwhile, theirs stays."""
    if out.exists():
        if _finished(out, params):
            return
        stale = out.with_name(f".{out.name}.stale-{os.getpid()}")
        os.rename(out, stale)
        shutil.rmtree(stale)
    try:
        os.rename(tmp, out)
    except OSError:
        if not _finished(out, params):
            raise


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    from errors import DEBUG_HELP, ArgumentParser  # the command line only: data/ imports nothing above it

    parser = ArgumentParser(prog="python -m data.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (reused when already built alike)")
    for name, default in asdict(TaskParams()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default,
                            help=f"{PARAM_HELP[name]} (default: {default})")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = vars(parser.parse_args(argv))
    args.pop("debug")
    paths = build_task(args.pop("out"), **args)
    stats = json.loads(paths["stats"].read_text())
    print(json.dumps({"paths": {k: str(v) for k, v in paths.items()},
                      **{k: stats[k] for k in ("problems", "counts", "teacher", "tokens")}}, indent=2))


if __name__ == "__main__":
    # the entry points' one error report: top level, so only here (data/ itself imports nothing above it)
    from errors import run

    run(main, "python -m data.synthetic")
