"""Liger kernels on the GPU: the same first losses as transformers' own modules, and the logits never held whole
(Llama-3.2-1B shape cut to 4 layers, random init, seq 2048, micro batch 2: 1 GiB of bf16 logits per step)."""

import gc

import pytest
import torch

from ftcluster import config as C
from ftcluster import kernels, models
from ftcluster.presets import PRESETS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not kernels.installed(), reason="liger-kernel not installed")]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_liger_matches_the_plain_modules_and_never_holds_the_logits(tmp_path, tiny_model, method):
    from transformers import LlamaConfig

    LlamaConfig(**{**PRESETS["llama-3.2-1b"], "num_hidden_layers": 4}).save_pretrained(tmp_path)
    device = torch.device("cuda")
    ids = torch.randint(0, 128000, (2, 2048), device=device, generator=torch.Generator(device).manual_seed(0))
    losses, peaks = {}, {}
    for mode in ("off", "on"):  # off first: Liger's RoPE and RMSNorm replace module-level names for later builds
        cfg = C.load(None, [f"model.name_or_path={tmp_path}", f"model.tokenizer={tiny_model}", f"method={method}",
                            "model.random_init=true", "model.attn_implementation=sdpa", "lora.r=8",
                            "model.gradient_checkpointing=true", f"model.liger_kernel={mode}", "scaling.use_gpu=true"])
        torch.manual_seed(0)
        model = models.build_model(cfg, device)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        losses[mode] = []
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[mode].append(loss.item())
        peaks[mode] = torch.cuda.max_memory_allocated(device) - base
        del model, opt, loss
        gc.collect()
        torch.cuda.empty_cache()
    print(f"GPU-RESULT liger {method}: losses off {losses['off']} on {losses['on']}; peak above the weights "
          f"{peaks['off'] / 2**30:.3f} -> {peaks['on'] / 2**30:.3f} GiB")
    assert losses["on"] == pytest.approx(losses["off"], rel=2e-2)  # bf16 kernels, three optimizer steps
    logits = ids.numel() * PRESETS["llama-3.2-1b"]["vocab_size"] * 2
    assert peaks["off"] - peaks["on"] > 0.5 * logits  # the fused loss never materializes them
