"""Packing: units (examples or pairs) -> flat varlen micro-batches under a token budget, and the step plan.

    plan = StepPlan(ds.lengths, batch_size=32, token_budget=16384, world_size=8, rank=r, seed=0)
    for units in plan.next_step():               # this rank's micro-batches of one optimiser step
        batch = collate(ds, units).to("cuda")    # PackedBatch: tokens, targets, positions, cu_seqlens, ...

A PackedBatch holds D documents end to end (T tokens). Per document d, tokens cu_seqlens[d]:cu_seqlens[d+1],
positions restart at 0, seq_id = d: attention never crosses documents.
    targets[i] = tokens[i+1] if mask[i+1] else -100       (the last token of each document: -100)
so the loss of token i predicts token i+1, and only tokens that carry loss are predicted.

Pairs: a pair unit is two documents (dataset.docs(i) = [chosen, rejected]). The batch says which they are:
pair b of the batch is documents chosen_doc[b] and rejected_doc[b]; collate is the one place that decides
where they go (today side by side, [chosen_0, rejected_0, chosen_1, ...]) and everything downstream (the
losses' pair sums, DPO's reference pre-pass) reads the two index tensors, never the order.

The plan of a step (StepPlan), a pure function of (seed, epoch, step), the same on every rank:
  1. the epoch's order: a permutation of the units by np.random.default_rng([seed, epoch]);
  2. step s takes order[s*batch_size : (s+1)*batch_size] (drop_last: the incomplete tail is left out);
  3. best-fit-decreasing: units by length, longest first (ties by index), each into the fullest micro-batch
     it fits in (the one with the least room left >= its length), else a new one; no micro-batch holds
     more than token_budget tokens;
  4. the micro-batches, heaviest first, go each to the rank with the fewest tokens so far among those with
     fewer than ceil(count / world_size); ranks short of that count get empty micro-batches (collate makes
     a 1-token document without loss of one), so every rank runs the same number of forward/backward passes.

Stream mode (mid-training): pack_stream(ds, block_len) lays the documents end to end (each already ends with
EOS: appended to text at load, written by the chat template otherwise) and cuts a block every block_len
tokens (the last block may be shorter). Each document piece in a block is its own document in cu_seqlens,
positions restarting at 0; masks carry over. A cut loses one target (the last token of a piece predicts
nothing).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

IGNORE = -100


@dataclass
class PackedBatch:
    """One micro-batch of D documents, T tokens (see the module docstring)."""

    tokens: torch.Tensor  # [T] int64
    targets: torch.Tensor  # [T] int64, -100 where no loss
    positions: torch.Tensor  # [T] int64, restarting at 0 per document
    cu_seqlens: torch.Tensor  # [D+1] int32
    seq_id: torch.Tensor  # [T] int64, the document (0..D-1) of each token
    doc_index: torch.Tensor  # [D] int64, the dataset unit of each document (-1: the empty micro-batch's)
    chosen_doc: torch.Tensor  # [B] int64, pairs: the document of pair b's chosen completion (empty otherwise)
    rejected_doc: torch.Tensor  # [B] int64, pairs: the document of pair b's rejected completion
    max_seqlen: int
    num_loss_tokens: int  # (targets != -100).sum(), counted on the host at collate time

    def units(self, unit: str) -> int:
        """How many of a loss's unit the batch holds: "tokens" (with loss), "pairs" or "sequences"."""
        return {"tokens": self.num_loss_tokens, "pairs": len(self.chosen_doc),
                "sequences": len(self.doc_index)}[unit]

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)


def collate(dataset, unit_indices: list[int]) -> PackedBatch:
    """Pack the units' documents (dataset.docs(i): [(tokens, mask), ...]) into one PackedBatch; a pair
    dataset's units (kind "pairs": docs(i) = [chosen, rejected]) are recorded in chosen_doc / rejected_doc.
    No units: a 1-token document (the pad token) without loss."""
    docs, doc_index, chosen_doc, rejected_doc = [], [], [], []
    pairs = getattr(dataset, "kind", None) == "pairs"
    for unit in unit_indices:
        unit_docs = dataset.docs(unit)
        if pairs:
            chosen_doc.append(len(docs))
            rejected_doc.append(len(docs) + 1)
        for tokens, mask in unit_docs:
            docs.append((tokens, mask))
            doc_index.append(unit)
    if not docs:
        pad = getattr(dataset, "pad_id", 0)
        docs, doc_index = [(np.array([pad]), np.array([False]))], [-1]
    lengths = np.array([len(t) for t, _ in docs], dtype=np.int64)
    cu_seqlens = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu_seqlens[1:])
    tokens = np.concatenate([t for t, _ in docs]).astype(np.int64)
    mask = np.concatenate([m for _, m in docs]).astype(bool)
    targets = np.full(len(tokens), IGNORE, dtype=np.int64)
    targets[:-1] = np.where(mask[1:], tokens[1:], IGNORE)
    targets[cu_seqlens[1:] - 1] = IGNORE  # the last token of a document predicts nothing
    starts = np.repeat(cu_seqlens[:-1], lengths)
    return PackedBatch(
        tokens=torch.from_numpy(tokens),
        targets=torch.from_numpy(targets),
        positions=torch.from_numpy(np.arange(len(tokens), dtype=np.int64) - starts),
        cu_seqlens=torch.from_numpy(cu_seqlens.astype(np.int32)),
        seq_id=torch.from_numpy(np.repeat(np.arange(len(docs), dtype=np.int64), lengths)),
        doc_index=torch.tensor(doc_index, dtype=torch.int64),
        chosen_doc=torch.tensor(chosen_doc, dtype=torch.int64),
        rejected_doc=torch.tensor(rejected_doc, dtype=torch.int64),
        max_seqlen=int(lengths.max()),
        num_loss_tokens=int((targets != IGNORE).sum()),
    )


def best_fit_decreasing(units: np.ndarray, lengths: np.ndarray, budget: int) -> list[list[int]]:
    """Bins of unit indices, each of at most `budget` tokens: longest unit first (ties by index), each into
    the bin with the least room left that still fits it, else a new bin."""
    order = sorted((int(u) for u in units), key=lambda u: (-int(lengths[u]), u))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (room left, bin), sorted
    for unit in order:
        size = int(lengths[unit])
        k = bisect.bisect_left(room, (size, -1))
        if k == len(room):
            bins.append([unit])
            bisect.insort(room, (budget - size, len(bins) - 1))
        else:
            left, b = room.pop(k)
            bins[b].append(unit)
            bisect.insort(room, (left - size, b))
    return bins


def deal(bins: list[list[int]], lengths: np.ndarray, world_size: int) -> list[list[list[int]]]:
    """The bins dealt to ranks, each getting ceil(len(bins) / world_size) (empty bins padding): heaviest bin
    first, to the least loaded rank that still has a free slot (ties: the lower rank)."""
    per_rank = max(1, math.ceil(len(bins) / world_size))
    loads = [sum(int(lengths[u]) for u in b) for b in bins]
    ranks: list[list[list[int]]] = [[] for _ in range(world_size)]
    rank_load = [0] * world_size
    for b in sorted(range(len(bins)), key=lambda b: (-loads[b], b)):
        r = min((r for r in range(world_size) if len(ranks[r]) < per_rank), key=lambda r: (rank_load[r], r))
        ranks[r].append(bins[b])
        rank_load[r] += loads[b]
    for micro in ranks:
        micro.extend([] for _ in range(per_rank - len(micro)))
    return ranks


class StepPlan:
    """The plan of the steps: which units each step takes, and which of them each rank packs into which
    micro-batch (see the module docstring). `next_step()` -> this rank's micro-batches (lists of unit
    indices) of the next optimiser step; `next_units()` -> the step's units unpacked (GRPO's prompts)."""

    def __init__(self, lengths, *, batch_size: int, token_budget: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, drop_last: bool = True):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if batch_size < 1 or token_budget < 1 or not 0 <= rank < world_size or seed < 0:
            raise ValueError(f"StepPlan: batch_size={batch_size}, token_budget={token_budget}, "
                             f"rank={rank}, world_size={world_size}, seed={seed}: expected positive sizes, "
                             "0 <= rank < world_size and seed >= 0")
        too_long = np.flatnonzero(self.lengths > token_budget)
        if too_long.size:
            i = int(too_long[np.argmax(self.lengths[too_long])])
            raise ValueError(f"unit {i} has {self.lengths[i]} tokens, more than the micro-batch token budget "
                             f"{token_budget} ({too_long.size} units are too long): raise --batch-tokens to "
                             f"{self.lengths[i]} or more, or lower --max-len")
        self.batch_size, self.token_budget = batch_size, token_budget
        self.world_size, self.rank, self.seed, self.drop_last = world_size, rank, seed, drop_last
        n = len(self.lengths)
        self.steps_per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} units are less than one step of batch_size {batch_size} (drop_last)")
        self.epoch, self.step = 0, 0  # the next step to take
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of the units."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths)))
        return self._order[1]

    def step_units(self, epoch: int, step: int) -> np.ndarray:
        return self.order(epoch)[step * self.batch_size:(step + 1) * self.batch_size]

    def plan(self, epoch: int, step: int) -> list[list[list[int]]]:
        """Every rank's micro-batches of (epoch, step): plan[rank][micro] = unit indices."""
        bins = best_fit_decreasing(self.step_units(epoch, step), self.lengths, self.token_budget)
        return deal(bins, self.lengths, self.world_size)

    def next_step(self) -> list[list[int]]:
        """This rank's micro-batches of the next step; advances."""
        micro = self.plan(self.epoch, self.step)[self.rank]
        self._advance()
        return micro

    def next_units(self) -> np.ndarray:
        """Every unit of the next step (the same on every rank), unpacked; advances. GRPO's prompts."""
        units = self.step_units(self.epoch, self.step)
        self._advance()
        return units

    def planned_units(self, num_steps: int) -> np.ndarray:
        """Every unit the next `num_steps` steps take, in order (the plan is not advanced)."""
        epoch, step, taken = self.epoch, self.step, []
        for _ in range(num_steps):
            taken.append(self.step_units(epoch, step))
            epoch, step = (epoch + 1, 0) if step + 1 == self.steps_per_epoch else (epoch, step + 1)
        return np.concatenate(taken) if taken else np.zeros(0, dtype=np.int64)

    def _advance(self) -> None:
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "num_units": len(self.lengths),
                "batch_size": self.batch_size, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off. The plan does not depend on world_size, rank or token_budget for
        which units a step takes, so those may change between runs; the data and the batch may not."""
        for key in ("seed", "num_units", "batch_size", "drop_last"):
            ours = self.state_dict()[key]
            if state[key] != ours:
                raise ValueError(f"step plan state has {key}={state[key]!r} but this run has {ours!r}: the "
                                 "data, --seed or --batch-size changed since the checkpoint")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


class StreamBlocks:
    """The documents of a TokenizedDataset end to end, cut every block_len tokens (see the module docstring).
    A view: nothing is copied. Unit i is block i; docs(i) its document pieces."""

    kind = "stream"

    def __init__(self, dataset, block_len: int):
        if dataset.kind not in ("sft", "text"):
            raise ValueError(f"stream packing takes sft or text data, not {dataset.kind!r}")
        if block_len < 2:
            raise ValueError(f"block_len={block_len}: expected at least 2 tokens")
        self.dataset, self.block_len, self.pad_id = dataset, block_len, dataset.pad_id
        total = int(dataset.offsets[-1])
        starts = np.arange(0, total, block_len, dtype=np.int64)
        self.bounds = np.append(starts, total)
        self.lengths = np.diff(self.bounds)
        self.stats = {**dataset.stats, "blocks": len(self.lengths), "block_len": block_len}

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.bounds[i], self.bounds[i + 1]
        return self.dataset.tokens[start:end], self.dataset.mask[start:end]

    def docs(self, i: int) -> list[tuple[np.ndarray, np.ndarray]]:
        start, end = int(self.bounds[i]), int(self.bounds[i + 1])
        offsets = self.dataset.offsets
        first = np.searchsorted(offsets, start, side="right")
        last = np.searchsorted(offsets, end, side="left")
        cuts = [start, *(int(c) for c in offsets[first:last]), end]  # the document starts inside the block
        tokens, mask = self.dataset.tokens, self.dataset.mask
        return [(tokens[a:b], mask[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def pack_stream(dataset, block_len: int) -> StreamBlocks:
    """Stream mode for mid-training: fixed blocks of block_len tokens, documents kept apart in cu_seqlens."""
    return StreamBlocks(dataset, block_len)
