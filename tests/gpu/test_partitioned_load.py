"""Under ZeRO-3, QLoRA from a local checkpoint is read module by module on the GPU: the model it gives is the one
transformers' 4-bit loader gives, and the load never holds more than the 4-bit model plus one 16-bit module."""

import pytest
import torch

from ftcluster import config as C
from ftcluster import deepspeed_setup, models
from ftcluster.presets import PRESETS
from tests import tiny

pytestmark = pytest.mark.gpu


def test_zero3_qlora_checkpoint_is_read_module_by_module_into_the_same_model(tmp_path, tiny_model, monkeypatch):
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29563", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(k, v)
    shape = LlamaConfig(**{**PRESETS["llama-3.2-1b"], "tie_word_embeddings": False})
    with torch.device("cuda"):
        LlamaForCausalLM(shape).to(torch.bfloat16).save_pretrained(tmp_path / "ckpt", max_shard_size="1GB")
    torch.cuda.empty_cache()
    overrides = [f"model.name_or_path={tmp_path / 'ckpt'}", f"model.tokenizer={tiny_model}", "method=qlora",
                 "model.attn_implementation=sdpa", "deepspeed.zero_stage=3"]
    cfg = C.load(None, overrides)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    ids = torch.randint(0, 1000, (1, 128), device=device)
    reference = models.build_base_model(cfg, tiny.plan_here(cfg), device)  # transformers' 4-bit loader, the whole model
    four_bit_model = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        want = reference(input_ids=ids, labels=ids).loss.item()
    del reference
    torch.cuda.empty_cache()

    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        model = models.build_base_model(cfg, tiny.plan_here(cfg), device, deepspeed_setup.zero3_partition(tiny.plan_here(cfg), deepspeed_setup.deepspeed_config(cfg, tiny.plan_here(cfg), 1)))
        peak = torch.cuda.max_memory_allocated(device) - before
        assert all(hasattr(p, "ds_id") for p in model.parameters())  # partitioned as it was read
        embedding_bytes = 2 * shape.vocab_size * shape.hidden_size  # the largest module read in 16 bits
        assert peak < four_bit_model + 1.5 * embedding_bytes
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())), torch.no_grad():
            got = model(input_ids=ids, labels=ids).loss.item()
        assert got == pytest.approx(want, rel=1e-3)
    finally:
        dist.destroy_process_group()
