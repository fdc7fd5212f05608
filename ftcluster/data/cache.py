"""Tokenized, packed rows prepared once and kept on disk: the driver tokenizes and packs while it checks the data,
saves the rows as Arrow files under ``<output.storage_path>/.rows/<key>/`` (storage every node sees), and each
worker memory-maps them instead of tokenizing the whole corpus again. A corpus larger than memory is prepared the
same way in one streaming pass (``ftcluster/data/streaming.py``). A later run with the same data config,
tokenizer and examples finds them and says so.

The key hashes what decides the rows: the data config, the seed (it shuffles before packing), the tokenizer (its
full serialization and chat template) and the examples' text. Changing any of them makes new rows; nothing is
ever reused for different inputs. Rows are read back memory-mapped (:class:`ArrowRows`): a worker holds the pages
it touches, not a copy of the corpus.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path

from ftcluster.config import DataConfig
from ftcluster.data import packing, reading

SPLITS = ("train", "evaluation")


def tokenizer_identity(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256((type(tokenizer).__name__ + body + str(tokenizer.chat_template or "")
                           + str(tokenizer.eos_token)).encode()).hexdigest()


FORMAT = 3
"""How rows are made and stored (2: one Arrow stream file per split, int32 token lists; 3: the same, rows packed
best-fit decreasing by packing.pack). In every key, so a cache written in another format is never read."""


def key(tokenizer, examples: reading.Examples, cfg: DataConfig, seed: int) -> str:
    h = hashlib.sha256()
    # padding_free regroups the same rows as they are batched (packing.ShardedBatches): not part of their identity.
    data = cfg.model_dump(mode="json", exclude={"num_proc", "padding_free"})
    h.update(json.dumps({"data": data, "seed": seed, "format": FORMAT}, sort_keys=True).encode())
    h.update(tokenizer_identity(tokenizer).encode())
    for split in SPLITS:
        h.update(json.dumps(getattr(examples, split), sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def directory(storage_path: str | Path, k: str) -> Path:
    return Path(storage_path).expanduser().resolve() / ".rows" / k


class RowWriter:
    """Rows appended to one Arrow stream file a batch at a time, so writing holds one batch (about 64k tokens, 4
    bytes each), never the split. :class:`ArrowRows` memory-maps the file back."""

    BATCH_TOKENS = 1 << 16

    def __init__(self, file: Path):
        self.file, self.rows, self.batch, self.tokens, self.writer = file, 0, [], 0, None

    def add(self, row: dict) -> None:
        import numpy as np

        self.batch.append({k: np.asarray(v, dtype=np.int32) for k, v in row.items()})
        self.tokens += len(row["input_ids"])
        if self.tokens >= self.BATCH_TOKENS:
            self._write()

    def _write(self) -> None:
        import numpy as np
        import pyarrow as pa

        if not self.batch:
            return
        names = [k for k in ("input_ids", "labels", "position_ids") if k in self.batch[0]]
        lengths = [0] + [len(r["input_ids"]) for r in self.batch]
        offsets = pa.array(np.cumsum(lengths, dtype=np.int32))
        columns = [pa.ListArray.from_arrays(offsets, pa.array(np.concatenate([r[k] for r in self.batch])))
                   for k in names]
        table = pa.record_batch(columns, names=names)
        if self.writer is None:
            self.writer = pa.ipc.new_stream(str(self.file), table.schema)
        self.writer.write_batch(table)
        self.rows += len(self.batch)
        self.batch, self.tokens = [], 0

    def close(self) -> int:
        """Write what is left; returns the rows written. A split with no rows leaves no file."""
        self._write()
        if self.writer is not None:
            self.writer.close()
        return self.rows


class ArrowRows:
    """The rows of one Arrow stream file (:class:`RowWriter`'s), memory-mapped: ``rows[i]`` is row ``i`` as a dict of
    int lists, read from the mapped pages. pyarrow's own reader: ``datasets.Dataset.from_file`` does the same at the
    cost of importing ``datasets`` in every worker. Pickled as its file's path."""

    def __init__(self, file: str | Path):
        import pyarrow as pa

        self.file = str(file)
        table = pa.ipc.open_stream(pa.memory_map(self.file)).read_all()
        columns = {name: table.column(name) for name in table.column_names}
        # Per record batch, each column's offsets and values: numpy views of the mapped file, no copy.
        self.chunks: list[dict] = []
        self.starts = [0]  # the first row of each record batch, and the row count last
        for c in range(table.column(0).num_chunks if columns else 0):
            self.chunks.append({name: (_int32s(col.chunk(c).offsets), _int32s(col.chunk(c).values))
                                for name, col in columns.items()})
            self.starts.append(self.starts[-1] + len(table.column(0).chunk(c)))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i):
        """Row ``i`` (a dict of int lists), or the rows of a slice as a list, as a list of rows would give them."""
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)} in {self.file}")
        c = bisect.bisect_right(self.starts, i) - 1
        j = i - self.starts[c]
        return {name: values[offsets[j]:offsets[j + 1]].tolist() for name, (offsets, values) in self.chunks[c].items()}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __reduce__(self):
        return ArrowRows, (self.file,)


def _int32s(array):
    """A numpy view of an int32 Arrow array (a list column's offsets or values), no copy. ``Array.to_numpy`` gives
    the same view but imports pandas to look for its extension types, which no run otherwise needs."""
    import numpy as np
    import pyarrow as pa

    if array.type != pa.int32() or array.null_count:
        raise ValueError(f"expected int32 values without nulls, found {array.type} with {array.null_count} nulls")
    return np.frombuffer(array.buffers()[1], dtype=np.int32, count=len(array), offset=array.offset * 4)


def new_directory(path: Path) -> Path:
    """A fresh temporary directory beside ``path``, to fill and then ``publish`` under ``path``."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, path: Path, stats: packing.RowStats) -> None:
    """Write the stats and rename the filled directory into place, atomically: a reader never sees half a cache,
    and of two writers of the same key one wins and the other's copy is removed."""
    (tmp / "stats.json").write_text(json.dumps(asdict(stats)))
    try:
        os.rename(tmp, path)
    except OSError:  # another run wrote the same rows first
        shutil.rmtree(tmp, ignore_errors=True)


def save(path: Path, rows: dict[str, list[dict]], stats: packing.RowStats) -> None:
    """Write each split's rows and the train split's stats, atomically."""
    tmp = new_directory(path)
    for split, split_rows in rows.items():
        writer = RowWriter(tmp / f"{split}.arrow")
        for row in split_rows:
            writer.add(row)
        writer.close()
    publish(tmp, path, stats)


def load(path: Path) -> tuple[dict, packing.RowStats] | None:
    """The splits (memory-mapped Arrow datasets, indexable like lists of rows) and the stats, or None: also where
    the cache cannot be read (a disk fault, a copy cut short), which is then removed to be built again."""
    if not (path / "stats.json").exists():
        return None
    try:
        rows = {split: ArrowRows(path / f"{split}.arrow") if (path / f"{split}.arrow").exists() else []
                for split in SPLITS}
        return rows, packing.RowStats(**json.loads((path / "stats.json").read_text()))
    except Exception as e:  # noqa: BLE001 - whatever broke it, the cache is ours to rebuild, not the data's fault
        print(f"data: the row cache {path} cannot be read ({type(e).__name__}: {e}); removing it and preparing the "
              "rows again", flush=True)
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        return None


def prepared(tokenizer, examples: reading.Examples, cfg: DataConfig, seed: int,
             storage_path: str | Path) -> tuple[dict, packing.RowStats, str]:
    """Rows for every split, from the cache when there, else built and saved. Returns (rows by split, the train
    split's stats, a line saying which)."""
    path = directory(storage_path, key(tokenizer, examples, cfg, seed))
    found = load(path)
    if found is not None:
        rows, stats = found
        stats.key = path.name
        return rows, stats, f"rows reused from {path} (no tokenizing)"
    train, stats = packing.build_rows(tokenizer, examples.train, cfg, seed)
    stats.dropped, stats.key = dict(examples.dropped), path.name
    evaluation = packing.build_rows(tokenizer, examples.evaluation, cfg, seed)[0] if examples.evaluation else []
    save(path, {"train": train, "evaluation": evaluation}, stats)
    return {"train": train, "evaluation": evaluation}, stats, f"rows saved to {path}"
