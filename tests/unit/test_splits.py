"""What a run trains on and what it evaluates on, for every kind of source: the two never share a row, and with
``data.validation_fraction`` (hyperparameter tuning) the held-out test rows are never read."""

import json

import pytest

from ftcluster import plan
from ftcluster.config import DataConfig
from ftcluster.data import reading, streaming


def _rows(path, tag, n):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": f"{tag} question {i}", "output": f"{tag} answer {i}"}) + "\n")
    return path


def _tags(examples):
    return {ex["instruction"].split()[0] for ex in examples}


def _instructions(examples):
    return {ex["instruction"] for ex in examples}


def test_a_file_source_evaluates_on_the_file_named_by_eval_split(tmp_path):
    train, held = _rows(tmp_path / "train.jsonl", "train", 40), _rows(tmp_path / "test.jsonl", "test", 10)
    cfg = DataConfig(source=str(train), eval_split=str(held))
    got = reading.load_examples(cfg, seed=0)
    assert _tags(got.train) == {"train"} and len(got.train) == 40
    assert _tags(got.evaluation) == {"test"} and len(got.evaluation) == 10
    assert plan.evaluation(cfg) == ("split", f"data.eval_split={held}")
    # Streamed, the same two files.
    rows = streaming._routed(cfg.model_copy(update={"streaming": "on"}), 0, {})
    routed = [(is_eval, ex["instruction"].split()[0]) for is_eval, ex in rows]
    assert {tag for is_eval, tag in routed if is_eval} == {"test"} and {t for e, t in routed if not e} == {"train"}


def test_a_file_without_eval_split_holds_out_rows_it_never_trains_on(tmp_path):
    src = _rows(tmp_path / "rows.jsonl", "row", 100)
    got = reading.load_examples(DataConfig(source=str(src), eval_fraction=0.2), seed=0)
    assert len(got.evaluation) == 20 and len(got.train) == 80
    assert not _instructions(got.train) & _instructions(got.evaluation)


@pytest.mark.parametrize("layout", ["directory", "hub"])
def test_a_directory_or_hub_layout_evaluates_on_its_named_split(tmp_path, layout):
    # "directory": train.jsonl and test.jsonl side by side; "hub": the hub's layout, data/<split>-*.parquet.
    folder = tmp_path / "corpus"
    if layout == "directory":
        _rows(folder / "train.jsonl", "train", 30)
        _rows(folder / "test.jsonl", "test", 8)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        (folder / "data").mkdir(parents=True)
        for split, n in (("train", 30), ("test", 8)):
            table = pa.Table.from_pylist([{"instruction": f"{split} question {i}", "output": f"{split} answer {i}"}
                                          for i in range(n)])
            pq.write_table(table, folder / "data" / f"{split}-00000-of-00001.parquet")
    cfg = DataConfig(source=str(folder), eval_split="test")
    got = reading.load_examples(cfg, seed=0)
    assert _tags(got.train) == {"train"} and len(got.train) == 30
    assert _tags(got.evaluation) == {"test"} and len(got.evaluation) == 8


def test_builtin_datasets_evaluate_on_examples_they_never_train_on():
    got = reading.load_examples(DataConfig(source="builtin:required-args", eval_fraction=0.25), seed=0)
    assert len(got.evaluation) > 200 and not _instructions(got.train) & _instructions(got.evaluation)


def test_validation_is_carved_from_the_training_rows_and_the_test_rows_are_never_read(tmp_path):
    train = _rows(tmp_path / "train.jsonl", "train", 50)
    held = _rows(tmp_path / "test.jsonl", "test", 10)
    cfg = DataConfig(source=str(train), eval_split=str(held), validation_fraction=0.2)
    held.write_text("not JSON: a run that read the test file would fail\n")
    got = reading.load_examples(cfg, seed=0)
    assert len(got.evaluation) == 10 and len(got.train) == 40 and _tags(got.evaluation) == {"train"}
    assert not _instructions(got.train) & _instructions(got.evaluation)
    assert reading.load_examples(cfg, seed=0).evaluation == got.evaluation  # the same in every process
    assert plan.evaluation(cfg)[0] == "validation"
    routed = list(streaming._routed(cfg.model_copy(update={"streaming": "on"}), 0, {}))
    validation = [ex for is_eval, ex in routed if is_eval]
    assert 2 <= len(validation) <= 20 and _tags(validation) == {"train"}
    assert not _instructions(validation) & _instructions(ex for is_eval, ex in routed if not is_eval)


def test_validation_of_a_builtin_or_held_out_source_leaves_the_test_examples_out(tmp_path):
    test = _instructions(reading.load_examples(DataConfig(source="builtin:required-args"), seed=0).evaluation)
    tuned = reading.load_examples(DataConfig(source="builtin:required-args", validation_fraction=0.1), seed=0)
    assert tuned.evaluation and not _instructions(tuned.evaluation) & test
    assert not _instructions(tuned.train) & test and not _instructions(tuned.train) & _instructions(tuned.evaluation)

    src = _rows(tmp_path / "rows.jsonl", "row", 100)
    test = _instructions(reading.load_examples(DataConfig(source=str(src), eval_fraction=0.2), seed=0).evaluation)
    tuned = reading.load_examples(DataConfig(source=str(src), eval_fraction=0.2, validation_fraction=0.25), seed=0)
    assert len(tuned.evaluation) == 20 and len(tuned.train) == 60
    assert not (_instructions(tuned.evaluation) | _instructions(tuned.train)) & test
    # Streamed: the hashed holdout is left out too.
    cfg = DataConfig(source=str(src), eval_fraction=0.2, streaming="on")
    streamed_test = {ex["instruction"] for is_eval, ex in streaming._routed(cfg, 0, {}) if is_eval}
    tuned = list(streaming._routed(cfg.model_copy(update={"validation_fraction": 0.25}), 0, {}))
    assert not {ex["instruction"] for _, ex in tuned} & streamed_test
