"""A random-init QLoRA model is built on the GPU one module at a time: its peak never holds the 16-bit model."""

import pytest
import torch

from ftcluster import config as C
from ftcluster import models
from ftcluster.presets import PRESETS

pytestmark = pytest.mark.gpu


def test_random_init_qlora_build_peaks_far_below_the_16_bit_model(tmp_path, tiny_model):
    from transformers import LlamaConfig

    LlamaConfig(**PRESETS["llama-3-8b"]).save_pretrained(tmp_path)  # the architecture only, no weights
    cfg = C.load(None, [f"model.name_or_path={tmp_path}", f"model.tokenizer={tiny_model}", "method=qlora",
                        "model.random_init=true", "model.attn_implementation=sdpa"])
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    model = models.build_base_model(cfg, device)
    peak = torch.cuda.max_memory_allocated(device)
    bf16_linear_bytes = 2 * 4096 * 14336  # the largest single layer held in 16 bits at once
    four_bit_model = torch.cuda.memory_allocated(device)
    assert peak < four_bit_model + 3 * bf16_linear_bytes
    assert peak < 0.5 * 2 * 8.0e9  # an 8B model in bf16 would be 16 GB
    ids = torch.randint(0, 500, (1, 64), device=device)
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
