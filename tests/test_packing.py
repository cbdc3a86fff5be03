"""data/packing.py: PackedBatch layout (targets shifted, positions and cu_seqlens per document, pairs side by
side), best-fit-decreasing under the budget, the step plan across ranks (each unit once per epoch, equal
micro-batch counts, balance), determinism, epoch reshuffle, resume, stream mode."""

import itertools

import numpy as np
import pytest
import torch

from data.packing import IGNORE, PackedBatch, StepPlan, best_fit_decreasing, collate, pack_stream
from data.tokenized_dataset import TokenizedDataset


def make_dataset(lengths, kind="sft", seed=0, pad_id=0) -> TokenizedDataset:
    """Random tokens; each sequence's first third is prompt (no loss), the rest completion."""
    rng = np.random.default_rng(seed)
    sizes = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    tokens = rng.integers(1, 1000, size=offsets[-1]).astype(np.int32)
    mask = np.concatenate([np.arange(n) >= n // 3 for n in sizes]) if len(sizes) else np.zeros(0, bool)
    if kind == "text":
        mask[:] = True
    units = len(sizes) // 2 if kind == "pairs" else len(sizes)
    return TokenizedDataset(kind, tokens, mask, offsets, np.arange(units), {}, pad_id)


def check_batch(batch: PackedBatch, docs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """The batch against its documents, token by token, from the definitions."""
    tokens = batch.tokens.tolist()
    assert (
        batch.tokens.dtype
        == batch.targets.dtype
        == batch.positions.dtype
        == batch.seq_id.dtype
        == torch.int64
    )
    assert batch.cu_seqlens.dtype == torch.int32 and batch.doc_index.dtype == torch.int64
    assert batch.cu_seqlens.tolist() == [0, *itertools.accumulate(len(t) for t, _ in docs)]
    assert batch.max_seqlen == max(len(t) for t, _ in docs)
    i = 0
    for d, (doc_tokens, doc_mask) in enumerate(docs):
        for j in range(len(doc_tokens)):
            assert tokens[i] == doc_tokens[j] and batch.positions[i] == j and batch.seq_id[i] == d
            last = j == len(doc_tokens) - 1
            want = IGNORE if last or not doc_mask[j + 1] else int(doc_tokens[j + 1])
            assert batch.targets[i] == want  # never a token of the next document
            i += 1
    assert i == len(tokens) and batch.num_loss_tokens == int((batch.targets != IGNORE).sum())


def test_collate_sft_and_pairs():
    ds = make_dataset([5, 9, 3, 7])
    batch = collate(ds, [2, 0, 3])
    check_batch(batch, [ds[2], ds[0], ds[3]])
    assert batch.doc_index.tolist() == [2, 0, 3]
    assert batch.chosen_doc.tolist() == batch.rejected_doc.tolist() == []  # no pairs
    assert (batch.units("tokens"), batch.units("sequences"), batch.units("pairs")) == \
        (batch.num_loss_tokens, 3, 0)
    pairs = make_dataset([4, 6, 5, 5, 8, 3], kind="pairs")
    batch = collate(pairs, [2, 0])
    check_batch(batch, [pairs[2][0], pairs[2][1], pairs[0][0], pairs[0][1]])  # chosen, rejected, chosen, ...
    assert batch.doc_index.tolist() == [2, 2, 0, 0]
    # the pair layout, named in the batch: pair b is documents chosen_doc[b] and rejected_doc[b]
    assert batch.chosen_doc.tolist() == [0, 2] and batch.rejected_doc.tolist() == [1, 3]
    assert batch.units("pairs") == 2 and batch.units("sequences") == 4
    # loss tokens: exactly the completion tokens after a document's first (their predecessor predicts them)
    assert batch.num_loss_tokens == sum(int(m[1:].sum()) for u in (2, 0) for _, m in pairs[u])
    moved = batch.to("cpu")
    assert torch.equal(moved.tokens, batch.tokens) and moved.max_seqlen == batch.max_seqlen


def test_empty_micro_batch_is_a_dummy_without_loss():
    batch = collate(make_dataset([4, 4], pad_id=7), [])
    assert (
        batch.tokens.tolist() == [7]
        and batch.targets.tolist() == [IGNORE]
        and batch.positions.tolist() == [0]
    )
    assert (
        batch.cu_seqlens.tolist() == [0, 1]
        and batch.seq_id.tolist() == [0]
        and batch.doc_index.tolist() == [-1]
    )
    assert batch.num_loss_tokens == 0 and batch.max_seqlen == 1


def test_best_fit_decreasing_respects_the_budget_and_packs_tightly():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=200)
    bins = best_fit_decreasing(np.arange(200), lengths, 128)
    assert sorted(u for b in bins for u in b) == list(range(200))
    assert all(lengths[b].sum() <= 128 for b in bins)
    assert (
        len(bins) <= 11 * int(np.ceil(lengths.sum() / 128)) // 9 + 1
    )  # BFD's bound: 11/9 OPT + 1 (OPT >= sum/cap)
    assert best_fit_decreasing(np.array([0, 1, 2, 3]), np.array([60, 50, 40, 10]), 100) == [[0, 2], [1, 3]]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
def test_plan_covers_every_unit_once_per_epoch(world_size, drop_last):
    rng = np.random.default_rng(world_size)
    lengths = rng.integers(1, 300, size=103)
    plans = [
        StepPlan(
            lengths,
            batch_size=16,
            token_budget=512,
            world_size=world_size,
            rank=r,
            seed=5,
            drop_last=drop_last,
        )
        for r in range(world_size)
    ]
    steps = plans[0].steps_per_epoch
    assert steps == (103 // 16 if drop_last else 7)
    for epoch in range(2):
        seen = []
        for _ in range(steps):
            per_rank = [s.next_step() for s in plans]
            assert (
                len({len(micro) for micro in per_rank}) == 1
            )  # every rank: the same number of micro-batches
            for micro in per_rank:
                for units in micro:
                    assert lengths[units].sum() <= 512
                    seen.extend(units)
            loads = [sum(int(lengths[units].sum()) for units in micro) for micro in per_rank]
            biggest_bin = max(int(lengths[units].sum()) for micro in per_rank for units in micro)
            assert max(loads) - min(loads) <= biggest_bin  # balanced to within one micro-batch
        assert len(seen) == len(set(seen)) == (steps * 16 if drop_last else 103)
        assert all(s.epoch == epoch + 1 and s.step == 0 for s in plans)


def test_pairs_travel_together():
    pairs = make_dataset(np.random.default_rng(1).integers(5, 60, size=2 * 40), kind="pairs")
    plan = StepPlan(pairs.lengths, batch_size=8, token_budget=256, world_size=2, rank=1, seed=0)
    for _ in range(plan.steps_per_epoch):
        for units in plan.next_step():
            batch = collate(pairs, units)
            docs = batch.doc_index
            assert docs[batch.chosen_doc].tolist() == docs[batch.rejected_doc].tolist() == units
            assert batch.tokens.shape[0] <= 256


def test_plan_is_deterministic_and_reshuffles_per_epoch():
    lengths = np.random.default_rng(2).integers(1, 50, size=64)
    a, b = (StepPlan(lengths, batch_size=8, token_budget=128, seed=3) for _ in range(2))
    assert [a.next_step() for _ in range(20)] == [b.next_step() for _ in range(20)]
    other = StepPlan(lengths, batch_size=8, token_budget=128, seed=4)
    assert not np.array_equal(a.order(0), other.order(0))
    assert not np.array_equal(a.order(0), a.order(1)) and sorted(a.order(1)) == list(range(64))
    assert np.array_equal(a.order(1), StepPlan(lengths, batch_size=8, token_budget=128, seed=3).order(1))


def test_resume_continues_the_uninterrupted_sequence():
    lengths = np.random.default_rng(4).integers(1, 90, size=50)
    kwargs = dict(batch_size=6, token_budget=200, world_size=2, rank=0, seed=11)
    uninterrupted = StepPlan(lengths, **kwargs)
    expected = [uninterrupted.next_step() for _ in range(25)]  # 8 steps per epoch: three epoch boundaries
    first = StepPlan(lengths, **kwargs)
    taken = [first.next_step() for _ in range(10)]
    state = first.state_dict()
    resumed = StepPlan(lengths, **kwargs)
    resumed.load_state_dict(state)
    assert taken + [resumed.next_step() for _ in range(15)] == expected
    with pytest.raises(ValueError, match="batch_size=6 but this run has 7"):
        StepPlan(lengths, **{**kwargs, "batch_size": 7}).load_state_dict(state)


def test_unit_over_budget_names_index_length_and_flag():
    with pytest.raises(ValueError, match=r"unit 2 has 900 tokens.*budget 512.*--batch-tokens"):
        StepPlan([10, 600, 900, 5], batch_size=2, token_budget=512)
    with pytest.raises(ValueError, match="less than one step"):
        StepPlan([10, 20], batch_size=3, token_budget=512)


def test_stream_blocks():
    ds = make_dataset([7, 3, 12, 5, 9], kind="text")
    blocks = pack_stream(ds, block_len=8)
    assert blocks.lengths.tolist() == [8, 8, 8, 8, 4] and len(blocks) == 5
    assert np.array_equal(
        np.concatenate([blocks[i][0] for i in range(5)]), ds.tokens
    )  # nothing lost or added
    starts = set(ds.offsets.tolist())
    for i in range(len(blocks)):
        pieces = blocks.docs(i)
        batch = collate(blocks, [i])
        check_batch(batch, pieces)  # each piece its own document: positions restart, no target across
        assert batch.doc_index.tolist() == [i] * len(pieces)
        cut = 8 * i + np.cumsum([0] + [len(t) for t, _ in pieces])[1:-1]
        assert set(cut.tolist()) <= starts  # pieces split exactly at document starts
    plan = StepPlan(blocks.lengths, batch_size=2, token_budget=16, seed=0, drop_last=False)
    assert sorted(u for _ in range(plan.steps_per_epoch) for m in plan.next_step() for u in m) == [
        0,
        1,
        2,
        3,
        4,
    ]
    with pytest.raises(ValueError, match="not 'pairs'"):
        pack_stream(make_dataset([4, 4], kind="pairs"), 8)
