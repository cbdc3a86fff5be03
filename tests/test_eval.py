"""eval.py: the metrics against brute force / hand computation, and the command end to end on a tiny model
whose completions are "\\boxed{2}" or "\\boxed{3}" at random (so graded right and wrong), with a tiny BPE
tokenizer: JSON output, resume skipping done problems, config mismatch, --pairs-out, evaluate() from code."""

import itertools
import json
import statistics

import pytest
from conftest import cli_error
from test_generate import chain_model

import eval as evaluation
from data.benchmarks import Problem
from data.synthetic import tokenizer_config, train_tokenizer
from data.tokenizer import Tokenizer
from eval import ProblemResult, benchmark_metrics, majority_vote, overall_metrics, pass_at_k, preference_pairs


def test_pass_at_k_is_the_mean_over_k_subsets():
    for n in range(1, 7):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_majority_vote():
    completions = ["so \\boxed{ 3 }", "<think>\\boxed{2}</think> hence \\boxed{3}", "\\boxed{2}",
                   "\\boxed{2}", "no answer", "<think> \\boxed{2} unfinished"]
    rewards = [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    # "3" twice (spaces ignored, after </think>), "2" twice, the unfinished think no vote: first seen wins
    assert majority_vote(completions, rewards) == 0.0
    assert majority_vote(completions + ["\\boxed{2}"], rewards + [1.0]) == 1.0
    assert majority_vote(["nothing", "<think>\\boxed{2}"], [0.0, 0.0]) == 0.0


def test_benchmark_metrics_by_hand():
    rewards = [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]]
    problems = [ProblemResult(str(i), "p", "2", ["\\boxed{2}" if r else "\\boxed{3}" for r in rs],
                              [float(r) for r in rs]) for i, rs in enumerate(rewards)]
    m = benchmark_metrics(problems)
    per_problem = [0.5, 0.0, 0.75]
    assert m["pass@1"] == pytest.approx(statistics.mean(per_problem))
    assert m["pass@1_stderr"] == pytest.approx(statistics.stdev(per_problem) / 3**0.5)
    assert m["maj@n"] == pytest.approx(2 / 3)  # a 2-2 tie to the first seen ("2", right), all "3", 3 of "2"
    assert set(m["pass@k"]) == {"1", "2", "4"}
    assert m["pass@k"]["1"] == pytest.approx(m["pass@1"])
    assert m["pass@k"]["4"] == pytest.approx(2 / 3)
    assert m["pass@k"]["2"] == pytest.approx((pass_at_k(4, 2, 2) + 0 + pass_at_k(4, 3, 2)) / 3)
    overall = overall_metrics([m, {**m, "pass@1": 0.0, "pass@1_stderr": 0.1}])
    assert overall["pass@1"] == pytest.approx(m["pass@1"] / 2)
    assert overall["pass@1_stderr"] == pytest.approx((m["pass@1_stderr"] ** 2 + 0.01) ** 0.5 / 2)


def test_preference_pairs_take_first_correct_and_first_incorrect():
    results = [
        ProblemResult("a", "What?", "2", ["w1", "r1", "w2", "r2"], [0.0, 1.0, 0.0, 1.0]),
        ProblemResult("b", "All right", "2", ["r1", "r2"], [1.0, 1.0]),
        ProblemResult("c", "All wrong", "2", ["w1", "w2"], [0.0, 0.0]),
    ]
    assert preference_pairs(results, "Box it.") == [
        {"id": "a", "prompt": "What?\nBox it.", "chosen": "r1", "rejected": "w1"}
    ]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A checkpoint directory (random chain model + tokenizer) and a 3-problem JSONL whose answers are 2."""
    root = tmp_path_factory.mktemp("eval")
    model_dir = root / "model"
    model_dir.mkdir()
    texts = ["What is 1 + 1? Think. \\boxed{2} or \\boxed{3}. <think>\n4 - 2 = 2\n</think>"] * 4
    backend = train_tokenizer(texts, 300)
    backend.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(backend)))
    tok = Tokenizer.from_pretrained(model_dir)
    problems = ["What is 1 + 1?", "What is 4 - 2?", "What is 0 + 2?"]
    rows = [{"id": f"q{i}", "problem": p, "answer": "2"} for i, p in enumerate(problems)]
    (root / "problems.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    # the prompt's last token -> "\boxed{" -> "2" | "3" -> "}" -> EOS
    start = tok.encode_prompt([{"role": "user", "content": problems[0]}])[-1]
    boxed, two, three, close = tok.encode("\\boxed{"), tok.encode("2"), tok.encode("3"), tok.encode("}")
    assert len(two) == len(three) == len(close) == 1
    chain = [start, *boxed]
    transitions = {a: [b] for a, b in zip(chain, chain[1:], strict=False)}
    transitions |= {boxed[-1]: [two[0], three[0]], two[0]: close, three[0]: close, close[0]: [tok.eos_id]}
    assert len(transitions) == len(chain) + 3  # every state its own token
    chain_model(tok.vocab_size, transitions).save_pretrained(model_dir)
    return model_dir, root / "problems.jsonl", tok


def run(task, out, *extra):
    model_dir, problems, _ = task
    return evaluation.main(["--model", str(model_dir), "--benchmark", str(problems), "--n", "8",
                            "--temperature", "1.0", "--top-p", "1.0", "--max-new-tokens", "12",
                            "--batch-size", "16", "--out", str(out), "--no-progress", *extra])


def test_eval_end_to_end_resume_and_pairs(task, tmp_path, capsys):
    out, pairs_out = tmp_path / "results.json", tmp_path / "pairs.jsonl"
    run(task, out, "--limit", "2")
    first = json.loads(out.read_text())
    (name, bench), = first["benchmarks"].items()
    assert [p["id"] for p in bench["problems"]] == ["q0", "q1"]
    for p in bench["problems"]:
        assert len(p["completions"]) == 8 and set(p["completions"]) <= {"\\boxed{2}", "\\boxed{3}"}
        assert p["rewards"] == [float(c == "\\boxed{2}") for c in p["completions"]]
    rewards = [r for p in bench["problems"] for r in p["rewards"]]
    assert bench["pass@1"] == pytest.approx(sum(rewards) / len(rewards))
    assert 0 < bench["pass@1"] < 1
    assert first["overall"]["pass@1"] == pytest.approx(bench["pass@1"])
    assert "| " + name + " | 2 |" in capsys.readouterr().out

    # resume: the two done problems are kept as they are, only q2 is sampled; then the pairs
    run(task, out, "--pairs-out", str(pairs_out))
    assert "3 problems, 2 already in" in capsys.readouterr().err
    second = json.loads(out.read_text())
    problems = second["benchmarks"][name]["problems"]
    assert [p["id"] for p in problems] == ["q0", "q1", "q2"]
    assert problems[:2] == bench["problems"]
    pairs = [json.loads(line) for line in pairs_out.read_text().splitlines()]
    with_both = [p for p in problems if 0 < sum(p["rewards"]) < 8]
    assert [p["id"] for p in pairs] == [p["id"] for p in with_both] and pairs
    for pair in pairs:
        assert pair["chosen"] == "\\boxed{2}" and pair["rejected"] == "\\boxed{3}"
        assert pair["prompt"] in {"What is 1 + 1?", "What is 4 - 2?", "What is 0 + 2?"}

    with pytest.raises(ValueError, match="differing"):  # errors.UserError: eval.py: ... exit 2
        run(task, out, "--seed", "1")


def test_bad_input_is_one_line_naming_file_line_field_or_flag(task, tmp_path, capsys):
    """Each of these once printed a traceback (ZeroDivisionError for --n 0)."""
    model_dir, problems, _ = task

    def error(*argv: str, benchmark=problems, model=model_dir) -> str:
        return cli_error(evaluation.main, "eval.py", ["--model", str(model), "--benchmark", str(benchmark),
                                                      "--out", str(tmp_path / "out.json"), "--no-progress",
                                                      "--max-new-tokens", "4", *argv], capsys)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1 + 1?", "answer": "2"}\n{"problem": "1 + 2?"}\n')
    assert error(benchmark=bad).startswith(f"eval.py: {bad}:2: no answer field")
    bad.write_text('{"problem": "1 + 1?", "answer": "2"\n')
    assert error(benchmark=bad).startswith(f"eval.py: {bad}:1: not valid JSON")
    bad.write_bytes(b'{"problem": "caf\xe9?", "answer": "2"}\n')
    assert error(benchmark=bad) == f"eval.py: {bad}:1: not UTF-8 text (byte 0xe9 at column 17)"
    bad.write_text("")
    assert error(benchmark=bad) == f"eval.py: {bad}: no problems in the file"
    assert "not a benchmark name" in error(benchmark=tmp_path / "missing.jsonl")
    assert error("--n", "0") == "eval.py: --n 0: out of range, must be >= 1"
    assert error("--top-p", "1.5") == "eval.py: --top-p 1.5: out of range, must be (0, 1]"
    assert error("--limit", "0") == "eval.py: --limit 0: out of range, must be >= 1"
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (weightless / name).write_bytes((model_dir / name).read_bytes())
    assert "neither model.safetensors.index.json nor model.safetensors" in error(model=weightless)
    (tmp_path / "out.json").write_text("not json")
    assert error().startswith(f"eval.py: {tmp_path / 'out.json'}: not an eval.py output to resume")


def test_evaluate_from_code(task):
    model_dir, _, tok = task
    from model import Transformer

    model = Transformer.from_pretrained(model_dir)
    problems = [Problem("a", "What is 1 + 1?", "2"), Problem("b", "What is 4 - 2?", "3")]
    result = evaluation.evaluate(model, tok, problems, n=4, temperature=1.0, top_p=1.0, max_new_tokens=12,
                                 batch_size=8, seed=3, progress=False)
    assert [p.id for p in result.problems] == ["a", "b"]
    for p in result.problems:
        assert p.rewards == [float(c == f"\\boxed{{{p.answer}}}") for c in p.completions]
    assert result.pass_at_1 == pytest.approx(sum(sum(p.rewards) for p in result.problems) / 8)
    again = evaluation.evaluate(model, tok, problems, n=4, temperature=1.0, top_p=1.0, max_new_tokens=12,
                                batch_size=8, seed=3, progress=False)
    assert again.problems == result.problems
    texts = evaluation.sample_completions(model, tok, ["What is 1 + 1?"], n=2, temperature=0.0, top_p=1.0,
                                          max_new_tokens=12, batch_size=2, generator=None, think_prefix=True)
    assert len(texts) == 1 and texts[0][0] == texts[0][1] and texts[0][0].startswith("<think>\n")


@pytest.mark.parametrize("source", ["math500", "file", "other file"])
def test_training_evaluation_is_eval_py_evaluation(tmp_path, monkeypatch, source):
    """train.py's in-run evaluation (--eval-data) samples the prompts eval.py samples, the boxed-answer
    suffix of a benchmark included (it once dropped it), so a model scores the same through both. The name
    reads the local copy NANOREASON_BENCHMARKS points at; the same file given by path gets the same suffix;
    a file named otherwise (a data file) gets none."""
    import torch
    from conftest import BENCHMARKS, require

    import train
    from data.prompts import BOXED_INSTRUCTION
    from eval import evaluate_shards
    from model import ModelConfig, Transformer

    monkeypatch.setenv("NANOREASON_BENCHMARKS", str(require(BENCHMARKS)))
    spec = {"math500": "math500", "file": str(require(BENCHMARKS / "math500.jsonl")),
            "other file": str(tmp_path / "problems.jsonl")}[source]
    (tmp_path / "problems.jsonl").write_bytes((BENCHMARKS / "math500.jsonl").read_bytes())
    texts = ["What is $x$? \\boxed{2} Please reason step by step, and put your final answer within."] * 4
    backend = train_tokenizer(texts, 300)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    backend.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(backend)))
    model = Transformer(ModelConfig.preset("tiny"))
    model.init_weights(torch.Generator().manual_seed(1))
    model.save_pretrained(model_dir)
    tok = Tokenizer.from_pretrained(model_dir)
    report = evaluation.main(["--model", str(model_dir), "--benchmark", spec, "--limit", "3", "--n", "2",
                              "--temperature", "1.0", "--top-p", "1.0", "--max-new-tokens", "6",
                              "--seed", "4",
                              "--out", str(tmp_path / "eval.json"), "--no-progress"])
    args = train.parse_args(["--eval-data", spec, "--eval-limit", "3", "--eval-n", "2", "--eval-temperature",
                             "1.0", "--eval-max-new-tokens", "6", "--eval-every", "1"])
    problems, options = train.eval_settings(args)
    assert options["prompt_suffix"] == ("" if source == "other file" else BOXED_INSTRUCTION)
    ours = evaluate_shards(model, tok, problems, seed=4 * 1_000_003, **options)
    theirs = next(iter(report["benchmarks"].values()))["problems"]
    assert [p.completions for p in ours.problems] == [p["completions"] for p in theirs]
    assert [p.rewards for p in ours.problems] == [p["rewards"] for p in theirs]
