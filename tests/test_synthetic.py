"""The embedded synthetic task: formats, determinism (across processes), reuse, the disjointness of the
training, validation and test problems, the teacher's ways (pick and failure rates per story, as set), the
consistency of its mistakes, trace_way, the tokenizer (transformers loads it), and the OpenR1 recipe
reproducing the task's own selection from teacher.jsonl."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from data import synthetic
from data.benchmarks import load_benchmark
from data.recipes.openr1 import build as openr1_build
from data.rewards import math_reward
from data.synthetic import PLANS, TaskParams, build_task, chatml, trace_way

SMALL = {"n_train_problems": 2000, "n_val_problems": 200, "n_test_problems": 300}  # 8,000 traces: ~a second
NUMBER = re.compile(r"-?\d+")
CAREFUL_LINE = re.compile(r"^(-?\d+)([-+])(\d+)=(-?\d+)$")
DIRECT_LINE = re.compile(r"^At a glance, it is (-?\d+)\.$")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return build_task(tmp_path_factory.mktemp("synthetic") / "task", **SMALL)


def test_formats(task):
    sft, pairs = read_jsonl(task["sft"]), read_jsonl(task["pairs"])
    rl, val, test = read_jsonl(task["rl"]), read_jsonl(task["val"]), read_jsonl(task["test"])
    teacher = read_jsonl(task["teacher"])
    stats = json.loads(task["stats"].read_text())
    assert len(rl) == len(teacher) == 2000 and len(val) == 200 and len(test) == 300
    assert stats["problems"] == {"train": 2000, "val": 200, "test": 300}
    assert stats["counts"]["positives"] == len(sft) and stats["counts"]["pairs"] == len(pairs)
    assert 0.95 * 2000 < len(sft) <= 2000 and 0.5 * 2000 < len(pairs) < 0.8 * 2000  # error rate ~0.26
    for row in sft:
        assert set(row) == {"id", "messages"}
        (user, assistant) = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert any(assistant["content"].startswith(f"<think>\n{plan}") for plan in PLANS.values())
        assert "\n</think>\nThe answer is \\boxed{" in assistant["content"]
    for row in pairs:
        assert set(row) == {"id", "prompt", "chosen", "rejected"} and row["chosen"] != row["rejected"]
    for row in rl + val + test:
        assert set(row) == {"id", "problem", "answer"} and NUMBER.fullmatch(row["answer"])
        assert 0 <= int(row["answer"]) <= 9
    for row in teacher:  # the OpenR1-Math-Raw columns the recipe reads, and the task's own
        assert row["problem_is_valid"] == "Yes" and row["source"] == "synthetic"
        verdicts = row["correctness"]["math_verify_answer"]
        assert len(row["generations"]) == len(verdicts) == len(row["mistakes"]) == len(row["ways"]) == 4
        assert 0 <= row["story"] < len(synthetic.STORIES) and 4 <= row["steps"] <= 5
    tokens = stats["tokens"]
    assert tokens["vocab_size"] <= 512 and tokens["sequence_max"] <= 128 and tokens["completion_max"] <= 64


def test_positives_and_pairs_follow_math_reward(task):
    """Correctness is math_reward on each trace; chosen = first correct, rejected = first incorrect."""
    sft = {row["id"]: row for row in read_jsonl(task["sft"])}
    pairs = {row["id"]: row for row in read_jsonl(task["pairs"])}
    for row in read_jsonl(task["teacher"]):
        verdicts = [math_reward(g, row["answer"]) == 1.0 for g in row["generations"]]
        assert verdicts == row["correctness"]["math_verify_answer"]
        correct = [g for g, ok in zip(row["generations"], verdicts, strict=True) if ok]
        wrong = [g for g, ok in zip(row["generations"], verdicts, strict=True) if not ok]
        assert (row["uuid"] in sft) == bool(correct)
        assert (row["uuid"] in pairs) == bool(correct and wrong)
        if correct:
            assert sft[row["uuid"]]["messages"][1]["content"] == correct[0]
        if correct and wrong:
            assert (pairs[row["uuid"]]["chosen"], pairs[row["uuid"]]["rejected"]) == (correct[0], wrong[0])


def test_teacher_ways_pick_and_fail_at_the_set_rates(task):
    """Per story the direct way is picked at its direct_rates entry; careful traces fail at
    careful_error_rate, direct ones at direct_error_rate (8,000 traces: a few standard deviations)."""
    params = TaskParams(**SMALL)
    rows = read_jsonl(task["teacher"])
    ways = [(row["story"], w, ok) for row in rows
            for w, ok in zip(row["ways"], row["correctness"]["math_verify_answer"], strict=True)]
    for story, rate in enumerate(params.direct_rate_per_story):
        picks = [w == "direct" for s, w, _ in ways if s == story]
        assert abs(sum(picks) / len(picks) - rate) < 0.05, (story, rate)
    for way, rate in (("careful", params.careful_error_rate), ("direct", params.direct_error_rate)):
        verdicts = [ok for _, w, ok in ways if w == way]
        assert abs(1 - sum(verdicts) / len(verdicts) - rate) < 0.03, way
    stats = json.loads(task["stats"].read_text())
    measured = 1 - sum(ok for *_, ok in ways) / len(ways)
    assert measured == pytest.approx(stats["teacher"]["error_rate_measured"])
    assert stats["teacher"]["ways"]["direct"]["count"] == sum(w == "direct" for _, w, _ in ways)
    teacher = stats["teacher"]
    assert teacher["mistaken_but_judged_correct"] == teacher["clean_but_judged_incorrect"] == 0
    # the negatives concentrate on the fragile way: most rejected traces are direct
    by_way = stats["selected"]["pairs_by_chosen_and_rejected_way"]
    rejected_direct = sum(n for k, n in by_way.items() if k.endswith(">direct"))
    assert rejected_direct > 0.75 * sum(by_way.values())


@pytest.mark.parametrize("error_rate", [0.0, 1.0])
def test_error_rate_extremes(tmp_path, error_rate):
    paths = build_task(tmp_path / "task", n_train_problems=200, n_val_problems=20, n_test_problems=20,
                       careful_error_rate=error_rate, direct_error_rate=error_rate)
    verdicts = [v for row in read_jsonl(paths["teacher"]) for v in row["correctness"]["math_verify_answer"]]
    if error_rate == 0.0:
        assert all(verdicts) and not read_jsonl(paths["pairs"])
    else:  # a slip is always possible here (a fact one off stays within 0..9)
        assert not any(verdicts) and not read_jsonl(paths["sft"])


def test_mistakes_are_consistent(task):
    """Every trace is its way's format: careful chains one line per change, direct states a total at once;
    the lines are right except the one mistake, whose kind is what the teacher says; the final answer
    follows from it, and only a mistaken trace is wrong."""
    kinds = set()
    train, _, _ = synthetic.sample_problems(TaskParams(**SMALL))
    for problem, row in zip(train, read_jsonl(task["teacher"]), strict=True):
        assert (problem.id, problem.text, str(problem.answer)) == (row["uuid"], row["problem"], row["answer"])
        assert list(map(int, NUMBER.findall(row["problem"]))) == list(problem.numbers)
        operands = [b for _, b in problem.steps]
        signed = [b if op == "+" else -b for op, b in problem.steps]
        for trace, way, mistake, right in zip(row["generations"], row["ways"], row["mistakes"],
                                              row["correctness"]["math_verify_answer"], strict=True):
            assert trace_way(trace) == way
            lines = trace.split("\n</think>")[0].removeprefix("<think>\n").split("\n")
            if way == "careful":
                assert lines.pop(0) == PLANS[way]
                steps = [CAREFUL_LINE.fullmatch(line).groups() for line in lines]
                assert len(steps) == len(operands)
                value = problem.start
                for i, (a, op, b, c) in enumerate(steps):
                    a, b, c = int(a), int(b), int(c)
                    assert a == value  # each step starts from the previous result
                    exact = a + b if op == "+" else a - b
                    assert op == problem.steps[i][0]
                    if mistake is None or i != mistake["step"]:
                        assert b == operands[i] and c == exact, (trace, mistake)
                    elif mistake["kind"] == "fact":
                        assert b == operands[i] and abs(c - exact) == 1
                    else:
                        assert mistake["kind"] == "operand" and b != operands[i] and b in operands
                        assert c == exact
                    value = c
            else:
                (line,) = lines
                value, exact = int(DIRECT_LINE.fullmatch(line).group(1)), problem.answer
                if mistake is None:
                    assert value == exact
                elif mistake["kind"] == "fact":
                    assert abs(value - exact) == 1
                elif mistake["kind"] == "dropped":
                    assert exact - value in signed
                else:
                    assert mistake["kind"] == "sign" and (exact - value) / 2 in signed
                assert 0 <= value <= 9
            assert trace.endswith(f"The answer is \\boxed{{{value}}}.")
            assert right == (value == problem.answer) == (mistake is None)
            kinds.add((way, mistake and mistake["kind"]))
    assert kinds == {("careful", None), ("careful", "fact"), ("careful", "operand"), ("direct", None),
                     ("direct", "fact"), ("direct", "dropped"), ("direct", "sign")}


def test_trace_way():
    assert trace_way("<think>\nStep by step.\n3+4=7\n</think>\nThe answer is \\boxed{7}.") == "careful"
    assert trace_way("At a glance, it is 5.\n</think>\nThe answer is \\boxed{5}.") == "direct"  # no <think>
    assert trace_way("<think>\n once.\n3+4=7\n</think>") == "other"
    assert trace_way("The answer is \\boxed{7}.") == "other"


def test_held_out_problems_never_in_training_files(task):
    """Training, validation and test problems share no text and no number tuple."""
    def numbers(texts):
        return {tuple(NUMBER.findall(text)) for text in texts}

    val, test = read_jsonl(task["val"]), read_jsonl(task["test"])
    val_texts, test_texts = {row["problem"] for row in val}, {row["problem"] for row in test}
    assert len(numbers(test_texts)) == len(test) and len(numbers(val_texts)) == len(val)
    train_texts = [row["problem"] for row in read_jsonl(task["rl"])]
    train_texts += [row["problem"] for row in read_jsonl(task["teacher"])]
    train_texts += [row["prompt"] for row in read_jsonl(task["pairs"])]
    train_texts += [row["messages"][0]["content"] for row in read_jsonl(task["sft"])]
    for held_out in (val_texts, test_texts):
        assert not held_out & set(train_texts)
        assert not numbers(held_out) & numbers(train_texts)
    assert not val_texts & test_texts and not numbers(val_texts) & numbers(test_texts)
    assert [p.answer for p in load_benchmark(task["test"])] == [row["answer"] for row in test]
    assert [p.answer for p in load_benchmark(task["val"])] == [row["answer"] for row in val]


def test_same_seed_same_bytes_across_processes(task, tmp_path):
    """A second build in another process (another hash seed) gives byte-identical files, the tokenizer's
    training included; another seed gives other problems."""
    command = [sys.executable, "-m", "data.synthetic", "--out", str(tmp_path / "again")]
    command += [arg for name, value in SMALL.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, env=env)
    manifest = json.loads(task["manifest"].read_text())
    assert set(manifest["files"]) >= {"tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
                                      "sft.jsonl", "pairs.jsonl", "rl.jsonl", "val.jsonl", "test.jsonl",
                                      "teacher.jsonl", "stats.json"}
    for name in [*manifest["files"], "manifest.json"]:
        assert (tmp_path / "again" / name).read_bytes() == (task["manifest"].parent / name).read_bytes(), name
    other = build_task(tmp_path / "other", seed=1, **SMALL)
    assert other["test"].read_bytes() != task["test"].read_bytes()


def test_reuse_rebuild_and_refuse(tmp_path):
    small = {"n_train_problems": 100, "n_val_problems": 10, "n_test_problems": 10}
    paths = build_task(tmp_path / "task", **small)
    stamp = paths["sft"].stat().st_mtime_ns
    assert build_task(tmp_path / "task", **small) == paths
    assert paths["sft"].stat().st_mtime_ns == stamp  # reused, not rewritten
    build_task(tmp_path / "task", direct_error_rate=0.7, **small)  # other parameters: rebuilt in place
    assert json.loads(paths["manifest"].read_text())["params"]["direct_error_rate"] == 0.7
    paths["rl"].write_text("damaged\n")  # a changed file means an unfinished output: rebuilt
    build_task(tmp_path / "task", direct_error_rate=0.7, **small)
    assert paths["rl"].read_text() != "damaged\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task"]  # no temporary directory left behind
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        build_task(tmp_path / "mine", **small)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_bad_parameters():
    with pytest.raises(ValueError, match="direct_error_rate"):
        TaskParams(direct_error_rate=1.5)
    with pytest.raises(ValueError, match="direct_rates"):
        TaskParams(direct_rates="0.5,0.5")
    with pytest.raises(ValueError, match="min_steps"):
        TaskParams(min_steps=5, max_steps=4)
    with pytest.raises(ValueError, match="ops"):
        TaskParams(ops="+/")
    with pytest.raises(ValueError, match="distinct"):  # one possible number tuple: (0, 1)
        synthetic.sample_problems(TaskParams(n_train_problems=50, start_max=0, operand_max=1, ops="+",
                                             min_steps=1, max_steps=1))
    with pytest.raises(TypeError):
        build_task("/nonexistent", n_problems=3)


def test_tokenizer_loads_in_transformers(task):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(task["tokenizer"])
    raw = Tokenizer.from_file(str(task["tokenizer"] / "tokenizer.json"))
    assert len(hf) == raw.get_vocab_size() <= 512
    assert (hf.eos_token, hf.pad_token) == ("<|im_end|>", "<|endoftext|>")
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert len(hf.encode(token, add_special_tokens=False)) == 1, token
    assert hf.convert_ids_to_tokens(hf.encode("7-5+3=5\n12", add_special_tokens=False)) == \
        ["7", "-", "5", "+", "3", "=", "5", "Ċ", "1", "2"]
    digits = "0123456789 -9876543210"
    pieces = hf.convert_ids_to_tokens(hf.encode(digits, add_special_tokens=False))
    assert [p for p in pieces if any(ch.isdigit() for ch in p)] == [ch for ch in digits if ch.isdigit()]
    row = read_jsonl(task["sft"])[0]
    text = hf.apply_chat_template(row["messages"], tokenize=False)
    assert text == chatml(row["messages"][0]["content"], row["messages"][1]["content"])
    prompt = hf.apply_chat_template(row["messages"][:1], tokenize=False, add_generation_prompt=True)
    assert prompt == chatml(row["messages"][0]["content"])
    ids = hf.encode(text, add_special_tokens=False)
    assert ids == raw.encode(text).ids
    decoded = hf.decode(ids, skip_special_tokens=True)  # the thinking's tags survive, the ChatML ones not
    assert "<think>" in decoded and "</think>" in decoded and "<|im_end|>" not in decoded


def test_tokenizer_matches_data_tokenizer(task):
    from transformers import AutoTokenizer

    from data.tokenizer import Tokenizer

    ours = Tokenizer.from_pretrained(task["tokenizer"])
    hf = AutoTokenizer.from_pretrained(task["tokenizer"])
    row = read_jsonl(task["sft"])[0]
    assert ours.apply_chat_template(row["messages"], tokenize=False) == hf.apply_chat_template(
        row["messages"], tokenize=False)
    assert ours.eos_id == hf.eos_token_id and ours.pad_id == hf.pad_token_id


def test_openr1_recipe_on_teacher_reproduces_the_selection(task, tmp_path):
    counts = openr1_build(task["teacher"], tmp_path, verifiers=("math_verify_answer",))
    assert counts == json.loads(task["stats"].read_text())["counts"]
    assert (tmp_path / "sft.jsonl").read_bytes() == task["sft"].read_bytes()
    assert (tmp_path / "pairs.jsonl").read_bytes() == task["pairs"].read_bytes()


def test_story_of_reads_every_problem_s_story(task):
    """The story of a problem, read back from its text: what the embedded reports break down per story."""
    teacher = read_jsonl(task["teacher"])
    assert [synthetic.story_of(row["problem"]) for row in teacher] == [row["story"] for row in teacher]
    assert {synthetic.story_of(p.problem) for p in load_benchmark(task["test"])} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="not a problem of the synthetic task"):
        synthetic.story_of("What is 2 + 2?")
