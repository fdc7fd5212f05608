"""A random-init QLoRA model is built on the GPU one module at a time: its peak never holds the 16-bit model."""

import pytest
import torch

from ftcluster import config as C
from ftcluster import models
from ftcluster.presets import PRESETS
from tests import tiny

pytestmark = pytest.mark.gpu


def test_random_init_qlora_build_peaks_far_below_the_16_bit_model(tmp_path, tiny_model):
    from transformers import LlamaConfig

    LlamaConfig(**PRESETS["llama-3-8b"]).save_pretrained(tmp_path)  # the architecture only, no weights
    cfg = C.load(None, [f"model.name_or_path={tmp_path}", f"model.tokenizer={tiny_model}", "method=qlora",
                        "model.random_init=true", "model.attn_implementation=sdpa"])
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)  # whatever earlier tests left
    model = models.build_base_model(cfg, tiny.plan_here(cfg), device)
    peak = torch.cuda.max_memory_allocated(device) - before
    bf16_linear_bytes = 2 * 4096 * 14336  # the largest single layer held in 16 bits at once
    four_bit_model = torch.cuda.memory_allocated(device) - before
    assert peak < four_bit_model + 3 * bf16_linear_bytes
    assert peak < 0.5 * 2 * 8.0e9  # an 8B model in bf16 would be 16 GB
    ids = torch.randint(0, 500, (1, 64), device=device)
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_zero3_offload_build_keeps_only_one_module_on_the_gpu(tmp_path, tiny_model, monkeypatch):
    """ZeRO-3 partitions each module as it is built; with offload_param its shard goes to host memory at once, so
    the GPU never holds more than about one module of the model, not the 16 GB of the whole."""
    import torch.distributed as dist
    from transformers import LlamaConfig

    from ftcluster import deepspeed_setup

    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(k, v)
    LlamaConfig(**PRESETS["llama-3-8b"]).save_pretrained(tmp_path)
    cfg = C.load(None, [f"model.name_or_path={tmp_path}", f"model.tokenizer={tiny_model}", "method=lora",
                        "model.random_init=true", "model.attn_implementation=sdpa", "deepspeed.zero_stage=3",
                        "deepspeed.offload_param=cpu"])
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)  # whatever earlier tests left
        model = models.build_model(cfg, tiny.plan_here(cfg), device, deepspeed_setup.zero3_partition(tiny.plan_here(cfg), deepspeed_setup.deepspeed_config(cfg, tiny.plan_here(cfg), 1)))
        peak = torch.cuda.max_memory_allocated(device) - before
        held = torch.cuda.memory_allocated(device) - before
        base = [p for n, p in model.named_parameters() if "lora_" not in n]
        assert all(p.ds_tensor.device.type == "cpu" for p in base)
        embedding_bytes = 2 * 128256 * 4096  # the largest single module, held in 16 bits until partitioned
        assert peak < 1.5 * embedding_bytes  # the bf16 model would be 16 GB
        assert held < 0.5e9  # what stays: the LoRA adapters
    finally:
        dist.destroy_process_group()
