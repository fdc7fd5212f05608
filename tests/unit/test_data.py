import json

from pathlib import Path

import pytest
import torch

from ftcluster import plan
from ftcluster.data import cache, formatting, packing, prepare, reading, streaming
from ftcluster.config import DataConfig

EX = {"instruction": "What does `math.sqrt(x)` do?", "input": "", "output": "Return the square root of x."}


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def decode_targets(tok, ex):
    return tok.decode([i for i, l in zip(ex["input_ids"], ex["labels"]) if l != formatting.IGNORE])


def test_alpaca_loss_covers_only_the_response_and_its_end_of_turn(tok):
    ex = formatting.tokenize_example(tok, EX, DataConfig(format="alpaca"))
    assert decode_targets(tok, ex) == "Return the square root of x.<|im_end|>\n"
    assert tok.decode(ex["input_ids"]).startswith("<|im_start|>user\nWhat does")


def test_train_on_prompt_makes_every_token_but_the_first_a_target(tok):
    ex = formatting.tokenize_example(tok, EX, DataConfig(format="alpaca", train_on_prompt=True))
    assert ex["labels"][0] == formatting.IGNORE and ex["labels"][1:] == ex["input_ids"][1:]


def test_chat_loss_covers_every_assistant_turn_and_no_user_turn(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."}]
    ex = formatting.tokenize_example(tok, {"messages": msgs}, DataConfig(source="chats.jsonl", format="chat"))
    assert decode_targets(tok, ex) == "Hello.<|im_end|>\nGoodbye.<|im_end|>\n"


def test_text_format_trains_on_all_tokens_and_truncates(tok):
    cfg = DataConfig(source="texts.jsonl", format="text", max_seq_len=16)
    ex = formatting.tokenize_example(tok, {"text": "word " * 100}, cfg)
    assert len(ex["input_ids"]) == 16 and ex["labels"][1:] == ex["input_ids"][1:]


def test_wrong_fields_name_the_format_and_the_fix(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"question": "a", "answer": "b"}\n' * 4)
    with pytest.raises(ValueError, match=r"data.format=alpaca needs fields \['instruction', 'output'\].*answer"):
        reading.load_examples(DataConfig(source=str(f)), seed=0)


def test_local_jsonl_loads_with_a_held_out_split(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(f'{{"instruction": "q{i}", "output": "a{i}"}}\n' for i in range(40)))
    loaded = reading.load_examples(DataConfig(source=str(f), eval_fraction=0.25), seed=0)
    train, evaluation = loaded.train, loaded.evaluation
    assert len(train) == 30 and len(evaluation) == 10
    assert not {e["instruction"] for e in train} & {e["instruction"] for e in evaluation}


def test_builtin_pydoc_eval_split_shares_no_answer_with_train():
    loaded = reading.load_examples(DataConfig(source="builtin:pydoc"), seed=0)
    train, evaluation = loaded.train, loaded.evaluation
    assert len(train) > 300 and len(evaluation) > 30
    assert not {e["output"] for e in train} & {e["output"] for e in evaluation}


def test_packing_restarts_positions_and_ignores_each_first_label():
    exs = [{"input_ids": list(range(10, 10 + n)), "labels": [formatting.IGNORE] + list(range(11, 10 + n))} for n in (5, 4, 6, 3)]
    rows = packing.pack(exs, max_len=10)
    # Best fit, longest first: 6 opens a row, 5 does not fit beside it, 4 fills the first row to 10, 3 joins the 5.
    assert [len(r["input_ids"]) for r in rows] == [10, 8]
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert rows[0]["labels"][6] == formatting.IGNORE and rows[1]["input_ids"] == exs[0]["input_ids"] + exs[3]["input_ids"]


def test_best_fit_packing_fills_rows_where_greedy_packing_leaves_padding():
    """Examples of 20-200 tokens (the builtin sets' range) into 2048-token rows: every example lands whole in
    exactly one row, and every row but one has less room left than the shortest example, where greedy packing in
    order leaves several percent of every row empty."""
    import random

    rng = random.Random(0)
    exs = [{"input_ids": [i] * (n := rng.randint(20, 200)), "labels": [i] * n} for i in range(3000)]
    rows = packing.pack(exs, max_len=2048)
    assert sorted(t for r in rows for t in set(r["input_ids"])) == list(range(3000))
    assert all(len(r["input_ids"]) <= 2048 for r in rows)
    fill = sum(len(r["input_ids"]) for r in rows) / (2048 * len(rows))
    greedy = packing.Packer(2048)
    greedy_rows = [r for ex in exs if (r := greedy.add(ex)) is not None] + [greedy.flush()]
    greedy_fill = sum(len(r["input_ids"]) for r in greedy_rows) / (2048 * len(greedy_rows))
    assert sum(len(r["input_ids"]) > 2048 - 20 for r in rows) >= len(rows) - 1
    assert fill > 0.99 and greedy_fill < 0.97


def test_packed_examples_do_not_attend_to_each_other(tiny_model):
    """A packed row gives each example exactly the logits it gets alone: the block-diagonal mask holds. (With
    use_cache=True transformers skips packed-sequence detection, which is why the model builder turns it off.)"""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(5, 500, (7,), generator=g).tolist(), torch.randint(5, 500, (5,), generator=g).tolist()
    rows = packing.pack([{"input_ids": a, "labels": a}, {"input_ids": b, "labels": b}], max_len=16)
    batch = packing.collate(rows, pad_id=0, packed=True, pad_to=16)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone_b = model(input_ids=torch.tensor([b])).logits[0]
        alone_a = model(input_ids=torch.tensor([a])).logits[0]
    torch.testing.assert_close(packed[:7], alone_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed[7:12], alone_b, atol=1e-4, rtol=1e-4)
    assert int(batch["num_tokens"]) == 12
    # The same boundaries as cumulative lengths for varlen attention, the trailing padding counted in the last
    # example (causal: no real token sees it). The longest sequence the kernel is told is the row width.
    assert batch["cu_seq_lens_q"].tolist() == [0, 7, 16] and batch["max_length_q"] == 16


def test_a_batch_of_one_example_rows_has_one_boundary_per_row_whatever_their_padding():
    """What attention reads to attend such a batch as plain causal rows (ftcluster/attention.py): one boundary per
    row, a row's padding in its example; a row of two examples still has its own boundary between them."""
    rows = [{"input_ids": [1] * n, "labels": [1] * n, "position_ids": list(range(n))} for n in (16, 9)]
    one_each = packing.collate(rows, pad_id=0, packed=True, pad_to=16)
    assert one_each["cu_seq_lens_q"].tolist() == [0, 16, 32]
    assert one_each["position_ids"][1].tolist() == list(range(9)) + list(range(7))  # padding: its own positions
    two = {"input_ids": [1] * 12, "labels": [1] * 12, "position_ids": list(range(5)) + list(range(7))}
    assert packing.collate([rows[1], two], pad_id=0, packed=True, pad_to=16)["cu_seq_lens_q"].tolist() == [0, 16, 21, 32]


def test_batches_with_different_example_counts_compile_once():
    """What a compiled layer receives of the packing (the boundaries and the longest-sequence bound) compiles
    once across batches holding 2, 3 and 5 examples; unmarked, each new count was a recompile."""
    from ftcluster import engine

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    @torch.compile(backend=counting)
    def uses_the_packing(x, cu_seq_lens_q, max_length_q):
        lengths = cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]
        return x * lengths.float().mean() + max_length_q

    torch._dynamo.reset()
    for counts in ([3, 5], [2, 2, 4], [1, 1, 1, 3, 2]):
        rows = [{"input_ids": [1] * n, "labels": [1] * n, "position_ids": list(range(n))} for n in counts]
        batch = engine.to_device(packing.collate(rows, pad_id=0, packed=True, pad_to=16), torch.device("cpu"))
        uses_the_packing(torch.ones(2), batch["cu_seq_lens_q"], batch["max_length_q"])
    assert len(graphs) == 1


def _short_examples(count: int, seed: int = 0) -> list[dict]:
    """Examples of 57-176 tokens, the default suite's range, each token its example's number."""
    import random

    rng = random.Random(seed)
    return [{"input_ids": [i] * (n := rng.randint(57, 176)), "labels": [i] * n} for i in range(count)]


def test_padding_free_micro_batches_hold_every_example_once_with_one_rows_padding():
    """data.padding_free: the examples of rows of 512 regrouped into rows of 8 x 512, one a micro batch: every
    example whole in one micro batch of the epoch (two workers, accumulation 2), each micro batch one row of 4,096
    with less padding than 8 rows of 512 hold, and varlen boundaries no sequence of which is longer than 512 (the
    trailing padding in sequences of its own), so the kernel is told the same bound as before."""
    rows = packing.pack(_short_examples(2000), 512)
    shards = [packing.ShardedBatches(rows, 8, r, 2, seed=1, pad_id=0, packed=True, pad_to=512, accumulation=2,
                                     padding_free=True) for r in range(2)]
    batches = [b for s in shards for b in s.epoch(0)]
    assert all(b["input_ids"].shape == (1, 4096) for b in batches)
    seen = [ex for b in batches for ex in torch.unique(b["input_ids"][0][b["labels"][0] != -100]).tolist()]
    assert len(seen) == len(set(seen)) and len(seen) > 0.95 * 2000  # whole steps only: the rest waits an epoch
    for b in batches:
        cu = b["cu_seq_lens_q"].tolist()
        assert cu[0] == 0 and cu[-1] == 4096 and max(y - x for x, y in zip(cu, cu[1:])) <= 512
        assert b["max_length_q"] == 512
    free_fill = sum(int(b["num_tokens"]) for b in batches) / (4096 * len(batches))
    rows_fill = sum(len(r["input_ids"]) for r in rows) / (512 * len(rows))
    assert free_fill > 0.995 and rows_fill < free_fill - 0.005
    assert len(shards[0]) == len(shards[1]) and len(shards[0]) % 2 == 0


def test_a_padding_free_micro_batch_trains_as_its_examples_in_rows(tiny_model):
    """The same examples as two packed rows of 24 and as one padding-free row of 48: the same loss and the same
    gradients, the examples kept apart in the long row as in the short ones (sdpa, from the position resets)."""
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    exs = [{"input_ids": (t := torch.randint(5, 500, (n,), generator=g).tolist()), "labels": [-100] + t[1:]}
           for n in (11, 9, 13, 7)]
    rows = packing.pack(exs, max_len=24)
    assert len(rows) == 2
    free = packing.ShardedBatches(rows, 2, 0, 1, seed=0, pad_id=0, packed=True, pad_to=24, padding_free=True)
    (long_row,) = list(free.epoch(0))
    short_rows = packing.collate(rows, pad_id=0, packed=True, pad_to=24)
    assert long_row["input_ids"].shape == (1, 48) and short_rows["input_ids"].shape == (2, 24)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    out = []
    for batch in (short_rows, long_row):
        model.zero_grad()
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                     use_cache=False).loss
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(out[1][0], out[0][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(out[1][1], out[0][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _ids(shard, epoch=0, start_row=0):
    return [[row[0] for row in b["input_ids"].tolist()] for b in shard.epoch(epoch, start_row)]


def test_shards_are_disjoint_equal_and_reshuffled_each_epoch():
    rows = [{"input_ids": [i], "labels": [i]} for i in range(103)]
    shards = [packing.ShardedBatches(rows, 4, r, 3, seed=1, pad_id=0, packed=False) for r in range(3)]
    taken = [sum(_ids(s), []) for s in shards]
    assert len({len(t) for t in taken}) == 1 and len(shards[0]) == 34 // 4
    assert not set(taken[0]) & set(taken[1]) and not set(taken[1]) & set(taken[2])
    assert _ids(shards[0]) == _ids(packing.ShardedBatches(rows, 4, 0, 3, 1, 0, False))  # deterministic
    assert _ids(shards[0], epoch=1) != _ids(shards[0])


def test_resumed_epoch_yields_the_remaining_batches_unchanged():
    rows = [{"input_ids": [i, i + 1], "labels": [i, i + 1]} for i in range(40)]
    s = packing.ShardedBatches(rows, 2, 0, 2, seed=3, pad_id=0, packed=False)
    full = [b["input_ids"].tolist() for b in s.epoch(1)]
    assert [b["input_ids"].tolist() for b in s.epoch(1, start_row=4 * s.rows_per_micro_step)] == full[4:]


def test_an_epoch_resumed_on_another_worker_count_sees_every_row_once_in_the_same_global_batches():
    """Two workers (micro batch 2, accumulation 2) train 3 optimizer steps; the rest of the epoch runs on one worker
    (accumulation 4, the same global batch of 8 rows) from the rows taken so far: every row of the epoch once, and
    each optimizer step the rows an uninterrupted two-worker run would have given it."""
    rows = [{"input_ids": [i], "labels": [i]} for i in range(70)]

    def steps(world, accumulation, start_row=0, limit=None):
        """The rows of each optimizer step, over all workers."""
        shards = [packing.ShardedBatches(rows, 2, r, world, 5, 0, False, accumulation=accumulation)
                  for r in range(world)]
        per_rank = [_ids(s, 0, start_row) for s in shards]
        micro = [sum((per_rank[r][i] for r in range(world)), []) for i in range(len(per_rank[0]))]
        out = [sorted(sum(micro[i:i + accumulation], [])) for i in range(0, len(micro), accumulation)]
        return out[:limit]

    uninterrupted = steps(2, 2)
    first = steps(2, 2, limit=3)
    rest = steps(1, 4, start_row=3 * 8)
    assert first + rest == uninterrupted and len(uninterrupted) == 70 // 8
    seen = sum(first + rest, [])
    assert len(seen) == len(set(seen)) == 64  # 8 whole global batches; the 6 rows over wait for the next epoch


def test_batches_per_epoch_are_whole_accumulation_groups():
    rows = [{"input_ids": [i], "labels": [i]} for i in range(22)]
    assert len(packing.ShardedBatches(rows, 1, 0, 2, 0, 0, False, accumulation=4)) == 8


def test_too_little_data_names_the_fix():
    with pytest.raises(ValueError, match="micro_batch_size"):
        packing.ShardedBatches([{"input_ids": [1], "labels": [1]}] * 3, 2, 0, 2, 0, 0, False)


def test_required_args_task_answers_from_the_signature_and_holds_out_unseen_prompts():
    from ftcluster import pydoc_data

    train, evaluation = pydoc_data.build_required_args(0.1)
    assert len(train) > 500 and len(evaluation) > 40
    assert not {e["instruction"] for e in train} & {e["instruction"] for e in evaluation}
    by_id = {e["id"]: e for e in train + evaluation}
    assert by_id["os.path.join"]["output"] == "a"  # join(a, *p): *p is optional
    assert by_id["shutil.copyfile"]["output"] == "src, dst"
    assert sum(e["output"] == "none" for e in train) < len(train) / 2


def test_extraction_task_answers_from_the_sentence_in_json_and_holds_out_unseen_sentences():
    import datetime as dt

    from ftcluster import extraction_data

    got = reading.load_examples(DataConfig(source="builtin:extract-json", eval_fraction=0.25), 0)
    train, evaluation = got.train, got.evaluation
    assert len(train) > 800 and len(evaluation) >= 200  # one answer moves the score by at most 0.5 point
    assert not {e["input"] for e in train} & {e["input"] for e in evaluation}
    for ex in train + evaluation:
        answer = json.loads(ex["output"])
        assert list(answer) == ["name", "city", "date", "amount"]
        assert answer["name"] in ex["input"] and answer["city"] in ex["input"]
        day = dt.date.fromisoformat(answer["date"])
        assert str(day.year) in ex["input"] and (extraction_data.MONTHS[day.month - 1][:3] in ex["input"]
                                                 or answer["date"] in ex["input"])
        assert f"{answer['amount']:,}" in ex["input"] or str(answer["amount"]) in ex["input"]
    assert len({e["input"].split(" ", 3)[-1][:12] for e in train}) > 100  # phrasings vary, not one template
    assert extraction_data.examples() == extraction_data.examples()


def test_builtin_datasets_are_identical_in_every_process():
    # Defaults such as `<function f at 0x7f...>` carry a per-process address, and logging.shutdown's default lists
    # the handlers registered so far (a Ray worker has Ray's): prompts must show neither, or the driver and the
    # workers would build different rows.
    import subprocess
    import sys

    code = ("import hashlib, json; from ftcluster import pydoc_data as P; "
            "print(hashlib.sha1(json.dumps([P.build(0.1), P.build_required_args(0.1)]).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True,
                              check=True).stdout for prelude in ("", "", "import logging; logging.getLogger('x')"
                                                                 ".addHandler(logging.StreamHandler()); ")}
    assert len(digests) == 1


def test_answers_that_look_like_dates_or_numbers_reach_the_tokenizer_as_written(tmp_path):
    rows = [{"instruction": f"q{i}", "output": "2001-05-01", "input": "007"} for i in range(6)]
    for name, text in (("d.jsonl", "".join(json.dumps(r) + "\n" for r in rows)), ("d.json", json.dumps(rows)),
                       ("d.csv", "instruction,output,input\n" + "".join(f"q{i},2001-05-01,007\n" for i in range(6)))):
        f = tmp_path / name
        f.write_text(text)
        loaded = reading.load_examples(DataConfig(source=str(f), eval_fraction=0.0), seed=0)
        assert all(r["output"] == "2001-05-01" and r["input"] == "007" for r in loaded.train), name


def test_a_dataset_directory_is_split_by_its_file_names_and_read_as_written(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "data").mkdir(parents=True)
    for split, n in (("train", 5), ("test", 3)):
        for shard in range(2):
            rows = [{"instruction": f"{split} q{shard}.{i}", "output": "2001-05-01", "input": "007"} for i in range(n)]
            (folder / "data" / f"{split}-0000{shard}-of-00002.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rows))
    got = reading.load_examples(DataConfig(source=str(folder), eval_split="test"), seed=0)
    assert len(got.train) == 10 and len(got.evaluation) == 6
    assert {r["instruction"].split()[0] for r in got.train} == {"train"}
    assert {r["instruction"].split()[0] for r in got.evaluation} == {"test"}
    assert all(r["output"] == "2001-05-01" and r["input"] == "007" for r in got.train + got.evaluation)
    with pytest.raises(ValueError, match=r"data.eval_split=validation: .*corpus has no such split "
                                         r"\(its splits: train, test"):
        reading.load_examples(DataConfig(source=str(folder), eval_split="validation"), seed=0)
    broken = folder / "data" / "train-00001-of-00002.jsonl"
    broken.write_text(broken.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"train-00001-of-00002.jsonl line 6: not valid JSON"):
        reading.load_examples(DataConfig(source=str(folder), eval_split="test"), seed=0)


def test_chat_rows_without_an_assistant_turn_are_dropped_and_counted(tmp_path):
    keep = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    drop = {"messages": [{"role": "user", "content": "hi"}]}
    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [keep, drop, keep, drop, drop]))
    loaded = reading.load_examples(DataConfig(source=str(f), format="chat", eval_fraction=0.0), seed=0)
    assert len(loaded.train) == 2 and loaded.dropped == {"chat rows without an assistant turn": 3}


def test_rows_say_how_many_examples_were_cut_and_dropped(tok):
    long_prompt = {"instruction": "word " * 200, "output": "yes"}
    rows, stats = packing.build_rows(tok, [EX, EX, long_prompt], DataConfig(format="alpaca", max_seq_len=64), seed=0)
    assert stats.examples == 3 and stats.truncated == 1 and stats.no_target == 1 and stats.longest > 64
    assert stats.rows == len(rows) > 0 and "1 cut to data.max_seq_len=64, 1 dropped" in stats.describe(64)


def _batches(rows, packed=True):
    b = packing.ShardedBatches(rows, 2, 0, 1, 7, 0, packed, 256 if packed else None)
    return [{k: v.tolist() if torch.is_tensor(v) else v for k, v in batch.items()} for batch in b.epoch(0)]


@pytest.mark.parametrize("packing", [True, False])
def test_rows_are_prepared_once_and_a_second_run_reads_them_without_tokenizing(tok, tmp_path, monkeypatch, packing):

    cfg = DataConfig(source="builtin:required-args", max_seq_len=256, packing=packing)
    examples = reading.load_examples(cfg, 3)
    rows, stats, line = cache.prepared(tok, examples, cfg, 3, tmp_path)
    assert line.startswith("rows saved to ") and stats.rows == len(rows["train"]) > 4
    monkeypatch.setattr(formatting, "tokenize_example", lambda *a: pytest.fail("the second run tokenized"))
    again, stats2, line2 = cache.prepared(tok, examples, cfg, 3, tmp_path)
    assert line2.startswith("rows reused from ") and "no tokenizing" in line2 and stats2 == stats
    assert len(again["evaluation"]) == len(rows["evaluation"]) > 0
    assert _batches(again["train"], packing) == _batches(rows["train"], packing)  # the same batches, memory-mapped


def test_a_corrupt_row_cache_is_named_removed_and_built_again(tok, tmp_path, capsys):
    cfg = DataConfig(source="builtin:required-args", max_seq_len=256, packing=True)
    examples = reading.load_examples(cfg, 3)
    rows, _, line = cache.prepared(tok, examples, cfg, 3, tmp_path)
    where = Path(line.removeprefix("rows saved to "))
    arrow = where / "train.arrow"
    arrow.write_bytes(arrow.read_bytes()[:100])  # a copy cut short
    again, _, line2 = cache.prepared(tok, examples, cfg, 3, tmp_path)
    assert f"the row cache {where} cannot be read" in capsys.readouterr().out
    assert line2 == line and _batches(again["train"], True) == _batches(rows["train"], True)
    assert cache.prepared(tok, examples, cfg, 3, tmp_path)[2].startswith("rows reused from")  # whole again


def test_cached_rows_read_back_as_written_across_record_batches_without_importing_datasets_or_pandas(
        tok, tmp_path, monkeypatch):
    """The row cache's reader (cache.ArrowRows): every row as it was written, through several record batches;
    negative indices and the end as a list has them; pickled as its path; and no import of ``datasets`` (0.15-0.18
    s of a start) or pandas (which pyarrow's ``to_numpy`` imports), checked in a fresh interpreter."""
    import pickle
    import subprocess
    import sys

    monkeypatch.setattr(cache.RowWriter, "BATCH_TOKENS", 512)  # a record batch every few rows
    cfg = DataConfig(source="builtin:required-args", max_seq_len=128, packing=True)
    examples = reading.load_examples(cfg, 3)
    written, _, _ = cache.prepared(tok, examples, cfg, 3, tmp_path)
    again, _, line = cache.prepared(tok, examples, cfg, 3, tmp_path)
    rows = again["train"]
    assert line.startswith("rows reused from ") and isinstance(rows, cache.ArrowRows) and len(rows.chunks) > 3
    assert list(rows) == written["train"] and rows[-1] == written["train"][-1] and rows[2:5] == written["train"][2:5]
    assert all(type(v) is list for v in rows[0].values())  # collate concatenates lists
    with pytest.raises(IndexError):
        rows[len(rows)]
    assert list(pickle.loads(pickle.dumps(rows))) == written["train"]
    probe = (f"import sys; from ftcluster.data import cache; r = cache.ArrowRows({rows.file!r}); r[0]; "
             "sys.exit(sorted({'datasets', 'pandas'} & set(sys.modules)) or None)")
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0


def test_a_run_without_evaluation_rows_reads_its_cached_rows_back(tok, tmp_path):

    cfg = DataConfig(source="builtin:required-args", max_seq_len=256, eval_fraction=0.0)
    examples = reading.load_examples(cfg, 3)
    examples = reading.Examples(train=examples.train, evaluation=[], dropped=examples.dropped)
    rows, _, _ = cache.prepared(tok, examples, cfg, 3, tmp_path)
    again, _, line = cache.prepared(tok, examples, cfg, 3, tmp_path)
    assert line.startswith("rows reused from ") and len(again["evaluation"]) == 0
    assert len(again["train"]) == len(rows["train"]) > 0


def test_other_inputs_make_other_rows(tok, tmp_path):

    cfg = DataConfig(source="builtin:required-args", max_seq_len=64)
    examples = reading.load_examples(cfg, 3)
    k = cache.key(tok, examples, cfg, 3)
    assert cache.key(tok, examples, cfg.model_copy(update={"max_seq_len": 128}), 3) != k
    assert cache.key(tok, examples, cfg, 4) != k  # the seed shuffles before packing
    changed = reading.Examples(train=[{**examples.train[0], "output": "other"}] + examples.train[1:],
                            evaluation=examples.evaluation, dropped=examples.dropped)
    assert cache.key(tok, changed, cfg, 3) != k


# --- streaming ---------------------------------------------------------------------------------------------------

def _corpus(path, n, words=12):
    """An alpaca JSONL of ``n`` distinct examples of varied length."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": f"Explain item {i}: " + "detail " * (i % words),
                                "output": f"Item {i} is " + "fine " * (1 + i % 7)}) + "\n")
    return path


def _as_multiset(rows):
    return sorted(tuple(r["input_ids"]) + (-1,) + tuple(r["labels"]) for r in rows)


def test_a_streamed_corpus_gives_the_rows_and_counts_of_the_corpus_read_whole(tok, tmp_path):

    src = _corpus(tmp_path / "d.jsonl", 300)
    for packed in (False, True):
        cfg = DataConfig(source=str(src), max_seq_len=48, eval_fraction=0.0, packing=packed, shuffle_buffer=50)
        whole, whole_stats, _ = cache.prepared(tok, reading.load_examples(cfg, 3), cfg, 3, tmp_path / "whole")
        streamed, stats, line = streaming.prepared(tok, cfg, 3, tmp_path / "streamed")
        assert line.startswith(f"rows streamed from {src} in one pass")
        assert stats == whole_stats and stats.truncated > 0
        if packed:  # the buffered shuffle packs other neighbours together, so compare what the rows hold
            assert sum(len(r["input_ids"]) for r in streamed["train"]) == stats.tokens == whole_stats.tokens
            assert max(len(r["input_ids"]) for r in streamed["train"]) <= 48
        else:
            assert _as_multiset(streamed["train"]) == _as_multiset(whole["train"])


def test_streaming_holds_a_buffer_not_the_corpus_and_the_workers_read_no_examples(tok, tmp_path, monkeypatch):
    import tracemalloc


    import datasets  # noqa: F401 - imported before tracing: a first import's objects are not the corpus
    import pyarrow  # noqa: F401

    src = _corpus(tmp_path / "big.jsonl", 12_000, words=60)
    size = src.stat().st_size
    cfg = DataConfig(source=str(src), max_seq_len=128, streaming="on", shuffle_buffer=64, eval_fraction=0.05,
                     num_proc=2)
    formatting.tokenize_example(tok, reading.load_examples(DataConfig(), 0).train[0], DataConfig())  # the tokenizer warm

    # The writer's batch and the examples in flight to the tokenizing processes are constants sized for corpora of
    # gigabytes; made small here so that the corpus would show if it were held.
    monkeypatch.setattr(cache.RowWriter, "BATCH_TOKENS", 4096)
    monkeypatch.setattr(streaming, "CHUNK", 16)
    tracemalloc.start()
    rows, stats, line = prepare.rows_for(tok, cfg, 3, tmp_path, plan.streaming(cfg)[0])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "one pass" in line and len(rows["evaluation"]) > 0 and len(rows["train"]) > 1000
    assert peak < size / 3, f"streaming held {peak / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB corpus"

    tracemalloc.start()
    reading.load_examples(cfg.model_copy(update={"streaming": "off"}), 3)
    whole_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert whole_peak > size  # what streaming saves: the examples read whole hold more than the file

    # A worker (and a second run) finds the rows by the file's identity, reading no example.
    monkeypatch.setattr(reading, "iter_rows", lambda *a: pytest.fail("the corpus was read again"))
    again, stats2, line2 = prepare.rows_for(tok, cfg, 3, tmp_path, plan.streaming(cfg)[0])
    assert line2.startswith("rows reused from ") and stats2 == stats and len(again["train"]) == len(rows["train"])
    assert _batches(again["train"]) == _batches(rows["train"])


def test_streamed_holdout_is_a_seeded_fraction_disjoint_from_train(tok, tmp_path):

    src = _corpus(tmp_path / "d.jsonl", 2000)
    cfg = DataConfig(source=str(src), max_seq_len=512, packing=False, eval_fraction=0.1, shuffle_buffer=100,
                     num_proc=2)
    rows, stats, _ = streaming.prepared(tok, cfg, 3, tmp_path / "a")
    again, _, _ = streaming.prepared(tok, cfg.model_copy(update={"num_proc": 1}), 3, tmp_path / "b")
    assert again["train"][:] == rows["train"][:]  # tokenized by two processes or one: the same rows, in order
    assert stats.no_target == 0 and 150 < len(rows["evaluation"]) < 250
    assert stats.examples + len(rows["evaluation"]) == 2000
    assert not set(_as_multiset(rows["evaluation"])) & set(_as_multiset(rows["train"]))
    assert _as_multiset(again["evaluation"]) == _as_multiset(rows["evaluation"])  # the same in every process
    other, _, _ = streaming.prepared(tok, cfg, 4, tmp_path / "c")
    assert _as_multiset(other["evaluation"]) != _as_multiset(rows["evaluation"])


def test_which_sources_stream(tmp_path, monkeypatch):
    from ftcluster import config as C

    streams = lambda d: plan.streaming(d)[0]

    src = _corpus(tmp_path / "d.jsonl", 10)
    array = tmp_path / "d.json"
    array.write_text(json.dumps([{"instruction": "a", "output": "b"}] * 10))
    assert not streams(DataConfig(source=str(src)))  # 1 KB: read whole
    monkeypatch.setattr(reading, "STREAM_ABOVE", 100)
    assert streams(DataConfig(source=str(src)))
    assert not streams(DataConfig(source=str(array)))  # one JSON document: read whole either way
    assert not streams(DataConfig(source=str(src), streaming="off"))
    assert not streams(DataConfig(source="builtin:pydoc"))
    with pytest.raises(C.ConfigError, match="data.streaming=on with data.source=builtin:pydoc"):
        C.load(None, ["data.streaming=on"])


def test_a_bad_row_in_a_streamed_corpus_is_named_and_leaves_no_rows_behind(tok, tmp_path):

    src = _corpus(tmp_path / "d.jsonl", 50)
    lines = src.read_text().splitlines()
    lines[40] = json.dumps({"instruction": "x"})
    src.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(source=str(src), streaming="on")
    with pytest.raises(ValueError, match=r"row 41: field 'output' is missing"):
        streaming.prepared(tok, cfg, 3, tmp_path / "s")
    assert not list((tmp_path / "s" / ".rows").iterdir())


def test_a_dataset_directory_streams_through_datasets_and_is_found_again_by_its_cached_files(tok, tmp_path,
                                                                                              monkeypatch):

    folder = tmp_path / "corpus"
    folder.mkdir()
    _corpus(folder / "part.jsonl", 200)
    cfg = DataConfig(source=str(folder), max_seq_len=512, packing=False, eval_fraction=0.0, streaming="on")
    rows, stats, line = prepare.rows_for(tok, cfg, 3, tmp_path / "s", plan.streaming(cfg)[0])
    whole, _, _ = prepare.rows_for(tok, cfg.model_copy(update={"streaming": "off"}), 3, tmp_path / "w", False)
    assert "one pass" in line and stats.examples == 200
    assert _as_multiset(rows["train"]) == _as_multiset(whole["train"])
    monkeypatch.setattr(reading, "iter_rows", lambda *a: pytest.fail("the corpus was read again"))
    assert prepare.rows_for(tok, cfg, 3, tmp_path / "s", True)[2].startswith("rows reused from ")


def test_a_json_object_file_and_a_csv_with_a_byte_order_mark_are_read_or_named_for_what_they_are(tmp_path):
    obj = tmp_path / "rows.json"
    obj.write_text(json.dumps({"data": [{"instruction": "a", "output": "b"}]}, indent=2))
    with pytest.raises(ValueError, match=r"rows.json is one JSON object \(its rows may be the list under 'data'\), "
                                         r"not rows: write a JSON array"):
        reading.load_examples(DataConfig(source=str(obj)), 0)
    excel = tmp_path / "rows.csv"
    excel.write_bytes(b"\xef\xbb\xbfinstruction,output\n" + b"".join(f"q{i},a{i}\n".encode() for i in range(20)))
    got = reading.load_examples(DataConfig(source=str(excel), eval_fraction=0.1), 0)
    assert len(got.train) == 18 and set(got.train[0]) == {"instruction", "output"}


def test_chat_rows_with_a_tokenizer_without_a_chat_template_name_the_missing_template(tok):
    import copy

    plain = copy.deepcopy(tok)
    plain.chat_template = None
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    with pytest.raises(ValueError, match=r"data.format=chat: the tokenizer .* has no chat template.*model.tokenizer"):
        formatting.tokenize_example(plain, {"messages": msgs}, DataConfig(source="chats.jsonl", format="chat"))
