"""math_reward / extract_boxed: the think and boxed rules, golds of every type, garbage in -> 0.0, timeouts in
the main thread, worker threads and worker processes, and the real MATH-500 gold solutions."""

import functools
import json
import multiprocessing
import os
import random
import signal
import string
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import BENCHMARKS, require

from data import rewards
from data.rewards import extract_boxed, math_reward

# sympy takes far longer than a second to compare these towers with 5; each test uses its own, so that the
# memoised verdict of one test cannot make another fast
SLOW = {name: "\\boxed{9^{9^{9^{" + exponent + "}}}}" for name, exponent in
        [("main", "9"), ("thread", "8"), ("stuck", "7"), ("process", "6")]}


def in_thread(fn, *args, **kwargs):
    """fn(*args, **kwargs) run in a fresh non-main thread; its result and how long it took."""
    out = {}

    def run():
        start = time.monotonic()
        try:
            out["result"] = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the test's thread
            out["error"] = e
        out["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["result"], out["seconds"]


# --- the rules -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, gold, expected", [
    ("\\boxed{5}", "5", 1.0),
    ("<think>so maybe \\boxed{3}</think>The answer is \\boxed{5}.", "5", 1.0),
    ("<think>so maybe \\boxed{3}</think>The answer is \\boxed{5}.", "3", 0.0),  # thinking's boxes don't count
    ("<think>it is \\boxed{5}", "5", 0.0),  # the thinking never closed: a truncated answer
    ("the template opened the thinking</think> \\boxed{5}", "5", 1.0),  # only the closing tag generated
    ("<think>a</think><think>b</think> \\boxed{5}", "5", 1.0),  # what follows the *last* </think>
    ("<think>a</think> \\boxed{5} <think>more", "5", 0.0),  # a new thinking left open
    ("first \\boxed{3}, finally \\boxed{5}", "5", 1.0),  # the last box is the answer
    ("first \\boxed{3}, finally \\boxed{5}", "3", 0.0),
    ("The answer is 5.", "5", 0.0),  # no box: no fallback extraction
    ("$5$", "5", 0.0),
    ("\\boxed{}", "5", 0.0),
    ("\\boxed{5", "5", 0.0),  # unbalanced: no answer
    ("\\fbox{5}", "5", 1.0),
    ("\\boxed {5}", "5", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),  # math-verify's equivalence
    ("\\boxed{\\dfrac12}", "\\frac{1}{2}", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{3}", 0.0),
    ("\\boxed{27}", 27.0, 1.0),  # AMC's float golds
    ("\\boxed{27}", 27, 1.0),
    ("\\boxed{2.5}", 2.5, 1.0),
    ("\\boxed{27}", 28.0, 0.0),
    ("\\boxed{$5$}", "$5$", 1.0),  # dollars on either side
    ("\\boxed{\\$18.90}", "\\$18.90", 1.0),  # an escaped dollar is content
    ("\\boxed{5}", ["3", "5"], 1.0),  # a list: any of these
    ("\\boxed{4}", ["3", "5"], 0.0),
    ("\\boxed{5}", ["$5$"], 1.0),  # OlympiadBench's final_answer
    ("\\boxed{(1,2)}", "(1, 2)", 1.0),
    ("\\boxed{-7}", "-7", 1.0),
    ("\\boxed{7}", "-7", 0.0),
])
def test_rules(completion, gold, expected):
    assert math_reward(completion, gold) == expected


def test_extract_boxed():
    assert extract_boxed("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{1} and \\boxed{2}") == "2"
    assert extract_boxed("\\boxed{1} and \\fbox{3}") == "3"
    assert extract_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"        # escaped braces are content
    assert extract_boxed("\\boxed{\\left\\{ x \\right.}") == "\\left\\{ x \\right."
    assert extract_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}") is None  # the last box never closes
    assert extract_boxed("\\boxed{}") == ""
    assert extract_boxed("no box") is None
    assert extract_boxed(None) is None
    assert extract_boxed(42) is None


@pytest.mark.parametrize("completion", [
    None, 5, 5.0, b"\\boxed{5}", ["\\boxed{5}"], {"text": "\\boxed{5}"}, "", "}{", "{{{{\\boxed{",
    "\\boxed{\\frac{", "\\boxed{\\boxed{\\boxed{}}}", "\\boxed{" + "(" * 50 + "}", "\\boxed{\x00\ud800}",
    "</think></think>", "<think>", "\\boxed{5}" * 2000,
])
@pytest.mark.parametrize("gold", ["5", 5, None, float("nan"), True, [], [None], {}, "", "$$", "\\frac{"])
def test_never_raises_on_garbage(completion, gold):
    assert math_reward(completion, gold, timeout_s=1) in (0.0, 1.0)


def test_garbage_golds_score_zero():
    for gold in (None, float("nan"), True, [], [None], {}, "", "  ", "$$", object()):
        assert math_reward("\\boxed{5}", gold) == 0.0
    assert math_reward("\\boxed{5}", [None, "5"]) == 1.0  # unusable items of a list are skipped


def test_never_raises_on_random_latex():
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + "\\{}[]()^_$&%#~.,;:+-*/=<> \n"
    pieces = ["\\boxed{", "\\frac", "\\sqrt", "</think>", "<think>", "\\left(", "\\right)", "\\begin{cases}"]
    for _ in range(100):
        text = "".join(rng.choice(pieces) if rng.random() < 0.2 else rng.choice(alphabet) for _ in range(60))
        assert math_reward(text + "\\boxed{" + text[-10:] + "}", text[:8], timeout_s=1) in (0.0, 1.0)


def test_huge_completion_is_fast():
    thinking = "<think>" + "we add 47 and 38 carefully. " * 400_000 + "</think>"  # ~11 MB
    start = time.monotonic()
    assert math_reward(thinking + "\\boxed{85}", "85") == 1.0
    assert math_reward(thinking + "\\boxed{" + "{" * 100_000, "85") == 0.0
    assert time.monotonic() - start < 5


def test_integer_shortcut_agrees_with_math_verify():
    rng = random.Random(0)
    cases = [("007", ("7",)), ("-0", ("0",)), ("0", ("-0",)), ("-7", ("7",)), ("$12$", ("12",)),
             ("123456789123456789", ("123456789123456789",)), ("10", ("010", "3")), ("10", ("3", "4"))]
    for _ in range(200):
        a = rng.randint(-2000, 2000)
        cases.append((str(a), (str(a + rng.choice([0, 0, 1, -10, 10, 2 * a])),)))
    for answer, golds in cases:
        shortcut = rewards._integer_verdict(answer, golds)
        assert shortcut is not None and shortcut == rewards._equivalent(answer, golds, 5), (answer, golds)
    assert rewards._integer_verdict("1.0", ("1",)) is None  # anything else goes to math-verify
    assert rewards._integer_verdict("1", ("1", "x")) is None


# --- time limits -----------------------------------------------------------------------------------------

def test_timeout_in_main_thread():
    start = time.monotonic()
    assert math_reward(SLOW["main"], "5", timeout_s=1) == 0.0
    seconds = time.monotonic() - start
    assert 0.9 < seconds < 1 * (1 + 5 * 1) + 0.5, seconds  # it did run into the limit, and the limit held


def test_worker_thread_is_verified_and_time_limited():
    def scenario():
        verdicts = [math_reward("\\boxed{\\frac{1}{2}}", "0.5"), math_reward("</think>\\boxed{3}", "1")]
        start = time.monotonic()
        verdicts.append(math_reward(SLOW["thread"], "5", timeout_s=1))
        return verdicts, time.monotonic() - start

    (verdicts, seconds), _ = in_thread(scenario)
    assert verdicts == [1.0, 0.0, 0.0]
    assert 0.9 < seconds < 1 * (1 + 5 * 1) + 1.0, seconds  # ran into math-verify's limit, in the helper
    completions = [f"\\boxed{{\\frac{{{i}}}{{2}}}}" for i in range(20)]  # not plain integers: math-verify
    with ThreadPoolExecutor(max_workers=2) as pool:
        from_threads = list(pool.map(math_reward, completions, ["3.5"] * 20))
    assert from_threads == [math_reward(c, "3.5") for c in completions] == [float(i == 7) for i in range(20)]


def test_stuck_helper_process_is_killed_and_replaced():
    def scenario():
        assert math_reward("\\boxed{\\frac{1}{2}}", "0.5") == 1.0  # starts this thread's helper
        helper = rewards._thread_local.verifier
        os.kill(helper.process.pid, signal.SIGSTOP)  # a helper that never answers
        start = time.monotonic()
        verdict = math_reward(SLOW["stuck"], "5", timeout_s=1)
        waited = time.monotonic() - start
        assert not helper.alive()
        after = math_reward("\\boxed{\\frac{3}{2}}", "1.5")
        return verdict, waited, after, rewards._thread_local.verifier is not helper

    (verdict, waited, after, replaced), _ = in_thread(scenario)
    assert verdict == 0.0 and waited < 1 * (1 + 5 * 1) + 1.0 + 1.0, waited
    assert after == 1.0 and replaced


def test_worker_process_uses_its_own_main_thread():
    completions = ["\\boxed{3}", "<think>x</think>\\boxed{\\frac{6}{2}}", "\\boxed{4}", SLOW["process"]]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        verdicts = pool.starmap(functools.partial(math_reward, timeout_s=1), [(c, "3") for c in completions])
    assert verdicts == [1.0, 1.0, 0.0, 0.0]


# --- real data -------------------------------------------------------------------------------------------

def math500():
    with open(require(BENCHMARKS / "math500.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_math500_gold_solutions_score_one():
    rows = math500()
    failures = [row["unique_id"] for row in rows if math_reward(row["solution"], row["answer"]) != 1.0]
    rate = 1 - len(failures) / len(rows)
    print(f"MATH-500 gold solutions: {rate:.4f} score 1.0; failures: {failures}")
    assert len(rows) == 500
    assert rate >= 0.98, f"rate {rate:.4f}, failures {failures}"


def test_math500_shuffled_pairs_score_zero():
    rows = math500()
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    others = order[1:] + order[:1]
    pairs = [(rows[i], rows[j]) for i, j in zip(order, others, strict=True)]  # each solution, another answer
    matches = [(s["unique_id"], a["answer"]) for s, a in pairs if math_reward(s["solution"], a["answer"])]
    print(f"MATH-500 shuffled pairs: {len(matches) / len(pairs):.4f} score 1.0: {matches}")
    assert len(matches) / len(pairs) < 0.02
    # the only matches allowed are coincidences: the other problem's answer is the same answer
    answers = {row["unique_id"]: row["answer"] for row in rows}
    assert all(math_reward(f"\\boxed{{{answers[uid]}}}", answer) == 1.0 for uid, answer in matches)
