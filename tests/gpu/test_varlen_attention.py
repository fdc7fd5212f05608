import pytest
import torch

from ftcluster import attention
from ftcluster.data import packing

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not attention.available(), reason="torch has no varlen attention")
def test_varlen_attention_gives_the_logits_of_each_example_alone(tiny_model):
    from transformers import AutoModelForCausalLM

    attention.register()
    kw = dict(dtype=torch.bfloat16, device_map={"": "cuda"})
    varlen = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="varlen", **kw).eval()
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", **kw).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(5, 500, (n,), generator=g).tolist() for n in (37, 5, 80, 21)]
    rows = packing.pack([{"input_ids": s, "labels": s} for s in seqs], max_len=128)
    batch = packing.collate(rows, pad_id=0, packed=True, pad_to=128)
    batch.pop("num_tokens")
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.no_grad():
        packed = varlen(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        # Where packing put each example: its row, and the start of its position run there.
        where = {}
        for r, row in enumerate(rows):
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
            for a, b in zip(starts, starts[1:]):
                where[tuple(row["input_ids"][a:b])] = (r, a)
        for s in seqs:
            row, start = where[tuple(s)]
            alone = sdpa(input_ids=torch.tensor([s], device="cuda")).logits[0]
            got = packed[row, start:start + len(s)]
            assert (got.float() - alone.float()).norm() / alone.float().norm() < 1e-2


@pytest.mark.skipif(not attention.available(), reason="torch has no varlen attention")
def test_a_batch_of_one_example_rows_gets_each_examples_logits_alone_by_either_route(tiny_model, monkeypatch):
    """Rows that each hold one example (one padded) are attended as plain causal rows where register chose SDPA on
    this GPU, and by the varlen kernel otherwise: both give each example the logits it gets alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    line = attention.register(AutoConfig.from_pretrained(tiny_model), torch.bfloat16, torch.device("cuda"))
    print(f"GPU-RESULT {line}")
    kw = dict(dtype=torch.bfloat16, device_map={"": "cuda"})
    varlen = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="varlen", **kw).eval()
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", **kw).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(5, 500, (n,), generator=g).tolist() for n in (256, 170)]
    rows = packing.pack([{"input_ids": s, "labels": s} for s in seqs], max_len=256)
    batch = packing.collate(rows, pad_id=0, packed=True, pad_to=256)
    assert batch["cu_seq_lens_q"].tolist() == [0, 256, 512]
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()
             if k not in ("labels", "num_tokens")}
    for cudnn_rows in {attention._CUDNN_ROWS, False}:
        monkeypatch.setattr(attention, "_CUDNN_ROWS", cudnn_rows)
        with torch.no_grad():
            packed = varlen(**batch, use_cache=False).logits
            for r, row in enumerate(rows):
                n = len(row["input_ids"])
                alone = sdpa(input_ids=torch.tensor([row["input_ids"]], device="cuda")).logits[0].float()
                assert (packed[r, :n].float() - alone).norm() / alone.norm() < 1e-2, (cudnn_rows, r)


@pytest.mark.skipif(not attention.available(), reason="torch has no varlen attention")
def test_a_padding_free_row_through_the_varlen_kernel_gives_each_example_its_logits_alone(tiny_model):
    """data.padding_free: two packed rows of 128 regrouped into one row of 256, its trailing padding in sequences
    no longer than 128 and the kernel told 128 as the bound: each example gets the logits it gets alone."""
    from transformers import AutoModelForCausalLM

    attention.register()
    kw = dict(dtype=torch.bfloat16, device_map={"": "cuda"})
    varlen = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="varlen", **kw).eval()
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", **kw).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(5, 500, (n,), generator=g).tolist() for n in (100, 90, 30, 7)]
    rows = packing.pack([{"input_ids": s, "labels": s} for s in seqs], max_len=128)
    free = packing.ShardedBatches(rows, 2, 0, 1, seed=0, pad_id=0, packed=True, pad_to=128, padding_free=True)
    (batch,) = list(free.epoch(0))
    assert batch["input_ids"].shape == (1, 256) and batch["max_length_q"] == 128
    row = free.rows[0]
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()
             if k not in ("labels", "num_tokens")}
    with torch.no_grad():
        packed = varlen(**batch, use_cache=False).logits[0]
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        assert len(starts) == 5
        for a, b in zip(starts, starts[1:]):
            alone = sdpa(input_ids=torch.tensor([row["input_ids"][a:b]], device="cuda")).logits[0].float()
            assert (packed[a:b].float() - alone).norm() / alone.norm() < 1e-2


LONG = 65536


@pytest.mark.skipif(not attention.available(), reason="torch has no varlen attention")
@pytest.mark.parametrize("boundaries", ["collator", "positions"])
def test_examples_packed_into_one_64k_row_attend_only_to_themselves(tiny_model, boundaries):
    """At 64k tokens, each of ~30 packed examples gets the logits it gets alone: from the collator's cumulative
    lengths, and from the positions alone (what attention reads under sequence parallelism, whose gathered rows
    carry no lengths). The same row attended across examples differs: the comparison can see a leak."""
    from transformers import AutoModelForCausalLM

    attention.register()
    kw = dict(dtype=torch.bfloat16, device_map={"": "cuda"})
    varlen = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="varlen", **kw).eval()
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", **kw).eval()
    g = torch.Generator().manual_seed(0)
    seqs, total = [], 0
    while True:
        n = int(torch.randint(500, 4000, (1,), generator=g))
        if total + n > LONG:
            break
        seqs.append(torch.randint(5, 500, (n,), generator=g).tolist())
        total += n
    rows = packing.pack([{"input_ids": s, "labels": s} for s in seqs], max_len=LONG)
    assert len(rows) == 1 and len(seqs) > 20
    batch = packing.collate(rows, pad_id=0, packed=True, pad_to=LONG)
    batch.pop("num_tokens")
    if boundaries == "positions":
        for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
            batch.pop(key)
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = varlen(**batch, use_cache=False).logits[0]
        leaked = sdpa(input_ids=batch["input_ids"], use_cache=False).logits[0]  # causal over the whole row
        # Where packing put each example (best fit reorders them): the start of its position run.
        positions = rows[0]["position_ids"]
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        where = {tuple(rows[0]["input_ids"][a:b]): a for a, b in zip(starts, starts[1:])}
        worst, leak = 0.0, 0.0
        for s in seqs:
            alone = sdpa(input_ids=torch.tensor([s], device="cuda")).logits[0].float()
            start = where[tuple(s)]
            end = start + len(s)
            worst = max(worst, float((packed[start:end].float() - alone).norm() / alone.norm()))
            leak = max(leak, float((leaked[start:end].float() - alone).norm() / alone.norm()))
    print(f"GPU-RESULT 64k packed row, boundaries from {boundaries}: {len(seqs)} examples, worst relative "
          f"difference from alone {worst:.2e}; attended across examples {leak:.2e}")
    assert worst < 1e-2 < leak
