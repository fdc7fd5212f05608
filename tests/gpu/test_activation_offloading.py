"""Offloaded checkpoints leave the GPU: a Llama-3-8B-shaped QLoRA model (random init, 8 layers) at seq 2048 and
micro batch 2, peak allocated with and without model.activation_offloading, same losses."""

import gc

import pytest
import torch

from ftcluster import config as C
from ftcluster import models
from ftcluster.presets import PRESETS
from tests import tiny

pytestmark = pytest.mark.gpu


def test_offloading_frees_each_layers_checkpoint_and_keeps_the_loss(tmp_path, tiny_model):
    from transformers import LlamaConfig

    shape = {**PRESETS["llama-3-8b"], "num_hidden_layers": 8}
    LlamaConfig(**shape).save_pretrained(tmp_path)
    device = torch.device("cuda")
    ids = torch.randint(0, 1000, (2, 2048), device=device, generator=torch.Generator(device).manual_seed(0))
    peaks, losses = [], []
    for offload in (False, True):
        cfg = C.load(None, [f"model.name_or_path={tmp_path}", f"model.tokenizer={tiny_model}", "method=qlora",
                            "model.random_init=true", "model.attn_implementation=sdpa", "lora.r=8",
                            "model.gradient_checkpointing=true", f"model.activation_offloading={offload}"])
        torch.manual_seed(0)
        model = models.build_model(cfg, tiny.plan_here(cfg), device)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step_losses = []
        for _ in range(2):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            step_losses.append(loss.item())
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
        losses.append(step_losses)
        del model, loss
        gc.collect()  # PEFT's model holds reference cycles; the next test measures from an empty device
        torch.cuda.empty_cache()
    checkpoints = shape["num_hidden_layers"] * ids.numel() * shape["hidden_size"] * 2
    print(f"GPU-RESULT activation offloading: peak above the weights {peaks[0] / 2**30:.3f} -> "
          f"{peaks[1] / 2**30:.3f} GiB; checkpoints {checkpoints / 2**30:.3f} GiB; losses {losses}")
    assert peaks[0] - peaks[1] > 0.6 * checkpoints  # two layers' inputs are on the device while they move
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


def test_an_offloaded_checkpoint_takes_its_own_size_of_pinned_host_memory():
    from ftcluster import activations

    stats = torch.cuda.host_memory_stats()
    if "allocated_bytes.current" not in stats:
        pytest.skip(f"torch {torch.__version__} reports no pinned allocator bytes")
    t = torch.randn(3, 1000, 4096, device="cuda").to(torch.bfloat16)  # 23.4 MiB: one pinned block would be 32 MiB
    hooks = activations.HostActivations()
    before = torch.cuda.host_memory_stats()["allocated_bytes.current"]
    packed = hooks._pack(t)
    torch.cuda.synchronize()
    grown = torch.cuda.host_memory_stats()["allocated_bytes.current"] - before
    print(f"GPU-RESULT pinned host memory for a {t.numel() * 2 / 2**20:.1f} MiB checkpoint: {grown / 2**20:.1f} MiB")
    assert grown <= t.numel() * t.element_size() + activations.SMALLEST_PIECE_BYTES
    assert torch.equal(hooks._unpack(packed), t)


def test_expandable_segments_are_set_on_a_running_allocator_with_no_warning_to_the_user():
    # torch 2.11 printed a FutureWarning in every run from torch.cuda.memory._set_allocator_settings.
    import subprocess
    import sys

    code = ("import torch; torch.zeros(1, device='cuda'); from ftcluster import patches; "
            "patches.expandable_segments_now(); x = torch.empty(2**20, device='cuda'); print('ok')")
    proc = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
