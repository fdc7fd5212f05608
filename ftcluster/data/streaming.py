"""Rows from a corpus larger than memory, prepared in one pass: each source row is read, checked, tokenized and
routed to its split as it comes; a seeded buffer of ``data.shuffle_buffer`` examples shuffles them before packing;
full rows are appended to the split's Arrow file a batch at a time. What is held is the buffer and one batch of
rows, whatever the corpus's size. The files land where ``cache`` keeps every run's rows, and workers
memory-map them the same way.

Two things differ from rows made from examples read whole, because both need the whole corpus at once:
- the shuffle before packing is a buffered one (a row mixes examples from within ``shuffle_buffer`` of each other
  in source order, rather than from anywhere), and
- without ``data.eval_split``, the held-out examples are chosen by a hash of (seed, row number), so about
  ``data.eval_fraction`` of them, rather than exactly that many.

The cache key names the source by its identity rather than its text (a file's path, size and modification time; a
directory's files'; a hub dataset's Arrow files in datasets' cache), so a later run finds the rows without reading the corpus.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
from array import array
from pathlib import Path

from ftcluster.config import DataConfig
from ftcluster.data import cache, formatting, packing, reading


def source_identity(cfg: DataConfig) -> str:
    """What names the source's content without reading it."""
    path = Path(cfg.source).expanduser().resolve()
    stamp = lambda f: f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
    if path.is_file():
        return "\n".join(stamp(reading.split_file(cfg, s).resolve())
                         for s in [cfg.split] + ([cfg.eval_split] if cfg.eval_split else []))
    if path.is_dir():
        return "\n".join(stamp(f) for f in sorted(path.rglob("*")) if f.is_file())
    splits = [cfg.split] + ([cfg.eval_split] if cfg.eval_split else [])
    # A hub dataset is kept as Arrow files in datasets' cache: name it by those, as a directory by its files.
    files = sorted({Path(f["filename"]) for s in splits for f in reading.hub_split(cfg, s).cache_files})
    return cfg.source + "\n" + "\n".join(stamp(f) for f in files)


def key(tokenizer, cfg: DataConfig, seed: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"data": cfg.model_dump(mode="json", exclude={"num_proc", "padding_free"}), "seed": seed,
                         "format": cache.FORMAT,
                         "streamed": True}, sort_keys=True).encode())
    h.update(cache.tokenizer_identity(tokenizer).encode())
    h.update(source_identity(cfg).encode())
    return h.hexdigest()[:16]


def held_out(seed: int | str, n: int, fraction: float) -> bool:
    """Whether source row ``n`` is an evaluation example: a hash of (seed, n), the same in every process."""
    digest = hashlib.blake2b(f"{seed}:{n}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


class SplitRows:
    """One split's rows as they are made: tokenized examples pass through a seeded shuffle buffer, then packing
    (when ``data.packing``), then the split's Arrow file; its stats are counted on the way."""

    def __init__(self, file: Path, cfg: DataConfig, seed: int):
        self.cfg, self.rng = cfg, random.Random(seed)
        self.buffer: list[dict] = []
        self.packer = packing.Packer(cfg.max_seq_len) if cfg.packing else None
        self.writer = cache.RowWriter(file)
        self.examples = self.truncated = self.no_target = self.tokens = 0
        self.lengths: collections.Counter = collections.Counter()

    def add(self, tokenized: dict) -> None:
        # 4 bytes a token in the buffer, not a Python int's 28 and a list slot's 8
        tokenized = {**tokenized, "input_ids": array("i", tokenized["input_ids"]),
                     "labels": array("i", tokenized["labels"])}
        self.examples += 1
        self.lengths[tokenized["length"]] += 1
        self.truncated += tokenized["length"] > self.cfg.max_seq_len
        if all(label == formatting.IGNORE for label in tokenized["labels"]):
            self.no_target += 1
            return
        if len(self.buffer) < self.cfg.shuffle_buffer:
            self.buffer.append(tokenized)
            return
        i = self.rng.randrange(len(self.buffer))
        self.buffer[i], tokenized = tokenized, self.buffer[i]
        self._pack(tokenized)

    def _pack(self, example: dict) -> None:
        row = self.packer.add(example) if self.packer else {k: example[k] for k in ("input_ids", "labels")}
        if row is not None:
            self.tokens += len(row["input_ids"])
            self.writer.add(row)

    def close(self) -> packing.RowStats:
        self.rng.shuffle(self.buffer)
        for example in self.buffer:
            self._pack(example)
        self.buffer = []
        last = self.packer.flush() if self.packer else None
        if last is not None:
            self.tokens += len(last["input_ids"])
            self.writer.add(last)
        rows = self.writer.close()
        return packing.RowStats(examples=self.examples, truncated=self.truncated, no_target=self.no_target, rows=rows,
                             tokens=self.tokens, longest=max(self.lengths, default=0), median=_median(self.lengths))


def _median(counts: collections.Counter) -> int:
    """The upper median of the counted lengths, as ``build_rows`` takes it from the sorted list."""
    total, seen = sum(counts.values()), 0
    for length in sorted(counts):
        seen += counts[length]
        if seen > total // 2:
            return length
    return 0


def _examples(cfg: DataConfig, split: str, dropped: dict[str, int]):
    """(row number, example) for every usable row of ``split``, each checked as it is read."""
    n = 0
    for n, (_, row) in enumerate(reading.iter_rows(cfg, split), 1):
        if n == 1:
            reading.check_fields(cfg, row)
        reading.check_row(cfg, row, n, split)
        if not reading.has_answer(cfg, row):
            dropped[reading.NO_ANSWER] = dropped.get(reading.NO_ANSWER, 0) + 1
            continue
        yield n, row
    if n == 0:
        raise ValueError(f"{cfg.source} ({split}) holds no rows")


def _routed(cfg: DataConfig, seed: int, dropped: dict[str, int]):
    """(is_eval, example) for every example of the pass, in source order. With ``data.validation_fraction`` the
    evaluation examples are that share of the training ones, and the held-out (test) examples are not used."""
    kept = 0
    validating = cfg.validation_fraction > 0
    for n, ex in _examples(cfg, cfg.split, dropped):
        if not cfg.eval_split and cfg.eval_fraction > 0 and held_out(seed, n, cfg.eval_fraction):
            if not validating:
                yield True, ex
            continue
        if validating and held_out(f"validation:{seed}", n, cfg.validation_fraction):
            yield True, ex
            continue
        yield False, ex
        kept += 1
        if cfg.max_examples and kept == cfg.max_examples:
            break
    if cfg.eval_split and not validating:
        for _, ex in _examples(cfg, cfg.eval_split, dropped):
            yield True, ex


CHUNK = 256
"""Examples a tokenizing process takes at a time."""

_worker: tuple = ()


def _start_worker(tokenizer, cfg: DataConfig) -> None:
    global _worker
    _worker = (tokenizer, cfg)


def _tokenize_chunk(chunk: list[tuple[bool, dict]]) -> list[tuple[bool, dict]]:
    tokenizer, cfg = _worker
    return [(is_eval, formatting.tokenize_example(tokenizer, ex, cfg)) for is_eval, ex in chunk]


def _tokenized(tokenizer, cfg: DataConfig, routed, processes: int):
    """``routed`` tokenized, in order, by ``processes`` processes (forked, each given the tokenizer once); at most
    two chunks per process are in flight, so reading never runs ahead of tokenizing by more than that."""
    if processes <= 1:
        for is_eval, ex in routed:
            yield is_eval, formatting.tokenize_example(tokenizer, ex, cfg)
        return
    import concurrent.futures
    import itertools
    import multiprocessing

    pending: collections.deque = collections.deque()
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"),
                                                initializer=_start_worker, initargs=(tokenizer, cfg)) as pool:
        while True:
            while len(pending) < 2 * processes and (chunk := list(itertools.islice(routed, CHUNK))):
                pending.append(pool.submit(_tokenize_chunk, chunk))
            if not pending:
                return
            yield from pending.popleft().result()


def build(tokenizer, cfg: DataConfig, seed: int, tmp: Path) -> packing.RowStats:
    """One pass over the source (and ``data.eval_split``'s), writing each split's rows into ``tmp``; returns the
    train split's stats."""
    dropped: dict[str, int] = {}
    train = SplitRows(tmp / "train.arrow", cfg, seed)
    evaluation = SplitRows(tmp / "evaluation.arrow", cfg, seed)
    processes = cfg.num_proc or min(8, os.cpu_count() or 1)
    for is_eval, tokenized in _tokenized(tokenizer, cfg, _routed(cfg, seed, dropped), processes):
        (evaluation if is_eval else train).add(tokenized)
    evaluation.close()
    stats = train.close()
    stats.dropped = dropped
    if not stats.examples:
        raise ValueError(f"{cfg.source} has no training examples" + (f" (left out: {dropped})" if dropped else ""))
    return stats


def prepared(tokenizer, cfg: DataConfig, seed: int, storage_path: str | Path) -> tuple[dict, packing.RowStats, str]:
    """Rows for every split, from the cache when there, else streamed from the source and saved; as
    ``cache.prepared``."""
    path = cache.directory(storage_path, key(tokenizer, cfg, seed))
    found = cache.load(path)
    if found is None:
        tmp = cache.new_directory(path)
        try:
            stats = build(tokenizer, cfg, seed, tmp)
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise
        cache.publish(tmp, path, stats)
        rows, stats = cache.load(path)
        stats.key = path.name
        return rows, stats, f"rows streamed from {cfg.source} in one pass and saved to {path}"
    rows, stats = found
    stats.key = path.name
    return rows, stats, f"rows reused from {path} (no tokenizing)"
