"""Packing and batching: tokenized examples packed into rows of at most ``data.max_seq_len`` tokens, then per-worker,
per-epoch shuffled micro batches.

Packing keeps examples apart without a materialised mask: every example's ``position_ids`` restart at 0, and the
batch carries no ``attention_mask``. transformers then derives sequence boundaries from the position resets and
builds a block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``), so a token never attends to
another example; the varlen kernel takes the same boundaries as cumulative lengths (ftcluster/attention.py). The
first label of every example is -100, so no example is trained to predict the next one.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field

import torch

from ftcluster.config import DataConfig
from ftcluster.data import formatting
from ftcluster.data.formatting import IGNORE

class Packer:
    """Greedy, order-preserving packing into rows of at most ``max_len`` tokens, with per-example position ids:
    examples go in one at a time, and a row comes out when the next example does not fit beside it. For streams,
    which cannot be sorted; a dataset in memory is packed best fit (``pack``)."""

    def __init__(self, max_len: int):
        self.max_len, self.row = max_len, self._empty()

    @staticmethod
    def _empty() -> dict:
        return {"input_ids": [], "labels": [], "position_ids": []}

    def add(self, ex: dict) -> dict | None:
        n, full = len(ex["input_ids"]), None
        if self.row["input_ids"] and len(self.row["input_ids"]) + n > self.max_len:
            full, self.row = self.row, self._empty()
        self.row["input_ids"] += ex["input_ids"]
        self.row["labels"] += ex["labels"]
        self.row["position_ids"] += range(n)
        return full

    def flush(self) -> dict | None:
        last, self.row = self.row, self._empty()
        return last if last["input_ids"] else None


def best_fit(lengths: list[int], max_len: int) -> list[list[int]]:
    """Best-fit decreasing: the longest first, each into the row with the least room that still holds it, a new
    row when none does; the indices of each row. Equal lengths keep their order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens still free, row index), ascending
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(room, (n, -1))
        if at == len(room):
            rows.append([i])
            free, row = max_len - n, len(rows) - 1
        else:
            free, row = room.pop(at)
            rows[row].append(i)
            free -= n
        if free > 0:
            bisect.insort(room, (free, row))
    return rows


def pack(examples: list[dict], max_len: int) -> list[dict]:
    """Best-fit decreasing (``best_fit``). With short examples to fill the gaps, rows end within a few tokens of
    ``max_len``; greedy packing in order (``Packer``, which a stream needs) left about half an example of padding per
    row and a part-filled last row (4.5% of the llama-1b suite's row tokens, computed and paid for on every step).
    Examples of equal length keep their order, so the rows depend only on the (seeded) order they come in."""
    out = []
    for members in best_fit([len(ex["input_ids"]) for ex in examples], max_len):
        row = Packer._empty()
        for i in members:
            row["input_ids"] += examples[i]["input_ids"]
            row["labels"] += examples[i]["labels"]
            row["position_ids"] += range(len(examples[i]["input_ids"]))
        out.append(row)
    return out


class Regrouped:
    """Packed rows of up to ``row_len`` tokens, their examples packed again best fit into rows of up to
    ``rows_per_group x row_len`` (``data.padding_free``): one such row carries the padding of one row, where
    ``rows_per_group`` rows each carry their own (of short examples, a row of 512 ends 20 tokens short on average;
    a row of 4,096 ends as short). A sequence of rows like a list of them: each is built from the source rows when
    read, which stay as they are (memory-mapped from the row cache), so only each example's place is held.
    Depends only on the rows, so every worker and worker count regroups alike."""

    def __init__(self, rows, rows_per_group: int, row_len: int):
        self.source = rows
        self.places: list[tuple[int, int, int]] = []  # (source row, first token, tokens) of every example
        for r, row in enumerate(rows):
            pos = row["position_ids"]
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            self.places += [(r, a, b - a) for a, b in zip(starts, starts[1:])]
        self.groups = best_fit([n for _, _, n in self.places], rows_per_group * row_len)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict:
        row, read = Packer._empty(), {}
        for e in self.groups[i]:
            r, a, n = self.places[e]
            if r not in read:
                read[r] = self.source[r]
            row["input_ids"] += read[r]["input_ids"][a:a + n]
            row["labels"] += read[r]["labels"][a:a + n]
            row["position_ids"] += range(n)
        return row


def collate(rows: list[dict], pad_id: int, packed: bool, pad_to: int | None = None,
            split: int = 1, longest: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row (or ``pad_to``). Packed rows pad with a fresh position run, after every real
    token, so it masks nothing real; unpacked rows get an attention_mask. ``split`` > 1: the rows will be
    cut into that many slices of tokens (sequence parallelism): the width is a multiple of it, and the rows carry
    positions (the padding a fresh run of them) and nothing else, which attention reads the examples from.
    ``longest``: a bound on every example's length, where it is below the row's width (padding-free rows)."""
    width = pad_to or max(len(r["input_ids"]) for r in rows)
    width += -width % split
    ids, labels, pos, mask = [], [], [], []
    for r in rows:
        n = len(r["input_ids"])
        fill = width - n
        ids.append(r["input_ids"] + [pad_id] * fill)
        labels.append(r["labels"] + [IGNORE] * fill)
        pos.append(r.get("position_ids", list(range(n))) + list(range(fill)))
        mask.append([1] * n + [0] * fill)
    batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
             "num_tokens": torch.tensor(sum(len(r["input_ids"]) for r in rows))}
    if split > 1:
        batch["position_ids"] = torch.tensor(pos)
    elif packed:
        batch["position_ids"] = torch.tensor(pos)
        batch.update(_cumulative_lengths(pos, width, [len(r["input_ids"]) for r in rows], longest))
    else:
        batch["attention_mask"] = torch.tensor(mask)
    return batch


def _cumulative_lengths(position_rows: list[list[int]], width: int, real: list[int],
                        longest: int | None = None) -> dict:
    """Boundaries of every example across the flattened batch, for varlen attention: ``cu_seq_lens`` (int32,
    starts at 0), and as the longest sequence the row width, a bound the kernel only sizes its grid by: the same int
    in every batch, where the longest example's length would make each new value a recompile of compiled layers.
    Plain ints stay on the host (no device sync). A row's trailing padding (after its ``real`` tokens) is counted in
    its last example: attention is causal, so no real token sees it, and a row of one example is then one sequence
    (ftcluster/attention.py attends a batch of such rows as plain causal rows).
    ``longest`` (padding-free rows, many examples of at most that many tokens each): the bound is ``longest``, and
    the trailing padding is sequences of its own, ``longest`` tokens at most, so that none is longer."""
    bounds, offset = [0], 0
    for row, n in zip(position_rows, real):
        starts = [i for i, p in enumerate(row[:n]) if p == 0]
        if longest is not None and n < len(row):
            starts += range(n, len(row), longest)
        bounds += [offset + b for b in [*starts[1:], len(row)]]
        offset += len(row)
    cu = torch.tensor(bounds, dtype=torch.int32)
    bound = width if longest is None else longest
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": bound, "max_length_k": bound}


@dataclass
class ShardedBatches:
    """Micro batches for one worker: each epoch reshuffles all rows with (seed, epoch), and every micro step takes
    the next ``micro_batch_size x world`` rows of that order, worker ``rank`` every ``world``-th of them. Where an
    epoch is is one number, the rows of its order already taken, whatever the number of workers that took them: a
    run resumed on another worker count goes on from the next row, no row seen twice or skipped. Every worker gets
    the same number of batches (DeepSpeed's collectives need it), a multiple of ``accumulation``. Each batch holds
    ``num_tokens``, its count of real (unpadded) tokens."""

    rows: list[dict]
    micro_batch_size: int
    rank: int
    world: int
    seed: int
    pad_id: int
    packed: bool
    pad_to: int | None = None
    accumulation: int = 1
    split: int = 1
    """Sequence parallelism's K (``collate``)."""
    padding_free: bool = False
    """``data.padding_free``: the rows' examples regrouped into rows of ``micro_batch_size x pad_to`` tokens
    (``Regrouped``), one a micro batch; ``rows`` and every count of rows below are then of those."""

    def __post_init__(self):
        self.longest = None
        if self.padding_free:
            b, width = self.micro_batch_size, self.pad_to
            if width is None:
                raise ValueError("padding-free batches need the rows' width (pad_to, data.max_seq_len)")
            self.rows = Regrouped(self.rows, b, width)
            self.micro_batch_size, self.pad_to, self.longest = 1, b * width, width
            if len(self.rows) < self.world:
                raise ValueError(f"the data gives {len(self.rows)} padding-free rows of {b} x {width} tokens, "
                                 f"fewer than the {self.world} workers; add data, or unset data.padding_free")
        if len(self.rows) // self.world < self.micro_batch_size:
            raise ValueError(
                f"the data gives {len(self.rows)} rows, fewer than num_workers × micro_batch_size "
                f"({self.world} × {self.micro_batch_size}); add data, or lower training.micro_batch_size"
            )
        self.rows_per_micro_step = self.micro_batch_size * self.world

    def __len__(self) -> int:
        """This worker's micro batches in an epoch: whole optimizer steps only (a step never straddles two epochs)."""
        n = len(self.rows) // self.rows_per_micro_step
        return n - n % self.accumulation

    @property
    def rows_per_epoch(self) -> int:
        return len(self) * self.rows_per_micro_step

    def order(self, epoch: int) -> list[int]:
        """The epoch's order of all rows, the same on every worker and for every worker count."""
        idx = list(range(len(self.rows)))
        random.Random(self.seed * 100003 + epoch).shuffle(idx)
        return idx

    def epoch(self, epoch: int, start_row: int = 0):
        """This worker's batches of ``epoch``, from row ``start_row`` of the epoch's order on (a resumed run skips
        the rows already trained on)."""
        idx, b = self.order(epoch), self.micro_batch_size
        for start in range(start_row, self.rows_per_epoch, self.rows_per_micro_step):
            rows = [self.rows[idx[start + self.rank + self.world * j]] for j in range(b)]
            yield collate(rows, self.pad_id, self.packed, self.pad_to, self.split, self.longest)


@dataclass
class RowStats:
    """What tokenizing and packing did to the examples."""
    examples: int
    truncated: int
    """Examples longer than data.max_seq_len, cut to it."""
    no_target: int
    """Examples dropped because no target token was left after the cut (their prompt alone fills max_seq_len)."""
    rows: int
    tokens: int
    longest: int
    median: int
    dropped: dict[str, int] = field(default_factory=dict)
    """Source rows left out before tokenizing, by reason (see ``Examples.dropped``)."""
    key: str | None = field(default=None, compare=False)
    """The rows' identity: their cache key, a hash of the examples, the data settings and the tokenizer
    (ftcluster/data/cache.py); not a count, so left out of comparisons."""

    def describe(self, max_seq_len: int) -> str:
        left_out = "".join(f"; {n} {why} dropped" for why, n in self.dropped.items())
        return (f"{self.examples} examples -> {self.rows} rows, {self.tokens:,} tokens; {self.truncated} cut to "
                f"data.max_seq_len={max_seq_len}, {self.no_target} dropped with no answer token left (longest "
                f"example {self.longest} tokens, median {self.median}){left_out}")


def build_rows(tokenizer, examples: list[dict], cfg: DataConfig, seed: int) -> tuple[list[dict], RowStats]:
    """Tokenized rows, packed when ``cfg.packing``, and what happened on the way. Examples are shuffled once before
    packing so that a row mixes examples from all over the source rather than its neighbours in file order."""
    tokenized = [formatting.tokenize_example(tokenizer, ex, cfg) for ex in examples]
    lengths = sorted(t["length"] for t in tokenized) or [0]
    kept = [t for t in tokenized if any(l != IGNORE for l in t["labels"])]
    if cfg.packing:
        random.Random(seed).shuffle(kept)
        kept = pack(kept, cfg.max_seq_len)
    stats = RowStats(examples=len(tokenized), truncated=sum(n > cfg.max_seq_len for n in lengths),
                     no_target=len(tokenized) - sum(any(l != IGNORE for l in t["labels"]) for t in tokenized),
                     rows=len(kept), tokens=sum(len(r["input_ids"]) for r in kept), longest=lengths[-1],
                     median=lengths[len(lengths) // 2])
    return kept, stats
