"""The embedded synthetic task: formats, determinism (across processes), reuse, held-out disjointness, the
teacher's error rate and the consistency of its mistakes, the tokenizer (transformers loads it), and the
OpenR1 recipe reproducing the task's own selection from teacher.jsonl."""

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
from data.synthetic import TaskParams, build_task, chatml

SMALL = {"n_train_problems": 2000, "n_test_problems": 300}  # 8,000 traces: about a second to build
NUMBER = re.compile(r"-?\d+")
LINE = re.compile(r"^(-?\d+) ([-+*]) (-?\d+) = (-?\d+)$")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return build_task(tmp_path_factory.mktemp("synthetic") / "task", **SMALL)


def test_formats(task):
    sft, pairs = read_jsonl(task["sft"]), read_jsonl(task["pairs"])
    rl, test, teacher = read_jsonl(task["rl"]), read_jsonl(task["test"]), read_jsonl(task["teacher"])
    stats = json.loads(task["stats"].read_text())
    assert len(rl) == len(teacher) == 2000 and len(test) == 300
    assert stats["counts"]["positives"] == len(sft) and stats["counts"]["pairs"] == len(pairs)
    assert 0.9 * 2000 < len(sft) <= 2000 and 0.6 * 2000 < len(pairs) < len(sft)  # 4 traces, error rate 0.35
    for row in sft:
        assert set(row) == {"id", "messages"}
        (user, assistant) = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"].startswith("<think>\n")
        assert "\n</think>\nThe answer is \\boxed{" in assistant["content"]
    for row in pairs:
        assert set(row) == {"id", "prompt", "chosen", "rejected"} and row["chosen"] != row["rejected"]
    for row in rl + test:
        assert set(row) == {"id", "problem", "answer"} and NUMBER.fullmatch(row["answer"])
    for row in teacher:  # the OpenR1-Math-Raw columns the recipe reads
        assert row["problem_is_valid"] == "Yes" and row["source"] == "synthetic"
        verdicts = row["correctness"]["math_verify_answer"]
        assert len(row["generations"]) == len(verdicts) == len(row["mistakes"]) == 4
    tokens = stats["tokens"]
    assert tokens["vocab_size"] <= 512 and tokens["sequence_max"] <= 150 and tokens["completion_mean"] >= 20


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


def test_teacher_error_rate_near_the_set_rate(task):
    verdicts = [v for row in read_jsonl(task["teacher"]) for v in row["correctness"]["math_verify_answer"]]
    measured = 1 - sum(verdicts) / len(verdicts)
    stats = json.loads(task["stats"].read_text())["teacher"]
    assert measured == pytest.approx(stats["error_rate_measured"])
    assert abs(measured - 0.35) < 0.03, measured  # 8,000 traces: one standard deviation is 0.005
    assert stats["mistaken_but_judged_correct"] == stats["clean_but_judged_incorrect"] == 0
    assert all(stats["mistakes"][kind] > 0.02 * stats["traces"] for kind in ("carry", "sign", "operand"))


@pytest.mark.parametrize("error_rate", [0.0, 1.0])
def test_error_rate_extremes(tmp_path, error_rate):
    paths = build_task(tmp_path / "task", n_train_problems=200, n_test_problems=20, error_rate=error_rate)
    verdicts = [v for row in read_jsonl(paths["teacher"]) for v in row["correctness"]["math_verify_answer"]]
    if error_rate == 0.0:
        assert all(verdicts) and not read_jsonl(paths["pairs"])
    else:  # only a problem where no mistake can happen keeps a correct trace
        assert sum(verdicts) / len(verdicts) < 0.02


def test_mistakes_are_consistent(task):
    """Every trace chains its steps; the steps are right except the one mistake, whose kind is what the
    teacher says; the final answer follows from the wrong step, and only a mistaken trace is wrong."""
    kinds = set()
    for row in read_jsonl(task["teacher"]):
        start, *operands = map(int, NUMBER.findall(row["problem"]))
        for trace, mistake, right in zip(row["generations"], row["mistakes"],
                                         row["correctness"]["math_verify_answer"], strict=True):
            lines = trace.split("\n</think>")[0].removeprefix("<think>\n").split("\n")
            steps = [LINE.fullmatch(line).groups() for line in lines]
            assert len(steps) == len(operands)
            value = start
            for i, (a, op, b, c) in enumerate(steps):
                a, b, c = int(a), int(b), int(c)
                assert a == value  # each step starts from the previous result
                exact = a + b if op == "+" else a - b if op == "-" else a * b
                if mistake is None or i != mistake["step"]:
                    assert b == operands[i] and c == exact, (trace, mistake)
                elif mistake["kind"] == "carry":
                    assert b == operands[i] and c != exact and (c - exact) % 10 == 0
                elif mistake["kind"] == "sign":
                    assert b == operands[i] and exact < 0 and c == -exact
                else:
                    assert mistake["kind"] == "operand" and b != operands[i] and b in [start, *operands]
                    assert c == exact
                value = c
            assert trace.endswith(f"The answer is \\boxed{{{value}}}.")
            assert right == (value == int(row["answer"])) == (mistake is None)
            kinds.add(mistake and mistake["kind"])
    assert kinds == {None, "carry", "sign", "operand"}


def test_held_out_problems_never_in_training_files(task):
    test = read_jsonl(task["test"])
    test_texts = {row["problem"] for row in test}
    test_numbers = {tuple(NUMBER.findall(text)) for text in test_texts}
    assert len(test_numbers) == len(test)  # distinct among themselves too
    train_texts = [row["problem"] for row in read_jsonl(task["rl"])]
    train_texts += [row["problem"] for row in read_jsonl(task["teacher"])]
    train_texts += [row["prompt"] for row in read_jsonl(task["pairs"])]
    train_texts += [row["messages"][0]["content"] for row in read_jsonl(task["sft"])]
    assert not test_texts & set(train_texts)
    assert not test_numbers & {tuple(NUMBER.findall(text)) for text in train_texts}
    assert [p.answer for p in load_benchmark(task["test"])] == [row["answer"] for row in test]


def test_same_seed_same_bytes_across_processes(task, tmp_path):
    """A second build in another process (another hash seed) gives byte-identical files, the tokenizer's
    training included; another seed gives other problems."""
    command = [sys.executable, "-m", "data.synthetic", "--out", str(tmp_path / "again"),
               "--n-train-problems", str(SMALL["n_train_problems"]),
               "--n-test-problems", str(SMALL["n_test_problems"])]
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, env=env)
    manifest = json.loads(task["manifest"].read_text())
    assert set(manifest["files"]) >= {"tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
                                      "sft.jsonl", "pairs.jsonl", "rl.jsonl", "test.jsonl", "teacher.jsonl",
                                      "stats.json"}
    for name in [*manifest["files"], "manifest.json"]:
        assert (tmp_path / "again" / name).read_bytes() == (task["manifest"].parent / name).read_bytes(), name
    other = build_task(tmp_path / "other", seed=1, **SMALL)
    assert other["test"].read_bytes() != task["test"].read_bytes()


def test_reuse_rebuild_and_refuse(tmp_path):
    small = {"n_train_problems": 100, "n_test_problems": 10}
    paths = build_task(tmp_path / "task", **small)
    stamp = paths["sft"].stat().st_mtime_ns
    assert build_task(tmp_path / "task", **small) == paths
    assert paths["sft"].stat().st_mtime_ns == stamp  # reused, not rewritten
    build_task(tmp_path / "task", error_rate=0.5, **small)  # other parameters: rebuilt in place
    assert json.loads(paths["manifest"].read_text())["params"]["error_rate"] == 0.5
    paths["rl"].write_text("damaged\n")  # a changed file means an unfinished output: rebuilt
    build_task(tmp_path / "task", error_rate=0.5, **small)
    assert paths["rl"].read_text() != "damaged\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task"]  # no temporary directory left behind
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        build_task(tmp_path / "mine", **small)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_bad_parameters():
    with pytest.raises(ValueError, match="error_rate"):
        TaskParams(error_rate=1.5)
    with pytest.raises(ValueError, match="min_steps"):
        TaskParams(min_steps=4, max_steps=3)
    with pytest.raises(ValueError, match="ops"):
        TaskParams(ops="+/")
    with pytest.raises(ValueError, match="distinct"):  # a space of 2 * 2 * 2 number tuples runs out
        synthetic.sample_problems(TaskParams(n_train_problems=50, operand_min=10, operand_max=11, ops="+",
                                             min_steps=2, max_steps=2))
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
    digits = "0123456789 -9876543210"
    assert hf.convert_ids_to_tokens(hf.encode("12 + 345 = 357", add_special_tokens=False)) == \
        ["1", "2", "Ġ+", "Ġ", "3", "4", "5", "Ġ=", "Ġ", "3", "5", "7"]
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
