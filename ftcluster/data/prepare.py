"""The run's rows, prepared once on storage every node sees: streamed in one pass over a source larger than memory
(``streaming``), else built from the examples read whole (``cache``); either way kept under
``<output.storage_path>/.rows/<key>/`` and memory-mapped by every worker."""

from __future__ import annotations

from pathlib import Path

from ftcluster.config import DataConfig
from ftcluster.data import cache, reading
from ftcluster.data import streaming as streamed
from ftcluster.data.packing import RowStats


def rows_for(tokenizer, cfg: DataConfig, seed: int, storage_path: str | Path,
             streaming: bool) -> tuple[dict, RowStats, str]:
    """The run's rows by split, its stats and a line saying where they came from: streamed in one pass over the
    source when the plan says so, else from the examples read whole."""
    if streaming:
        return streamed.prepared(tokenizer, cfg, seed, storage_path)
    return cache.prepared(tokenizer, reading.load_examples(cfg, seed), cfg, seed, storage_path)
