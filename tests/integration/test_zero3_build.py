"""Under ZeRO-3 the model is partitioned while it is built (random init) or loaded (a 16-bit checkpoint): no worker
ever holds the whole model, and the partitioned model is the model an unpartitioned build makes."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ftcluster import config as C
from ftcluster import deepspeed_setup, models
from ftcluster.cluster import free_port
from tests import tiny

WORLD = 2


def _cfg(tiny_model, case: str):
    source, method = case.split("-")
    method, _, upcast = method.partition("+")
    random = ["model.random_init=true", "model.config_overrides={tie_word_embeddings: true}"]
    return C.load(None, [f"model.name_or_path={tiny_model}", f"method={method}", *(random if source == "random" else []),
                         f"quantization.upcast_non_quantized={bool(upcast)}", "deepspeed.zero_stage=3", "deepspeed.zero3_frozen=deepspeed",
                         "training.micro_batch_size=2", "optimizer.lr=3e-3", "scheduler.warmup_steps=0"])


def _rank_main(rank: int, tiny_model, case: str, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    cfg = _cfg(tiny_model, case)
    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(cfg.training.seed)
    reference = tiny.base_for(cfg)  # unpartitioned, same seed
    with torch.no_grad():
        reference_loss = reference(input_ids=ids, labels=ids).loss.item()
    del reference

    torch.manual_seed(cfg.training.seed)
    ds_config = deepspeed_setup.deepspeed_config(cfg, tiny.plan_for(cfg), WORLD)
    model = models.build_model(cfg, tiny.plan_for(cfg), torch.device("cpu"), deepspeed_setup.zero3_partition(tiny.plan_for(cfg), ds_config))
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    held = sum(p.ds_tensor.numel() for p in base if hasattr(p, "ds_tensor"))
    full = sum(p.ds_numel for p in base if hasattr(p, "ds_numel"))
    result = {"all_partitioned": all(hasattr(p, "ds_id") and p.numel() == 0 for p in base), "held": held,
              "full": full, "reference_loss": reference_loss,
              "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight
              or not cfg.model.random_init,
              "norm_dtype": str(getattr(model, "get_base_model", lambda: model)().model.norm.weight.ds_tensor.dtype),
              "want_norm_dtype": str(torch.float32 if cfg.quantization.upcast_non_quantized else torch.bfloat16)}

    ds, _, _ = deepspeed_setup.initialize(cfg, tiny.plan_for(cfg), model, torch.device("cpu"), ds_config, total_steps=6)
    losses = []
    for _ in range(6):
        loss = ds(input_ids=ids, labels=ids).loss
        ds.backward(loss)
        ds.step()
        losses.append(loss.item())
    result["losses"] = losses
    out[rank] = result
    dist.destroy_process_group()


@pytest.mark.parametrize("case", ["random-full", "random-qlora", "random-qlora+upcast", "checkpoint-lora",
                                  "checkpoint-qlora"])
def test_zero3_model_is_partitioned_as_built_and_is_the_unpartitioned_model(tiny_model, case):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_main, args=(tiny_model, case, free_port(), out), nprocs=WORLD)
        results = dict(out)
    for r in results.values():
        assert r["all_partitioned"] and r["tied"] and r["norm_dtype"] == r["want_norm_dtype"]
        assert r["held"] <= r["full"] / WORLD + 64 * len(results)  # its shard only (DeepSpeed pads each one)
        # The partitioned model computes what the whole model built from the same seed computes.
        assert r["losses"][0] == pytest.approx(r["reference_loss"], rel=2e-2)
        assert all(torch.isfinite(torch.tensor(r["losses"]))) and r["losses"][-1] < r["losses"][0]
    assert results[0]["losses"] == results[1]["losses"]
