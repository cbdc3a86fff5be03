"""The embedded default task: word problems with two ways to solve them, and a teacher whose wrong traces
concentrate on the fragile way.

    python -m data.synthetic --out data_out/synthetic      # a few seconds; a finished output is reused

A problem is a start value and 4-5 changes (+ or - a digit), told as one of four stories in which every
value stays within 0..9 (a lift's floor, a step of a ladder, eggs in a box, stickers):
    "A lift is on floor 6. It goes down 5. Then it rises 3. It goes up 1. Then it drops 3.
     Which floor is the lift on now?"                                                            answer: 2
The teacher solves it one of two ways, chosen at the start of its thinking (the plan):
    careful (one change a line)      direct (answering at a glance)
    <think>                          <think>
    Step by step.                    At a glance, it is 2.
    6-5=1                            </think>
    1+3=4                            The answer is \\boxed{2}.
    4+1=5
    5-3=2
    </think>
    The answer is \\boxed{2}.
Each careful line is one fact about two digits, which a tiny transformer learns to near perfection; the
direct way answers before writing any step, composing all the changes at once: fragile for the teacher (it
slips in `direct_error_rate` of its direct traces, and in `careful_error_rate` of its careful ones) and
intrinsically hard for a small student. How often the teacher picks the direct way depends on the story
(its habit: `direct_rates`, one per story), so a student's greedy choice of way differs from problem to
problem too. The teacher's slips:
    careful  fact     one line's result one off                       1+3=5      (carried on to the end)
             operand  another change of the problem used in a line    1+5=6
    direct   fact     the total one off                               it is 3
             dropped  one change left out of the total                it is 5   (the +3 left out)
             sign     one change counted with the wrong sign          it is 0   (+3 counted as -3)
(a direct slip's total stays within 0..9). The positives (first correct trace) therefore hold both ways,
each only where it happened to work, and the pairs' rejected traces are mostly direct: only the negatives
say that the direct way fails, and how often. `trace_way(completion)` reads a completion's way from its plan
line, so that a run can report how often a student picks each way and how often each way fails for it,
next to the teacher's rates (stats.json). Whether a trace is correct is decided by math_reward(trace,
answer), exactly as for real data, and the positives (first correct trace) and pairs (first correct, first
incorrect) are chosen from teacher rows in the OpenR1-Math-Raw schema by data.recipes.openr1.select, the
function the OpenR1 recipe uses. Natural subsets (e.g. a "higher-quality" SFT stage): the 5-change problems
(`steps`, harder), or the careful traces.

build_task(out_dir, ...) writes
    tokenizer/     byte-level BPE (tokenizers) trained on the training text: vocab <= 512, one token per
                   digit, <|endoftext|> (pad), <|im_start|>, <|im_end|> (EOS), <think>, </think>; a ChatML
                   chat template in tokenizer_config.json (transformers.AutoTokenizer loads it too)
    sft.jsonl      {"id", "messages": [user problem, assistant trace]}: the positives
    pairs.jsonl    {"id", "prompt", "chosen", "rejected"}
    rl.jsonl       {"id", "problem", "answer"}: every training problem
    val.jsonl      {"id", "problem", "answer"}: held-out problems for choosing settings (learning rates)
    test.jsonl     {"id", "problem", "answer"}: held-out problems for the reported numbers; no two of the
                   training, validation and test problems share a text or a number tuple (start, changes...);
                   data.benchmarks.load_benchmark reads both
    teacher.jsonl  every trace, one row per problem in the OpenR1-Math-Raw schema (`generations`,
                   `correctness.math_verify_answer`, ...) plus each trace's `ways` and `mistakes` and the
                   problem's `story` and `steps` (number of changes); the OpenR1 recipe runs on it with
                   --verifiers math_verify_answer
    stats.json     counts, the teacher's error rate as math_reward measures it, its pick and failure rate per
                   way (overall and per story), mistake kinds, the ways of the chosen and rejected traces,
                   token lengths
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

FORMAT_VERSION = 2  # bump when the generated text changes, so that older outputs are rebuilt
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # pad, message start, EOS: special
THINK_TOKENS = ("<think>", "</think>")  # added but not special: decoding keeps them, like Qwen3's
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
VERIFIER = "math_verify_answer"  # the teacher rows' verifier field: math_reward against `answer`

WAYS = ("careful", "direct")  # the ways to solve a problem, in the order stats list them
PLANS = {"careful": "Step by step.", "direct": "At a glance,"}  # how each way's thinking begins
NAMES = ("Ava", "Ben", "Mia", "Leo", "Zoe", "Sam", "Ivy", "Max", "Nia", "Omar", "Lena", "Raj")
STORIES = (  # a name; the start, phrases for + and - (one drawn per change), the question: values in 0..9
    {
        "name": "lift",
        "start": "A lift is on floor {a}.",
        "+": ("It goes up {b}.", "Then it rises {b}."),
        "-": ("It goes down {b}.", "Then it drops {b}."),
        "question": "Which floor is the lift on now?",
    },
    {
        "name": "ladder",
        "start": "{name} stands on step {a} of a ladder.",
        "+": ("{name} climbs up {b}.", "Then {name} goes up {b}."),
        "-": ("{name} slips down {b}.", "Then {name} goes down {b}."),
        "question": "Which step is {name} on now?",
    },
    {
        "name": "eggs",
        "start": "A box holds {a} eggs.",
        "+": ("{name} puts in {b}.", "Then {name} adds {b}."),
        "-": ("{name} takes out {b}.", "Then {name} uses {b}."),
        "question": "How many eggs are in the box now?",
    },
    {
        "name": "stickers",
        "start": "{name} has {a} stickers.",
        "+": ("{name} gets {b} more.", "Then a friend gives {name} {b}."),
        "-": ("{name} gives away {b}.", "Then {name} loses {b}."),
        "question": "How many stickers does {name} have now?",
    },
)


@dataclass(frozen=True)
class TaskParams:
    """Everything the output depends on; the manifest records it. See PARAM_HELP for each field."""

    seed: int = 0
    n_train_problems: int = 20_000
    n_val_problems: int = 1_000
    n_test_problems: int = 2_000
    samples_per_problem: int = 4
    direct_rates: str = "0.9,0.6,0.3,0.1"
    careful_error_rate: float = 0.05
    direct_error_rate: float = 0.5
    min_steps: int = 4
    max_steps: int = 5
    start_min: int = 0
    start_max: int = 9
    operand_min: int = 1
    operand_max: int = 9
    min_value: int = 0
    max_value: int = 9
    ops: str = "+-"
    vocab_size: int = 512

    @property
    def direct_rate_per_story(self) -> tuple[float, ...]:
        return tuple(float(r) for r in self.direct_rates.split(","))

    def __post_init__(self):
        try:
            rates = self.direct_rate_per_story
        except ValueError:
            rates = ()
        checks = {
            "n_train_problems": self.n_train_problems >= 1,
            "n_val_problems": self.n_val_problems >= 1,
            "n_test_problems": self.n_test_problems >= 1,
            "samples_per_problem": self.samples_per_problem >= 1,
            "direct_rates": len(rates) == len(STORIES) and all(0.0 <= r <= 1.0 for r in rates),
            "careful_error_rate": 0.0 <= self.careful_error_rate <= 1.0,
            "direct_error_rate": 0.0 <= self.direct_error_rate <= 1.0,
            "min_steps": 1 <= self.min_steps <= self.max_steps,
            "start_min": 0 <= self.start_min <= self.start_max,
            "operand_min": 1 <= self.operand_min <= self.operand_max,
            "min_value": 0 <= self.min_value <= self.start_min and self.start_max <= self.max_value,
            "ops": bool(self.ops) and set(self.ops) <= set("+-"),
            "vocab_size": 256 + len(SPECIAL_TOKENS) + len(THINK_TOKENS) <= self.vocab_size,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"TaskParams.{name} = {getattr(self, name)!r}: {PARAM_HELP[name]}")


PARAM_HELP = {
    "seed": "random seed: the same seed and parameters give byte-identical files",
    "n_train_problems": "training problems (each gets samples_per_problem teacher traces)",
    "n_val_problems": "held-out problems in val.jsonl (for choosing settings), disjoint from train and test",
    "n_test_problems": "held-out problems in test.jsonl, disjoint from training and validation",
    "samples_per_problem": "teacher traces per training problem",
    "direct_rates": f"the teacher's probability of the direct way, per story: {len(STORIES)} numbers in "
                    "[0, 1], comma-separated",
    "careful_error_rate": "probability in [0, 1] that a careful (step-by-step) teacher trace has one mistake",
    "direct_error_rate": "probability in [0, 1] that a direct (at a glance) teacher trace has one mistake",
    "min_steps": "fewest changes per problem (>= 1, <= max_steps)",
    "max_steps": "most changes per problem",
    "start_min": "smallest start value (>= 0)",
    "start_max": "largest start value",
    "operand_min": "smallest change (>= 1)",
    "operand_max": "largest change",
    "min_value": "every value of a problem (start, after each change) is >= min_value (<= start_min)",
    "max_value": "every value of a problem is <= max_value (>= start_max)",
    "ops": "operations to draw from, a string of + -",
    "vocab_size": "tokenizer vocabulary size, special tokens included (>= 261: 256 bytes + 5 specials)",
}


@dataclass(frozen=True)
class WordProblem:
    id: str
    story: int  # index into STORIES
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


def apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b


def signed(op: str, b: int) -> int:
    return b if op == "+" else -b


def sample_problem(rng: random.Random, id_: str, params: TaskParams) -> WordProblem:
    """A start in [start_min, start_max], then min_steps..max_steps changes, each drawn uniformly from the
    (op of `ops`, operand in [operand_min, operand_max]) that keep the value within [min_value, max_value];
    told as one of the STORIES with one of the NAMES."""
    start, steps = rng.randint(params.start_min, params.start_max), []
    value = start
    for _ in range(rng.randint(params.min_steps, params.max_steps)):
        options = [(op, b) for op in params.ops for b in range(params.operand_min, params.operand_max + 1)
                   if params.min_value <= apply(op, value, b) <= params.max_value]
        if not options:
            raise ValueError(f"no change keeps {value} within [{params.min_value}, {params.max_value}]: "
                             "widen the value range or the operands")
        op, b = rng.choice(options)
        steps.append((op, b))
        value = apply(op, value, b)
    story_index, name = rng.randrange(len(STORIES)), rng.choice(NAMES)
    story = STORIES[story_index]
    sentences = [story["start"].format(name=name, a=start)]
    sentences += [rng.choice(story[op]).format(name=name, b=operand) for op, operand in steps]
    sentences.append(story["question"].format(name=name))
    return WordProblem(id=id_, story=story_index, start=start, steps=tuple(steps), text=" ".join(sentences))


def careful_mistakes(problem: WordProblem, params: TaskParams) -> dict[int, dict[str, list[tuple[int, int]]]]:
    """The slips possible in a careful trace, the steps before it being right: step -> kind -> the (operand
    written, result written) options, each result within [min_value, max_value] and not the right one.
    fact: the result one off (a misremembered fact); operand: another change of the problem used."""
    options, before = {}, [problem.start, *problem.values[:-1]]
    for i, ((op, b), a) in enumerate(zip(problem.steps, before, strict=True)):
        right, kinds = apply(op, a, b), {}
        kinds["fact"] = [(b, r) for r in (right - 1, right + 1) if params.min_value <= r <= params.max_value]
        kinds["operand"] = [(n, apply(op, a, n)) for n in sorted({n for _, n in problem.steps if n != b})
                            if params.min_value <= apply(op, a, n) <= params.max_value]
        options[i] = {kind: found for kind, found in kinds.items() if found}
    return {i: kinds for i, kinds in options.items() if kinds}


def direct_mistakes(problem: WordProblem, params: TaskParams) -> dict[str, list[int]]:
    """The slips possible in a direct trace: kind -> the totals written, each within [min_value, max_value]
    and not the answer. fact: the total one off; dropped: one change left out; sign: one change counted
    with the opposite sign."""
    right = problem.answer
    changes = sorted({signed(op, b) for op, b in problem.steps})
    kinds = {"fact": [right - 1, right + 1], "dropped": [right - c for c in changes],
             "sign": [right - 2 * c for c in changes]}
    kinds = {k: sorted({t for t in totals if params.min_value <= t <= params.max_value and t != right})
             for k, totals in kinds.items()}
    return {k: totals for k, totals in kinds.items() if totals}


def teacher_trace(problem: WordProblem, rng: random.Random,
                  params: TaskParams) -> tuple[str, str, dict | None]:
    """One trace of `problem`: (text, way, mistake {"kind", "step"} or None). The way is direct with the
    story's probability (direct_rates), else careful; then, with the way's error rate, one slip: a kind
    drawn uniformly among those possible (at a step drawn uniformly, for careful), then one of its options;
    a careful slip is carried on through the later steps."""
    way = "direct" if rng.random() < params.direct_rate_per_story[problem.story] else "careful"
    lines, mistake = [PLANS[way]], None
    slip = rng.random() < (params.direct_error_rate if way == "direct" else params.careful_error_rate)
    if way == "direct":
        value, options = problem.answer, direct_mistakes(problem, params)
        if slip and options:
            kind = rng.choice(sorted(options))
            value, mistake = rng.choice(options[kind]), {"kind": kind, "step": 0}
        lines = [f"{PLANS[way]} it is {value}."]
    else:
        options, at = careful_mistakes(problem, params), None
        if slip and options:
            step = rng.choice(sorted(options))
            kind = rng.choice(sorted(options[step]))
            at, mistake = (step, rng.choice(options[step][kind])), {"kind": kind, "step": step}
        value = problem.start
        for i, (op, b) in enumerate(problem.steps):
            written, result = b, apply(op, value, b)
            if at is not None and i == at[0]:
                written, result = at[1]
            lines.append(f"{value}{op}{written}={result}")
            value = result
    text = "<think>\n" + "\n".join(lines) + "\n</think>\nThe answer is \\boxed{" + str(value) + "}."
    return text, way, mistake


def trace_way(completion: str) -> str:
    """The way of a completion ("careful", "direct"), read from its plan, how its thinking begins
    ("<think>" may be absent, as when the prompt ended with it); "other" when it begins with no known plan."""
    text = completion.lstrip().removeprefix("<think>").lstrip()
    return next((way for way, plan in PLANS.items() if text.startswith(plan)), "other")


def story_of(problem: str) -> int:
    """The index into STORIES of a problem's story, read from its question (the text's last sentence)."""
    for index, story in enumerate(STORIES):
        question = re.escape(story["question"]).replace(re.escape("{name}"), r"\w+")
        if re.search(question + "$", problem):
            return index
    raise ValueError(f"not a problem of the synthetic task (no story's question ends it): {problem!r}")


def sample_problems(params: TaskParams) -> tuple[list[WordProblem], list[WordProblem], list[WordProblem]]:
    """(training, validation, test problems), all with distinct number tuples. The test set is drawn first,
    then the validation set, each from its own stream, so the test set depends only on the seed,
    n_test_problems and the difficulty, and the validation set on those and n_val_problems."""
    seen, splits = set(), {}
    counts = (("test", params.n_test_problems), ("val", params.n_val_problems),
              ("train", params.n_train_problems))
    for split, count in counts:
        rng, drawn, attempts = random.Random(f"nanoreason-synthetic:{params.seed}:{split}"), [], 0
        while len(drawn) < count:
            attempts += 1
            if attempts > 100 * count + 1000:
                raise ValueError(f"only {len(drawn)} distinct {split} problems in {attempts} draws: "
                                 "widen the start or operand range, the steps or the value range")
            problem = sample_problem(rng, f"{split}-{len(drawn):06d}", params)
            if problem.numbers not in seen:
                seen.add(problem.numbers)
                drawn.append(problem)
        splits[split] = drawn
    return splits["train"], splits["val"], splits["test"]


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
    "val": "val.jsonl", "test": "test.jsonl", "teacher": "teacher.jsonl", "stats": "stats.json",
    "manifest": "manifest.json",
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


def way_table(ways: list[str], right: list[bool]) -> dict[str, dict]:
    """Per way of WAYS (and "other" when present): how many of `ways`, the share picked and the share of
    those that are wrong."""
    table = {}
    for way in (*WAYS, "other"):
        picked = [ok for w, ok in zip(ways, right, strict=True) if w == way]
        if picked or way != "other":
            table[way] = {"count": len(picked), "pick_rate": round(len(picked) / max(len(ways), 1), 4),
                          "failure_rate": round(1 - sum(picked) / len(picked), 4) if picked else None}
    return table


def teach(train: list[WordProblem], params: TaskParams) -> tuple[list[dict], list[dict], list[dict], dict]:
    """The teacher's traces of every training problem, judged by math_reward, as OpenR1-Math-Raw rows; the
    positives and pairs that data.recipes.openr1.select takes from them; and the counts."""
    rng = random.Random(f"nanoreason-synthetic:{params.seed}:teacher")
    counts, mistakes, rows, positives, pairs = Counter(), Counter(), [], [], []
    judged_wrong = mistaken_but_judged_right = clean_but_judged_wrong = 0
    all_ways, all_right, per_story = [], [], {s: ([], []) for s in range(len(STORIES))}
    chosen_ways, pair_ways = Counter(), Counter()
    for problem in train:
        traces = [teacher_trace(problem, rng, params) for _ in range(params.samples_per_problem)]
        verdicts = [math_reward(trace, problem.answer) == 1.0 for trace, _, _ in traces]
        for (_, way, mistake), right in zip(traces, verdicts, strict=True):
            mistakes[f"{way}:{mistake['kind']}" if mistake else f"{way}:none"] += 1
            judged_wrong += not right
            mistaken_but_judged_right += mistake is not None and right
            clean_but_judged_wrong += mistake is None and not right
            all_ways.append(way)
            all_right.append(right)
            per_story[problem.story][0].append(way)
            per_story[problem.story][1].append(right)
        row = {
            "uuid": problem.id, "problem": problem.text, "answer": str(problem.answer),
            "problem_type": "Arithmetic", "question_type": "math-word-problem", "problem_is_valid": "Yes",
            "solution_is_valid": "Yes", "source": "synthetic", "synthetic": True,
            "generations": [trace for trace, _, _ in traces], "generations_count": len(traces),
            "correctness": {VERIFIER: verdicts}, "ways": [way for _, way, _ in traces],
            "mistakes": [mistake for _, _, mistake in traces], "story": problem.story,
            "steps": len(problem.steps),
        }
        positive, pair = select(row, counts, verifiers=(VERIFIER,))
        rows.append(row)
        if positive:
            positives.append(positive)
            chosen_ways[trace_way(positive["messages"][1]["content"])] += 1
        if pair:
            pairs.append(pair)
            pair_ways[f"{trace_way(pair['chosen'])}>{trace_way(pair['rejected'])}"] += 1
    n_traces = len(train) * params.samples_per_problem
    teacher = {
        "traces": n_traces,
        "error_rate_measured": judged_wrong / n_traces,  # by math_reward, as the selection sees it
        "ways": way_table(all_ways, all_right),
        "ways_per_story": {str(s): way_table(*per_story[s]) for s in per_story},
        "mistakes": dict(sorted(mistakes.items())),
        "mistaken_but_judged_correct": mistaken_but_judged_right,
        "clean_but_judged_incorrect": clean_but_judged_wrong,
    }
    selected = {"positives_by_way": dict(sorted(chosen_ways.items())),
                "pairs_by_chosen_and_rejected_way": dict(sorted(pair_ways.items()))}
    return rows, positives, pairs, {"counts": dict(sorted(counts.items())), "teacher": teacher,
                                    "selected": selected}


def _problem_records(problems: list[WordProblem]) -> list[dict]:
    return [{"id": p.id, "problem": p.text, "answer": str(p.answer)} for p in problems]


def _generate(out: Path, params: TaskParams) -> None:
    """Every output file into `out`, the manifest last."""
    train, val, test = sample_problems(params)
    rows, positives, pairs, stats = teach(train, params)
    # the first 2,000 problems' traces, in the chat template, hold every word the stories use: enough BPE text
    texts = [chatml(row["problem"], trace) for row in rows[:2000] for trace in row["generations"]]
    tokenizer = train_tokenizer(texts, params.vocab_size)
    (out / "tokenizer").mkdir(parents=True)
    tokenizer.save(str(out / "tokenizer" / "tokenizer.json"))
    _write_json(out / "tokenizer" / "tokenizer_config.json", tokenizer_config(tokenizer))
    _write_jsonl(out / "sft.jsonl", positives)
    _write_jsonl(out / "pairs.jsonl", pairs)
    _write_jsonl(out / "rl.jsonl", _problem_records(train))
    _write_jsonl(out / "val.jsonl", _problem_records(val))
    _write_jsonl(out / "test.jsonl", _problem_records(test))
    _write_jsonl(out / "teacher.jsonl", rows)

    examples = [(row["problem"], trace) for row in rows[:500] for trace in row["generations"]]
    sequences = [len(e.ids) for e in tokenizer.encode_batch([chatml(p, c) for p, c in examples])]
    completions = [len(e.ids) for e in tokenizer.encode_batch([c for _, c in examples])]
    stats = {
        "params": asdict(params),
        "problems": {"train": len(train), "val": len(val), "test": len(test)},
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
