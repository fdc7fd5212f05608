"""Tokenized, packed rows prepared once and kept on disk: the driver tokenizes and packs while it checks the data,
saves the rows as Arrow files under ``<output.storage_path>/.rows/<key>/`` (storage every node sees), and each
worker memory-maps them instead of tokenizing the whole corpus again. A later run with the same data config,
tokenizer and examples finds them and says so.

The key hashes what decides the rows: the data config, the seed (it shuffles before packing), the tokenizer (its
full serialization and chat template) and the examples' text. Changing any of them makes new rows; nothing is
ever reused for different inputs. Rows are read with ``datasets.load_from_disk``, which memory-maps the Arrow
files: a worker holds the pages it touches, not a copy of the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path

from ftcluster import data
from ftcluster.config import DataConfig

SPLITS = ("train", "evaluation")


def _tokenizer_identity(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256((type(tokenizer).__name__ + body + str(tokenizer.chat_template or "")
                           + str(tokenizer.eos_token)).encode()).hexdigest()


def key(tokenizer, examples: data.Examples, cfg: DataConfig, seed: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"data": cfg.model_dump(mode="json"), "seed": seed}, sort_keys=True).encode())
    h.update(_tokenizer_identity(tokenizer).encode())
    for split in SPLITS:
        h.update(json.dumps(getattr(examples, split), sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def directory(storage_path: str | Path, k: str) -> Path:
    return Path(storage_path).expanduser().resolve() / ".rows" / k


def save(path: Path, rows: dict[str, list[dict]], stats: data.RowStats) -> None:
    """Write each split's rows and the train split's stats, atomically: a directory renamed into place, so a
    reader never sees half a cache and two writers of the same key leave one."""
    from datasets import Dataset

    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    for split, split_rows in rows.items():
        if not split_rows:  # datasets cannot read back a dataset saved with no rows (no Arrow shard is written)
            continue
        columns = {"input_ids": [r["input_ids"] for r in split_rows], "labels": [r["labels"] for r in split_rows]}
        if "position_ids" in split_rows[0]:
            columns["position_ids"] = [r["position_ids"] for r in split_rows]
        Dataset.from_dict(columns).save_to_disk(str(tmp / split))
    (tmp / "stats.json").write_text(json.dumps(asdict(stats)))
    try:
        os.rename(tmp, path)
    except OSError:  # another run wrote the same rows first
        shutil.rmtree(tmp, ignore_errors=True)


def load(path: Path) -> tuple[dict, data.RowStats] | None:
    """The splits (memory-mapped Arrow datasets, indexable like lists of rows) and the stats, or None."""
    if not (path / "stats.json").exists():
        return None
    from datasets import load_from_disk

    rows = {split: load_from_disk(str(path / split)) if (path / split).exists() else [] for split in SPLITS}
    return rows, data.RowStats(**json.loads((path / "stats.json").read_text()))


def prepared(tokenizer, examples: data.Examples, cfg: DataConfig, seed: int,
             storage_path: str | Path) -> tuple[dict, data.RowStats, str]:
    """Rows for every split, from the cache when there, else built and saved. Returns (rows by split, the train
    split's stats, a line saying which)."""
    path = directory(storage_path, key(tokenizer, examples, cfg, seed))
    found = load(path)
    if found is not None:
        rows, stats = found
        return rows, stats, f"rows reused from {path} (no tokenizing)"
    train, stats = data.build_rows(tokenizer, examples.train, cfg, seed)
    evaluation = data.build_rows(tokenizer, examples.evaluation, cfg, seed)[0] if examples.evaluation else []
    save(path, {"train": train, "evaluation": evaluation}, stats)
    return {"train": train, "evaluation": evaluation}, stats, f"rows saved to {path}"
