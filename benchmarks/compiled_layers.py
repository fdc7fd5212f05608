"""Checkpointed decoder layers, eager or compiled, on one GPU: the step time and the memory held above the model.

    python -m benchmarks.compiled_layers LAYERS TOKENIZER METHOD:MODE [METHOD:MODE ...]

The Llama-2-7B shape cut to LAYERS layers, random init, seq 2048, micro batch 2, two packed examples a row, AdamW,
8 steps (median of the last 5). Modes:
- ``eager``: ``model.compile=off``;
- ``compiled``: ``model.compile=on``, as ftcluster runs it (the checkpoint traced into the compiled layer; for QLoRA
  under a policy that makes Inductor recompute the dequantization, activations.RecomputePolicy);
- ``traced``: the checkpoint traced into the compiled layer with no policy (ftcluster before 606a26e);
- ``wrapped``: an eager checkpoint around a compiled forward (what transformers' own checkpointing does).
Run each spec in its own process: a compiled model outlives ``del`` in torch.compile's caches."""

from __future__ import annotations

import functools
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(layers: int, tokenizer: str, method: str, mode: str) -> str:
    from transformers import LlamaConfig

    from ftcluster import activations, models, plan
    from ftcluster import config as C
    from ftcluster.hardware import Hardware
    from ftcluster.presets import PRESETS

    shape = Path(tempfile.mkdtemp())
    LlamaConfig(**{**PRESETS["llama-2-7b"], "num_hidden_layers": layers}).save_pretrained(shape)
    device = torch.device("cuda")
    ids = torch.randint(0, 32000, (2, 2048), device=device, generator=torch.Generator(device).manual_seed(0))
    lengths = torch.tensor([0, 1500, 2048, 3548, 4096], dtype=torch.int32, device=device)
    packed = {"position_ids": torch.cat([torch.arange(1500), torch.arange(548)] * 2).view(2, 2048).to(device),
              "cu_seq_lens_q": lengths, "cu_seq_lens_k": lengths, "max_length_q": 1500, "max_length_k": 1500}
    cfg = C.load(None, [f"model.name_or_path={shape}", f"model.tokenizer={tokenizer}", f"method={method}",
                        "model.random_init=true", "lora.r=8", "model.gradient_checkpointing=true",
                        f"model.compile={'off' if mode == 'eager' else 'on'}", "scaling.use_gpu=true"])
    torch.manual_seed(0)
    # Compiled layers get Liger's fused loss only (Plan.liger_layers).
    model = models.build_model(cfg, plan.make(cfg, Hardware.gpu(), read_data=False), device)
    for layer in activations.decoder_layers(model) if mode in ("traced", "wrapped") else []:
        forward, host, _ = layer.forward.args
        if mode == "traced":  # still compiled (lazily, at the first call), now without the policy
            layer.forward = functools.partial(activations._checkpointed, forward, host, None)
        else:
            layer._compiled_call_impl = None  # undo nn.Module.compile
            layer.forward = functools.partial(activations._checkpointed, torch.compile(forward), host, None)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    times, losses = [], []
    for step in range(8):
        if step == 3:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, **packed).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(round(loss.item(), 4))
    held = (torch.cuda.max_memory_allocated() - before) / 2**30
    return (f"{method}:{mode} layers={layers}: first step {times[0]:.1f} s, step {sorted(times[3:])[2] * 1000:.1f} ms, "
            f"held above the model {held:.2f} GiB, losses {losses[:3]}")


if __name__ == "__main__":
    layers, tokenizer, *specs = sys.argv[1:]
    for spec in specs:
        print(main(int(layers), tokenizer, *spec.split(":")), flush=True)
