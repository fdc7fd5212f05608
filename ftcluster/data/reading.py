"""Reading a dataset: local files (JSON lines, a JSON array, CSV, Parquet, each read as written), a local dataset
directory (its splits found as ``datasets`` finds them, its files read as written), a hub dataset through
``datasets``, or a builtin one; every row checked for its format's fields, and the evaluation
examples set apart from the training ones."""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path

from ftcluster.config import DataConfig


def _utf8(path: Path, raw: bytes, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line += raw.count(b"\n", 0, e.start)
        raise ValueError(f"{path} line {line}: not UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None


def is_json_array(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
        while head and not head.strip():
            head = f.read(4096)
    return head.lstrip().startswith(b"[")


def _json_rows(path: Path):
    """A JSON array of objects, or JSON lines, read line by line. Read with Python's json, so every value is exactly
    as written: the datasets loader would let pyarrow infer types (an answer that looks like a date becomes a
    timestamp). A JSON array is one document, read whole."""
    if is_json_array(path):
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
                _one_object(path)
                raise ValueError(f"{path} line {n}: not valid JSON ({e.msg}, column {e.colno})") from None
            yield n, _object(path, n, row)


def _one_object(path: Path) -> None:
    """Raise a clear error where a file that is not JSON lines is one JSON object (``{"data": [...]}``): what it
    holds is not rows."""
    if path.stat().st_size > 2**28:
        return
    try:
        whole = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return
    if isinstance(whole, dict):
        lists = [k for k, v in whole.items() if isinstance(v, list)]
        hint = f" (its rows may be the list under {lists[0]!r})" if lists else ""
        raise ValueError(f"{path} is one JSON object{hint}, not rows: write a JSON array of objects "
                         "([{...}, {...}]) or JSON lines (one object a line)")


def _object(path: Path, n: int, row) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{path} line {n}: a JSON {type(row).__name__}, not an object of named fields")
    return row


def _csv_rows(path: Path):
    """Rows of a CSV file with a header, every value the text as written."""
    import csv
    import io

    # utf-8-sig: a file Excel saved as "CSV UTF-8" starts with a byte-order mark, which would prefix the first
    # field's name.
    with io.TextIOWrapper(open(path, "rb"), encoding="utf-8-sig", newline="") as f:
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
    """A hub dataset, or a local directory that ``directory_splits`` leaves to datasets: kept on disk as Arrow files
    and memory-mapped."""
    path = Path(cfg.source).expanduser()
    return _loaded(str(path) if path.is_dir() else cfg.source, split)


@functools.cache
def directory_splits(source: str) -> dict[str, list[Path]] | None:
    """Split name -> its files, for a local directory whose files this module reads itself: the splits resolved
    as ``datasets`` resolves them (the README's configs, else split names in file and folder names). None where
    datasets must read the directory: other formats (Arrow, text, compressed files), or a README config with
    parsing options of its own (a JSON ``field``, a CSV separator), which are honoured that way. Read through
    datasets, a JSON or CSV directory would have its types inferred (an answer that looks like a date becomes a
    timestamp); read here, every value is as written, as with a file."""
    from datasets import load_dataset_builder

    builder = load_dataset_builder(source)
    splits = {str(k): [Path(f) for f in v] for k, v in (builder.config.data_files or {}).items()}
    if not splits or any(f.suffix not in _READERS for files in splits.values() for f in files):
        return None
    default = type(builder.config)(name=builder.config.name)
    ignored = {"name", "data_files", "data_dir", "description", "version"}
    if any(getattr(default, k, None) != v for k, v in vars(builder.config).items() if k not in ignored):
        return None
    return splits


@functools.cache
def _loaded(source: str, split: str):
    # Once a process: choosing the path (its size), naming the rows (its files) and reading it each ask for it.
    from datasets import load_dataset

    from ftcluster import patches, sources

    if Path(source).is_dir() or sources.hub_answers():
        return load_dataset(source, split=split)
    # The hub does not answer: read the datasets cache at once, rather than after the retries of its card.
    import datasets.config

    try:
        with patches.datasets_from_cache():
            rows = load_dataset(source, split=split)
    except ConnectionError:
        raise ConnectionError(f"{sources.hub_silent()}, and the datasets cache ({datasets.config.HF_DATASETS_CACHE}) "
                              "does not hold it") from None
    print(f"data: {source} ({split}) from the datasets cache ({datasets.config.HF_DATASETS_CACHE}): "
          f"{sources.hub_silent()}", flush=True)
    return rows


def split_file(cfg: DataConfig, split: str) -> Path | None:
    """The local file that holds ``split``: with a file as the source, the source for the train split and
    ``data.eval_split``'s file for the evaluation one (config.DataConfig refuses any other split of a file); None
    for a directory or hub dataset."""
    path = Path(cfg.source).expanduser()
    if not path.is_file():
        return None
    return Path(cfg.eval_split).expanduser() if cfg.eval_split and split == cfg.eval_split else path


def iter_rows(cfg: DataConfig, split: str):
    """(row number, row) for every row of ``split``, one at a time: no more of the source in memory than a line
    (a JSON array excepted)."""
    path = split_file(cfg, split)
    if path is not None:
        if path.suffix not in _READERS:
            raise ValueError(f"{path} has an unknown suffix; use .json, .jsonl, .parquet or .csv")
        yield from _READERS[path.suffix](path)
        return
    folder = Path(cfg.source).expanduser()
    splits = directory_splits(str(folder.resolve())) if folder.is_dir() else None
    if splits is None:
        yield from enumerate(hub_split(cfg, split), 1)
        return
    if split not in splits:
        field = "data.eval_split" if split == cfg.eval_split else "data.split"
        raise ValueError(f"{field}={split}: {cfg.source} has no such split (its splits: {', '.join(splits)}, "
                         "from its files' names or its README's configs); name one of them")
    n = 0
    for f in splits[split]:
        for _, row in _READERS[f.suffix](f):
            n += 1
            yield n, row


def _load_split(cfg: DataConfig, split: str) -> list[dict]:
    rows = [row for _, row in iter_rows(cfg, split)]
    if not rows and split_file(cfg, split) is not None:
        raise ValueError(f"{split_file(cfg, split)} holds no rows")
    return rows


STREAM_ABOVE = 2**30
"""Bytes of source above which ``data.streaming=auto`` streams (ftcluster.plan)."""


def source_bytes(cfg: DataConfig) -> int:
    """The source's size: a file's, a directory's files', a hub dataset's Arrow data (downloaded to disk first)."""
    path = Path(cfg.source).expanduser()
    if path.is_file():
        return path.stat().st_size + (split_file(cfg, cfg.eval_split).stat().st_size if cfg.eval_split else 0)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return hub_split(cfg, cfg.split).data.nbytes


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
        from ftcluster import extraction_data, pydoc_data

        builders = {**pydoc_data.BUILDERS, "builtin:extract-json": extraction_data.build}
        train, evaluation = builders[cfg.source](eval_fraction=cfg.eval_fraction or 0.1)
    else:
        rows = _load_split(cfg, cfg.split)
        _check_rows(cfg, rows, cfg.split)
        if cfg.eval_split and cfg.validation_fraction > 0:
            train, evaluation = rows, []  # the named evaluation rows are the test ones: left unread
        elif cfg.eval_split:
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
    if cfg.validation_fraction > 0:
        train, evaluation = validation_split(train, cfg.validation_fraction, seed)
    if cfg.max_examples:
        train = train[: cfg.max_examples]
    if not train:
        raise ValueError(f"{cfg.source} has no training examples" + (f" (left out: {dropped})" if dropped else ""))
    return Examples(train, evaluation, dropped)


def validation_split(train: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, validation): ``fraction`` of the training examples, chosen by a seeded shuffle, set apart to evaluate
    on in place of the held-out (test) examples (``data.validation_fraction``)."""
    order = list(range(len(train)))
    random.Random(f"validation:{seed}").shuffle(order)
    n = max(1, round(fraction * len(train)))
    return [train[i] for i in sorted(order[n:])], [train[i] for i in sorted(order[:n])]


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
