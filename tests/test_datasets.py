"""data/datasets.py: every reader format, bad records (file:line:field, skip_bad counts), REDI's length
rules and their counts, the on-disk cache (hit, miss on a changed file or option), parallel tokenization."""

import json
import logging
import os
import re
import sys
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest
from test_tokenizer import make_tiny_tokenizer

from data.datasets import load_pairs, load_rl, load_sft
from data.length_rules import LengthRules
from data.tokenization import TokenizeJob, tokenize_records
from data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_pretrained(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records))
    return str(path)


def chat(problem: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": problem}, {"role": "assistant", "content": answer}]


SFT = [
    {"messages": chat("What is 3 + 4?", "<think>\n3 + 4 = 7\n</think>\nThe answer is 7.")},
    {"prompt": "Solve $x^2 = 4$.", "completion": "x = 2 or x = -2. 数学"},
    {"prompt": chat("a", "b")[:1], "completion": chat("a", "b")[1:]},
    {"messages": [{"role": "system", "content": "Be brief."}, *chat("hi", "hello"), *chat("again", "bye")]},
]


def expected_sft(tok, record, **kw):
    if "messages" in record:
        return tok.encode_chat(record["messages"], **kw)
    prompt, completion = record["prompt"], record["completion"]
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
    return tok.encode_chat(prompt + completion, **kw)


def assert_sequence(actual, expected):
    tokens, mask = actual
    assert tokens.tolist() == expected[0] and mask.tolist() == expected[1]


def test_sft_formats_jsonl_json_parquet_dir(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ds = load_sft(write_jsonl(tmp_path / "sft.jsonl", SFT), tok, think_prefix=True)
    assert ds.kind == "sft" and len(ds) == 4 and ds.stats["read"] == ds.stats["kept"] == 4
    for i, record in enumerate(SFT):
        assert_sequence(ds[i], expected_sft(tok, record, think_prefix=True))
        assert ds.lengths[i] == len(ds[i][0])
    assert ds.stats["loss_tokens"] == int(np.asarray(ds.mask).sum())
    (tmp_path / "list.json").write_text(json.dumps(SFT))
    columns = ("messages", "prompt", "completion")  # a column per field, null where a row has none
    pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in SFT[:2]]),
                   tmp_path / "part.parquet")
    expected = {"list.json": SFT, "part.parquet": SFT[:2], tmp_path.name: SFT + SFT[:2] + SFT}  # by name
    for path in (tmp_path / "list.json", tmp_path / "part.parquet", tmp_path):
        other = load_sft(path, tok, think_prefix=True)
        assert len(other) == len(expected[path.name])
        for i, record in enumerate(expected[path.name]):
            assert_sequence(other[i], expected_sft(tok, record, think_prefix=True))


def test_text_records(tok, tmp_path):
    """Mid-training text: a `text` field, a bare JSON string, a .txt file; every token has loss, EOS last."""
    write_jsonl(tmp_path / "a.jsonl", [{"text": "The answer is 42."}, json.dumps("Café 数学")])
    (tmp_path / "b.txt").write_text("A whole document.\nTwo lines.")
    ds = load_sft(tmp_path, tok)
    assert ds.kind == "text" and len(ds) == 3
    for i, text in enumerate(["The answer is 42.", "Café 数学", "A whole document.\nTwo lines."]):
        tokens, mask = ds[i]
        assert tokens.tolist() == tok.encode(text) + [tok.eos_id] and mask.all()


def test_pairs_formats(tok, tmp_path):
    prompt, good, bad = "What is 3 + 4?", "<think>\n3 + 4 = 7\n</think>\n7", "<think>\n3 + 4 = 8\n</think>\n8"
    records = [
        {"id": "redi", "prompt": prompt, "chosen": good, "rejected": bad},  # REDI's pair files
        {"prompt": chat(prompt, "")[:1], "chosen": chat(prompt, good)[1:], "rejected": chat(prompt, bad)[1:]},
        {"prompt": chat(prompt, "")[:1], "chosen": chat(prompt, good), "rejected": chat(prompt, bad)},
        {"chosen": chat(prompt, good), "rejected": chat(prompt, bad)},  # implicit prompt (TRL)
    ]
    ds = load_pairs(write_jsonl(tmp_path / "pairs.jsonl", records), tok, think_prefix=True)
    assert ds.kind == "pairs" and len(ds) == 4
    want_c = tok.encode_chat(chat(prompt, good), think_prefix=True)
    want_r = tok.encode_chat(chat(prompt, bad), think_prefix=True)
    for i in range(4):
        chosen, rejected = ds[i]
        assert_sequence(chosen, want_c)
        assert_sequence(rejected, want_r)
        assert ds.lengths[i] == len(want_c[0]) + len(want_r[0])
        assert [d[0].tolist() for d in ds.docs(i)] == [want_c[0], want_r[0]]
    first = want_c[1].index(True)  # the shared prompt
    assert want_c[0][:first] == want_r[0][:first]
    assert want_c[0][:first] == tok.encode_prompt(chat(prompt, "")[:1], think_prefix=True)


def test_rl_records(tok, tmp_path):
    records = [{"problem": "What is 3 + 4?", "answer": "7"}, {"problem": "Half of 9?", "answer": 4.5},
               {"prompt": chat("Sys?", "")[:1], "answer": 1}]
    problems = load_rl(write_jsonl(tmp_path / "rl.jsonl", records), tok,
                       prompt_suffix="Put the answer in \\boxed{}.", think_prefix=True)
    assert [(p.problem, p.answer) for p in problems] == [("What is 3 + 4?", "7"), ("Half of 9?", "4.5"),
                                                         ("Sys?", "1")]
    ids, problem, answer = problems[0]
    user = [{"role": "user", "content": "What is 3 + 4?\nPut the answer in \\boxed{}."}]
    assert ids == tok.encode_prompt(user, think_prefix=True)
    short = load_rl(tmp_path / "rl.jsonl", tok, max_prompt_len=len(problems[2].prompt_ids))
    assert len(short) == 1 and short.stats["dropped_prompt_too_long"] == 2


BAD = [
    SFT[0],
    "{not json",
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}]},
    {"messages": [{"role": "user", "content": "q"}]},
    {"question": "q"},
    {"prompt": "q", "completion": "a<|im_end|>b"},
    SFT[1],
]


def test_bad_records_name_file_line_field(tok, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD)
    expected = [(2, "not valid JSON"), (3, "field 'messages\\[1\\].content': expected a string, got int"),
                (4, "field 'messages': no assistant message"),
                (5, "no 'messages', 'prompt'/'completion' or 'text'"), (6, "end-of-turn")]
    for line, message in expected:
        lines = [json.dumps(SFT[0]), (tmp_path / "bad.jsonl").read_text().splitlines()[line - 1]]
        (tmp_path / "one.jsonl").write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=f"one.jsonl:2: .*{message}"):
            load_sft(tmp_path / "one.jsonl", tok)
    ds = load_sft(path, tok, skip_bad=True)
    assert len(ds) == 2 and ds.rows.tolist() == [0, 6]
    assert (ds.stats["read"], ds.stats["kept"], ds.stats["skipped_bad"]) == (7, 2, 5)
    assert ds.stats["bad_examples"][0].startswith(f"{path}:2: not valid JSON")
    with pytest.raises(ValueError, match="bad.jsonl:1: field 'chosen': missing"):
        load_pairs(path, tok)


def test_bad_parquet_row_and_missing_pyarrow(tok, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": None, "rejected": "b"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    with pytest.raises(ValueError, match="pairs.parquet:row 1: field 'chosen': missing"):
        load_pairs(tmp_path / "pairs.parquet", tok)
    assert len(load_pairs(tmp_path / "pairs.parquet", tok, skip_bad=True)) == 1
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pairs.parquet: reading Parquet needs pyarrow") as error:
        load_pairs(tmp_path / "pairs.parquet", tok)
    assert isinstance(error.value, ValueError)  # what the entry points report as one line


def test_missing_pyarrow_is_one_line_from_the_command_lines(tok, tmp_path, monkeypatch, capsys):
    """train.py --data x.parquet and the OpenR1 recipe on Parquet without pyarrow: one line naming the file
    and the package, exit 2 (it was the right sentence inside a 16-frame traceback)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import cli_error

    import train
    from data.recipes import openr1

    pq.write_table(pa.Table.from_pylist([{"messages": chat("q", "a")}]), tmp_path / "x.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.delenv("NANOREASON_DEBUG", raising=False)
    tok_dir = make_tiny_tokenizer(tmp_path / "tok")
    argv = ["--model", "tiny", "--tokenizer", str(tok_dir), "--data", str(tmp_path / "x.parquet"), "--out",
            str(tmp_path / "run")]
    line = cli_error(train.main, "train.py", argv, capsys)
    assert line == (f"train.py: {tmp_path / 'x.parquet'}: reading Parquet needs pyarrow, which is not "
                    "installed (pip install -r requirements.txt)")
    line = cli_error(openr1.main, "python -m data.recipes.openr1", ["--input", str(tmp_path / "x.parquet"),
                                                                    "--out", str(tmp_path / "o")], capsys)
    assert line.endswith(f"{tmp_path / 'x.parquet'}: reading Parquet needs pyarrow, which is not installed "
                         "(pip install -r requirements.txt)")


def lengths_of(tok, problem: str, answer: str) -> tuple[int, int]:
    """(prompt tokens, total tokens) of one SFT example."""
    ids, mask = tok.encode_chat(chat(problem, answer))
    return mask.index(True), len(ids)


def test_length_rules_and_counts(tok, tmp_path):
    records = [{"prompt": "q", "completion": "short"},
               {"prompt": "q", "completion": "a much longer completion: " + "3 + 4 = 7, " * 10 + "so 7."},
               {"prompt": "a long prompt " * 10, "completion": "short"}]
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    (p0, n0), (p1, n1), (p2, n2) = (lengths_of(tok, r["prompt"], r["completion"]) for r in records)
    max_len, max_prompt_len = n0 + 3, p2 - 1
    assert n1 > max_len and n2 > max_len and p1 < max_prompt_len < p2
    dropped = load_sft(path, tok, max_len=max_len, max_prompt_len=max_prompt_len)
    assert len(dropped) == 1 and dropped.rows.tolist() == [0]
    assert (dropped.stats["dropped_too_long"], dropped.stats["dropped_prompt_too_long"]) == (1, 1)

    full_ids, full_mask = tok.encode_chat(chat(records[1]["prompt"], records[1]["completion"]))
    assert p2 >= max_len  # record 2's prompt alone fills max_len: no completion to keep, dropped
    keep_end = load_sft(path, tok, max_len=max_len, truncation="keep_end")
    assert (keep_end.stats["truncated"], keep_end.stats["dropped_too_long"]) == (1, 1)
    assert keep_end.rows.tolist() == [0, 1]
    tokens, mask = keep_end[1]  # the prompt whole, then the completion's last max_len - p1 tokens (EOS kept)
    assert tokens.tolist() == full_ids[:p1] + full_ids[n1 - (max_len - p1):] and len(tokens) == max_len
    assert mask.tolist() == full_mask[:p1] + full_mask[n1 - (max_len - p1):]
    assert tokens[mask][-1] == tok.eos_id
    keep_start = load_sft(path, tok, max_len=max_len, truncation="keep_start")
    assert keep_start[1][0].tolist() == full_ids[:max_len] and keep_start.stats["truncated"] == 1
    roomier = load_sft(path, tok, max_len=p2 + 2, truncation="keep_end")
    assert roomier.stats["truncated"] == sum(n > p2 + 2 for n in (n0, n1, n2)) and len(roomier) == 3
    assert roomier[2][0].tolist()[:p2] == tok.encode_chat(chat(records[2]["prompt"], "x"))[0][:p2]


def test_pair_dropped_as_a_unit(tok, tmp_path):
    long = "3 + 4 = 7, " * 20
    records = [{"prompt": "q", "chosen": "7", "rejected": "8"},
               {"prompt": "q", "chosen": "7", "rejected": long},
               {"prompt": "q", "chosen": long, "rejected": "8"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    max_len = len(tok.encode_chat(chat("q", "7"))[0]) + 2
    ds = load_pairs(path, tok, max_len=max_len)
    assert len(ds) == 1 and ds.rows.tolist() == [0] and ds.stats["dropped_too_long"] == 2
    ds = load_pairs(path, tok, max_len=max_len, truncation="keep_end")
    assert len(ds) == 3 and ds.stats["truncated"] == 2
    for i in range(3):
        for tokens, mask in ds[i]:
            assert len(tokens) <= max_len and tokens[mask][-1] == tok.eos_id


def test_cache_hit_miss_and_atomic(tok, tmp_path, monkeypatch, caplog):
    path = write_jsonl(tmp_path / "sft.jsonl", SFT)
    cache = tmp_path / "cache"
    first = load_sft(path, tok, cache_dir=cache, max_len=64)
    assert first.stats["cache"] == "miss" and isinstance(first.tokens, np.memmap)
    assert [p.name.split("-")[0] for p in cache.iterdir()] == ["sft"]  # no temporary directory left behind

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized on a cache hit")

    with monkeypatch.context() as m:
        m.setattr(Tokenizer, "encode_chat", no_tokenizing)
        with caplog.at_level(logging.INFO, logger="data.datasets"):
            second = load_sft(path, tok, cache_dir=cache, max_len=64)
        assert "cache hit" in caplog.text and second.stats["cache"] == "hit"
        assert np.array_equal(second.tokens, first.tokens) and np.array_equal(second.mask, first.mask)
        assert second.stats["kept"] == first.stats["kept"]
        for change in ({"max_len": 65}, {"think_prefix": True}, {"template_kwargs": {"x": 1}}):  # a new key
            with pytest.raises(AssertionError, match="tokenized on a cache hit"):  # a miss
                load_sft(path, tok, cache_dir=cache, **{"max_len": 64, **change})
        write_jsonl(tmp_path / "sft.jsonl", SFT[:3])  # the file's content changes
        with pytest.raises(AssertionError, match="tokenized on a cache hit"):  # a miss
            load_sft(path, tok, cache_dir=cache, max_len=64)
    assert len(load_sft(path, tok, cache_dir=cache, max_len=64)) == 3
    assert len(list(cache.iterdir())) == 2


def test_parallel_tokenization_matches_inline(tok, tmp_path):
    records = [{"prompt": f"What is {i} + {i}?", "completion": f"{i} + {i} = {2 * i}"} for i in range(150)]
    records[77] = {"prompt": 5, "completion": "x"}
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    inline = load_sft(path, tok, skip_bad=True, num_workers=0)
    parallel = load_sft(path, tok, skip_bad=True, num_workers=2)
    assert np.array_equal(inline.tokens, parallel.tokens) and np.array_equal(inline.offsets, parallel.offsets)
    assert parallel.stats["skipped_bad"] == 1 and 77 not in parallel.rows.tolist() and len(parallel) == 149
    with pytest.raises(ValueError, match="sft.jsonl:78: field 'prompt'"):
        load_sft(path, tok, num_workers=2)


class DyingJob(TokenizeJob):
    """A tokenizing job whose worker process dies on its first chunk (killed, out of memory, ...)."""

    def run(self, chunk):
        os._exit(3)


def test_a_worker_that_dies_is_an_error_not_a_hang(tok):
    """multiprocessing.Pool waits forever for the chunk of a worker that died (CI once sat 90 minutes in
    this file); the pool now says so."""
    job = DyingJob(tok, "sft", LengthRules(None, None, "drop", "truncate"))
    records = [(row, f"f.jsonl:{row + 1}", "value", SFT[0]) for row in range(4)]
    with pytest.raises(BrokenProcessPool):
        list(tokenize_records(job, records, num_workers=2, desc="dying"))


def test_undecodable_and_too_deep_lines_name_file_and_line_and_can_be_skipped(tok, tmp_path):
    """A non-UTF-8 byte or a line nested 100k deep is one bad record (file:line), not the whole file."""
    good = json.dumps(SFT[0]).encode()
    latin1 = good.replace(b"What", b"Wh\xe9t")
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b"\n".join([good, latin1, good, b"[" * 100_000 + b"]" * 100_000, good]) + b"\n")
    column = good.index(b"What") + 3
    message = f"{path}:2: not UTF-8 text (byte 0xe9 at column {column})"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_sft(path, tok)
    ds = load_sft(path, tok, skip_bad=True)
    assert (len(ds), ds.stats["skipped_bad"], ds.rows.tolist()) == (3, 2, [0, 2, 4])
    assert ds.stats["bad_examples"][1] == f"{path}:4: not valid JSON (nested too deeply to read)"
    rl = tmp_path / "rl.jsonl"
    rl.write_bytes(b'{"problem": "1 + 1?", "answer": "2"}\n{"problem": "caf\xe9?", "answer": "2"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{rl}:2: not UTF-8 text")):
        load_rl(rl, tok)
    assert len(load_rl(rl, tok, skip_bad=True)) == 1
    text = tmp_path / "docs"
    text.mkdir()
    (text / "a.txt").write_bytes(b"fine text")
    (text / "b.txt").write_bytes(b"line one\nline \xff two")
    with pytest.raises(ValueError, match=re.escape(f"{text / 'b.txt'}: not UTF-8 text (byte 0xff at line 2")):
        load_sft(text, tok)
    assert len(load_sft(text, tok, skip_bad=True)) == 1


def test_a_file_that_cannot_be_read_names_itself(tok, tmp_path):
    """An invalid .json list or a damaged .parquet is an error naming the file, --skip-bad or not."""
    broken = tmp_path / "list.json"
    broken.write_text('[{"text": "a"},\n {"text": "b"')
    for skip_bad in (False, True):
        message = f"{broken}: not valid JSON (Expecting ',' delimiter at line 2"
        with pytest.raises(ValueError, match=re.escape(message)):
            load_sft(broken, tok, skip_bad=skip_bad)
    broken.write_bytes(b'[{"text": "a"},\n {"text": "\xe9"}]')
    with pytest.raises(ValueError, match=re.escape(f"{broken}: not UTF-8 text (byte 0xe9 at line 2")):
        load_sft(broken, tok)
    damaged = tmp_path / "rows.parquet"
    damaged.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=re.escape(f"{damaged}: not a readable Parquet file")):
        load_sft(damaged, tok, skip_bad=True)


GOOD = {load_sft: SFT[0], load_pairs: {"prompt": "Q?", "chosen": "yes", "rejected": "no"},
        load_rl: {"problem": "Q?", "answer": "1"}}


@pytest.mark.parametrize("loader,record,field", [
    (load_sft, {"prompt": "Q?", "completion": ""}, "completion"),
    (load_sft, {"prompt": "Q?", "completion": " \n"}, "completion"),
    (load_sft, {"messages": chat("Q?", "")}, "messages"),
    (load_sft, {"messages": [*chat("Q?", ""), *chat("again", "fine")]}, "messages"),
    (load_pairs, {"prompt": "Q?", "chosen": "", "rejected": "no"}, "chosen"),
    (load_pairs, {"prompt": "Q?", "chosen": "yes", "rejected": ""}, "rejected"),
    (load_pairs, {"chosen": chat("Q?", "yes"), "rejected": chat("Q?", "")}, "rejected"),
    (load_rl, {"problem": "", "answer": "1"}, "problem"),
    (load_rl, {"problem": "Q?", "answer": " "}, "answer"),
])
def test_empty_completions_are_refused_or_skipped_like_an_empty_answer(tok, tmp_path, loader, record, field):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD[loader], record])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: field '{field}'")):
        loader(path, tok)
    kept = loader(path, tok, skip_bad=True)
    assert len(kept) == 1 and kept.stats["skipped_bad"] == 1


def test_fingerprint_is_the_same_data_and_options_only(tok, tmp_path):
    """What a checkpoint records to tell a resumed run reads the same data: equal on a cache hit and miss,
    different for other bytes or another data option."""
    path = write_jsonl(tmp_path / "sft.jsonl", SFT)
    miss = load_sft(path, tok, cache_dir=tmp_path / "cache")
    hit = load_sft(path, tok, cache_dir=tmp_path / "cache")
    assert (miss.stats["cache"], hit.stats["cache"]) == ("miss", "hit")
    assert miss.stats["fingerprint"] == hit.stats["fingerprint"] == load_sft(path, tok).stats["fingerprint"]
    assert load_sft(path, tok, max_len=999).stats["fingerprint"] != miss.stats["fingerprint"]
    other = write_jsonl(tmp_path / "other.jsonl", SFT[:3])
    assert load_sft(other, tok).stats["fingerprint"] != miss.stats["fingerprint"]
    rl = write_jsonl(tmp_path / "rl.jsonl", [GOOD[load_rl]])
    assert load_rl(rl, tok).stats["fingerprint"] == load_rl(rl, tok).stats["fingerprint"]
    assert load_rl(rl, tok, think_prefix=True).stats["fingerprint"] != load_rl(rl, tok).stats["fingerprint"]
