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
