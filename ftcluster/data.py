"""Data: a dataset (hub, local files or builtin) → tokenized examples with prompt-masked labels → packed rows →
per-worker, per-epoch shuffled micro batches.

Packing keeps examples apart without a materialised mask: every example's ``position_ids`` restart at 0, and the
batch carries no ``attention_mask``. transformers then derives sequence boundaries from the position resets and
builds a block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``), so a token never attends to
another example. The first label of every example is -100, so no example is trained to predict the next one.
"""

from __future__ import annotations

import bisect
import functools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ftcluster.config import DataConfig

IGNORE = -100
ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_TEMPLATE_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


# --- loading -----------------------------------------------------------------------------------------------------

def _utf8(path: Path, raw: bytes, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line += raw.count(b"\n", 0, e.start)
        raise ValueError(f"{path} line {line}: not UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None


def _is_json_array(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
        while head and not head.strip():
            head = f.read(4096)
    return head.lstrip().startswith(b"[")


def _json_rows(path: Path):
    """A JSON array of objects, or JSON lines, read line by line. Read with Python's json, so every value is exactly
    as written: the datasets loader would let pyarrow infer types (an answer that looks like a date becomes a
    timestamp). A JSON array is one document, read whole."""
    if _is_json_array(path):
        text = _utf8(path, path.read_bytes(), 1)
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        for n, row in enumerate(rows, 1):
            yield n, _object(path, n, row)
        return
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            line = _utf8(path, raw, n)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not valid JSON ({e.msg}, column {e.colno})") from None
            yield n, _object(path, n, row)


def _object(path: Path, n: int, row) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{path} line {n}: a JSON {type(row).__name__}, not an object of named fields")
    return row


def _csv_rows(path: Path):
    """Rows of a CSV file with a header, every value the text as written."""
    import csv
    import io

    with io.TextIOWrapper(open(path, "rb"), encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                yield reader.line_num, row
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} line {reader.line_num + 1}: not UTF-8 (byte 0x{e.object[e.start]:02x}); "
                             "save the file as UTF-8") from None


def _parquet_rows(path: Path):
    """Parquet stores its column types: nothing is inferred. Read a batch of rows at a time."""
    import pyarrow.parquet as pq

    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield n, row


_READERS = {".json": _json_rows, ".jsonl": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}


def hub_split(cfg: DataConfig, split: str):
    """A hub dataset or a local dataset directory, through datasets: kept on disk as Arrow files and memory-mapped."""
    path = Path(cfg.source).expanduser()
    return _loaded(str(path) if path.is_dir() else cfg.source, split)


@functools.cache
def _loaded(source: str, split: str):
    # Once a process: choosing the path (its size), naming the rows (its files) and reading it each ask for it.
    from datasets import load_dataset

    return load_dataset(source, split=split)


def iter_rows(cfg: DataConfig, split: str):
    """(row number, row) for every row of ``split``, one at a time: no more of the source in memory than a line
    (a JSON array excepted)."""
    path = Path(cfg.source).expanduser()
    if path.is_file():
        if path.suffix not in _READERS:
            raise ValueError(f"{cfg.source} has an unknown suffix; use .json, .jsonl, .parquet or .csv")
        yield from _READERS[path.suffix](path)
        return
    yield from enumerate(hub_split(cfg, split), 1)


def _load_split(cfg: DataConfig, split: str) -> list[dict]:
    rows = [row for _, row in iter_rows(cfg, split)]
    if not rows and Path(cfg.source).expanduser().is_file():
        raise ValueError(f"{cfg.source} holds no rows")
    return rows


STREAM_ABOVE = 2**30
"""Bytes of source above which ``data.streaming=auto`` streams."""


def source_bytes(cfg: DataConfig) -> int:
    """The source's size: a file's, a directory's files', a hub dataset's Arrow data (downloaded to disk first)."""
    path = Path(cfg.source).expanduser()
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return hub_split(cfg, cfg.split).data.nbytes


def streams(cfg: DataConfig) -> bool:
    """Whether rows are prepared in one streaming pass (``data.streaming``; ``auto``: sources over ``STREAM_ABOVE``
    bytes, except a JSON array, which is one document and read whole either way)."""
    if cfg.source.startswith("builtin:") or cfg.streaming == "off":
        return False
    if cfg.streaming == "on":
        return True
    path = Path(cfg.source).expanduser()
    if path.is_file() and path.suffix == ".json" and _is_json_array(path):
        return False
    return source_bytes(cfg) > STREAM_ABOVE


@dataclass
class Examples:
    """The raw examples of a run, and what was left out of them."""
    train: list[dict]
    evaluation: list[dict]
    dropped: dict[str, int]
    """Examples left out, by reason (e.g. chat rows without an assistant turn): counted, never silently lost."""


def load_examples(cfg: DataConfig, seed: int) -> Examples:
    """The train and eval examples. Every row is checked (its fields present, and text where text is needed):
    a bad row is an error naming the row and the field."""
    dropped: dict[str, int] = {}
    if cfg.source.startswith("builtin:"):
        from ftcluster import pydoc_data

        train, evaluation = pydoc_data.BUILDERS[cfg.source](eval_fraction=cfg.eval_fraction or 0.1)
    else:
        rows = _load_split(cfg, cfg.split)
        _check_rows(cfg, rows, cfg.split)
        if cfg.eval_split:
            evaluation = _load_split(cfg, cfg.eval_split)
            _check_rows(cfg, evaluation, cfg.eval_split)
            train = rows
        elif cfg.eval_fraction > 0 and len(rows) > 1:
            order = list(range(len(rows)))
            random.Random(seed).shuffle(order)
            n_eval = max(1, round(cfg.eval_fraction * len(rows)))
            evaluation, train = [rows[i] for i in order[:n_eval]], [rows[i] for i in order[n_eval:]]
        else:
            train, evaluation = rows, []
        if cfg.format == "chat":
            train, evaluation = _with_answers(cfg, train, dropped), _with_answers(cfg, evaluation, dropped)
    if cfg.max_examples:
        train = train[: cfg.max_examples]
    if not train:
        raise ValueError(f"{cfg.source} has no training examples" + (f" (left out: {dropped})" if dropped else ""))
    return Examples(train, evaluation, dropped)


def _with_answers(cfg: DataConfig, rows: list[dict], dropped: dict[str, int]) -> list[dict]:
    kept = [r for r in rows if has_answer(cfg, r)]
    if len(kept) < len(rows):
        dropped[NO_ANSWER] = dropped.get(NO_ANSWER, 0) + len(rows) - len(kept)
    return kept


def _kind(value) -> str:
    return "missing" if value is None else f"a {type(value).__name__} ({str(value)[:40]!r}), not text"


def _needed(cfg: DataConfig) -> tuple[str, ...]:
    return {"alpaca": ("instruction", "output"), "chat": (cfg.messages_field,), "text": (cfg.text_field,)}[cfg.format]


def check_fields(cfg: DataConfig, row: dict) -> None:
    """The first row has the fields its format needs; the message says what to set when the whole source has other
    fields."""
    need = _needed(cfg)
    missing = [f for f in need if f not in row]
    if missing:
        raise ValueError(
            f"data.format={cfg.format} needs fields {list(need)}, but {cfg.source} has {sorted(row)}; "
            f"set data.format (alpaca|chat|text) or data.text_field / data.messages_field"
        )


def check_row(cfg: DataConfig, row: dict, i: int, split: str) -> None:
    """A row has its format's fields, as text. The message names the row (1-based, in file order) and the field."""
    where = f"{cfg.source} ({split}) row {i}"
    if cfg.format == "chat":
        messages = row.get(cfg.messages_field)
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: field '{cfg.messages_field}' is {_kind(messages)}: a list of "
                             "{role, content} messages is needed")
        for j, m in enumerate(messages, 1):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: message {j} of '{cfg.messages_field}' needs 'role' and 'content' "
                                 f"as text, got {m!r:.80}")
        return
    for f in _needed(cfg):
        if not isinstance(row.get(f), str):
            raise ValueError(f"{where}: field '{f}' is {_kind(row.get(f))}")
    if cfg.format == "alpaca" and row.get("input") is not None and not isinstance(row["input"], str):
        raise ValueError(f"{where}: field 'input' is {_kind(row['input'])}")


def _check_rows(cfg: DataConfig, rows: list[dict], split: str) -> None:
    check_fields(cfg, rows[0])
    for i, row in enumerate(rows, 1):
        check_row(cfg, row, i, split)


def has_answer(cfg: DataConfig, row: dict) -> bool:
    """Chat rows need an assistant turn to train on; rows without one are dropped and counted."""
    return cfg.format != "chat" or any(m["role"] == "assistant" for m in row[cfg.messages_field])


NO_ANSWER = "chat rows without an assistant turn"


# --- rendering and tokenizing ------------------------------------------------------------------------------------

def alpaca_messages(ex: dict) -> list[dict]:
    user = ex["instruction"] if not ex.get("input") else f"{ex['instruction']}\n\n{ex['input']}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": ex["output"]}]


def prompt_text(tokenizer, ex: dict, cfg: DataConfig) -> str:
    """The prompt a model sees before its answer (used for training and for generation at eval)."""
    if tokenizer.chat_template:
        msgs = alpaca_messages(ex)[:1] if cfg.format == "alpaca" else ex[cfg.messages_field][:-1]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    template = ALPACA_TEMPLATE_INPUT if ex.get("input") else ALPACA_TEMPLATE
    return template.format(**ex)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat_pieces(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation split into (text, is_target) pieces: each assistant turn (with its end-of-turn
    marker) is a target; everything else, including the assistant header, is prompt."""
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    pieces, done = [], ""
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        upto = render(messages[: i + 1], False)
        if not (before.startswith(done) and upto.startswith(before)):
            raise ValueError("the tokenizer's chat template does not render conversations prefix by prefix")
        pieces += [(before[len(done):], False), (upto[len(before):], True)]
        done = upto
    full = render(messages, False)
    if len(full) > len(done):
        pieces.append((full[len(done):], False))
    return pieces


def tokenize_example(tokenizer, ex: dict, cfg: DataConfig) -> dict:
    """input_ids and labels; labels are -100 on prompt tokens unless ``train_on_prompt``."""
    if cfg.format == "text":
        pieces = [(ex[cfg.text_field] + (tokenizer.eos_token or ""), True)]
    elif tokenizer.chat_template:
        msgs = alpaca_messages(ex) if cfg.format == "alpaca" else ex[cfg.messages_field]
        pieces = _chat_pieces(tokenizer, msgs)
    else:
        pieces = [(prompt_text(tokenizer, ex, cfg), False), (ex["output"] + (tokenizer.eos_token or ""), True)]
    input_ids, labels = [], []
    for text, target in pieces:
        ids = _ids(tokenizer, text)
        input_ids += ids
        labels += ids if (target or cfg.train_on_prompt) else [IGNORE] * len(ids)
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        input_ids, labels = [tokenizer.bos_token_id] + input_ids, [IGNORE] + labels
    length = len(input_ids)
    input_ids, labels = input_ids[: cfg.max_seq_len], labels[: cfg.max_seq_len]
    labels[0] = IGNORE  # never predict an example's first token from whatever precedes it in a packed row
    return {"input_ids": input_ids, "labels": labels, "length": length}


# --- packing and batching ----------------------------------------------------------------------------------------

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


def pack(examples: list[dict], max_len: int) -> list[dict]:
    """Best-fit decreasing: the longest example first, each into the row with the least room that still holds it,
    a new row when none does. With short examples to fill the gaps, rows end within a few tokens of ``max_len``;
    greedy packing in order (``Packer``, which a stream needs) left about half an example of padding per row and a
    part-filled last row (4.5% of the llama-1b suite's row tokens, computed and paid for on every step). Examples of
    equal length keep their order, so the rows depend only on the (seeded) order they come in."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens still free, row index), ascending
    for i in order:
        n = len(examples[i]["input_ids"])
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
    out = []
    for members in rows:
        row = Packer._empty()
        for i in members:
            row["input_ids"] += examples[i]["input_ids"]
            row["labels"] += examples[i]["labels"]
            row["position_ids"] += range(len(examples[i]["input_ids"]))
        out.append(row)
    return out


def collate(rows: list[dict], pad_id: int, packed: bool, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row (or ``pad_to``). Packed rows pad with a fresh position run, so the padding is
    its own 'sequence' and masks nothing real; unpacked rows get an attention_mask."""
    width = pad_to or max(len(r["input_ids"]) for r in rows)
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
    if packed:
        batch["position_ids"] = torch.tensor(pos)
        batch.update(_cumulative_lengths(pos, width))
    else:
        batch["attention_mask"] = torch.tensor(mask)
    return batch


def _cumulative_lengths(position_rows: list[list[int]], width: int) -> dict:
    """Boundaries of every example (and padding run) across the flattened batch, for varlen attention:
    ``cu_seq_lens`` (int32, starts at 0), and as the longest sequence the row width, a bound the kernel only sizes
    its grid by: the same int in every batch, where the longest example's length would make each new value a
    recompile of compiled layers. Plain ints stay on the host (no device sync)."""
    bounds, offset = [0], 0
    for row in position_rows:
        starts = [i for i, p in enumerate(row) if p == 0] + [len(row)]
        bounds += [offset + b for b in starts[1:]]
        offset += len(row)
    cu = torch.tensor(bounds, dtype=torch.int32)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": width, "max_length_k": width}


@dataclass
class ShardedBatches:
    """Micro batches for one worker: each epoch reshuffles all rows with (seed, epoch), then worker ``rank`` takes
    every ``world``-th row. Every worker gets the same number of batches (DeepSpeed's collectives need it), a
    multiple of ``accumulation``. Each batch holds ``num_tokens``, its count of real (unpadded) tokens."""

    rows: list[dict]
    micro_batch_size: int
    rank: int
    world: int
    seed: int
    pad_id: int
    packed: bool
    pad_to: int | None = None
    accumulation: int = 1

    def __post_init__(self):
        self.per_worker = len(self.rows) // self.world
        if self.per_worker < self.micro_batch_size:
            raise ValueError(
                f"the data gives {len(self.rows)} rows, fewer than num_workers × micro_batch_size "
                f"({self.world} × {self.micro_batch_size}); add data, or lower training.micro_batch_size"
            )

    def __len__(self) -> int:
        n = self.per_worker // self.micro_batch_size
        return n - n % self.accumulation  # an optimizer step never straddles two epochs

    def order(self, epoch: int) -> list[int]:
        idx = list(range(len(self.rows)))
        random.Random(self.seed * 100003 + epoch).shuffle(idx)
        return idx[self.rank :: self.world][: self.per_worker]

    def epoch(self, epoch: int, start_batch: int = 0):
        """Batches of ``epoch`` from ``start_batch`` on (a resumed run skips what it already trained on)."""
        idx = self.order(epoch)
        b = self.micro_batch_size
        for i in range(start_batch, len(self)):
            rows = [self.rows[j] for j in idx[i * b : (i + 1) * b]]
            yield collate(rows, self.pad_id, self.packed, self.pad_to)


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

    def describe(self, max_seq_len: int) -> str:
        left_out = "".join(f"; {n} {why} dropped" for why, n in self.dropped.items())
        return (f"{self.examples} examples -> {self.rows} rows, {self.tokens:,} tokens; {self.truncated} cut to "
                f"data.max_seq_len={max_seq_len}, {self.no_target} dropped with no answer token left (longest "
                f"example {self.longest} tokens, median {self.median}){left_out}")


def build_rows(tokenizer, examples: list[dict], cfg: DataConfig, seed: int) -> tuple[list[dict], RowStats]:
    """Tokenized rows, packed when ``cfg.packing``, and what happened on the way. Examples are shuffled once before
    packing so that a row mixes examples from all over the source rather than its neighbours in file order."""
    tokenized = [tokenize_example(tokenizer, ex, cfg) for ex in examples]
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
