"""Checkpointed decoder layers, eager or compiled, on one GPU: the step time and the memory held above the model.

    python -m benchmarks.compiled_layers LAYERS TOKENIZER METHOD:MODE [METHOD:MODE ...] [--preset P] [--rows 2x2048]
        [--examples 2]

A preset's shape (the Llama-2-7B one unless ``--preset``) cut to LAYERS layers, random init, micro batch x row
length ``--rows``, two packed examples a row (about 73% and 27% of it) or one (``--examples 1``, as the
long-context suite's rows), AdamW, 8 steps (median of the last 5). Modes:
- ``eager``: ``model.compile=off``;
- ``compiled``: ``model.compile=on``, as ftcluster runs it (the checkpoint traced into the compiled layer; for QLoRA
  under a policy that makes Inductor recompute the dequantization, activations.RecomputePolicy);
- ``traced``: the checkpoint traced into the compiled layer with no policy (ftcluster before 606a26e);
- ``wrapped``: an eager checkpoint around a compiled forward (what transformers' own checkpointing does).
The memory held is also given per token and MLP intermediate unit, the unit of ``estimate.COMPILED_BACKWARD_BYTES``.
Run each spec in its own process: a compiled model outlives ``del`` in torch.compile's caches."""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import torch


def main(layers: int, tokenizer: str, method: str, mode: str, preset: str = "llama-2-7b", rows: int = 2,
         length: int = 2048, examples: int = 2) -> str:
    from transformers import LlamaConfig

    from ftcluster import activations, models, plan
    from ftcluster import config as C
    from ftcluster.hardware import Hardware
    from ftcluster.presets import PRESETS

    shape = Path(tempfile.mkdtemp())
    LlamaConfig(**{**PRESETS[preset], "num_hidden_layers": layers}).save_pretrained(shape)
    device = torch.device("cuda")
    ids = torch.randint(0, PRESETS[preset]["vocab_size"], (rows, length), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    parts = [round(length * 1500 / 2048), length - round(length * 1500 / 2048)] if examples == 2 else [length]
    ends = torch.tensor(parts * rows).cumsum(0)
    lengths = torch.cat([torch.zeros(1, dtype=ends.dtype), ends]).to(device, torch.int32)
    packed = {"position_ids": torch.cat([torch.arange(n) for n in parts] * rows).view(rows, length).to(device),
              "cu_seq_lens_q": lengths, "cu_seq_lens_k": lengths, "max_length_q": max(parts),
              "max_length_k": max(parts)}
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
    held = torch.cuda.max_memory_allocated() - before
    per_unit = held / (rows * length * PRESETS[preset]["intermediate_size"])
    return (f"{method}:{mode} {preset} layers={layers} rows={rows}x{length} examples/row={examples}: first step "
            f"{times[0]:.1f} s, step {sorted(times[3:])[2] * 1000:.1f} ms, held above the model {held / 2**30:.2f} "
            f"GiB ({per_unit:.1f} bytes per token and MLP intermediate unit), losses {losses[:3]}")


if __name__ == "__main__":
    from ftcluster.presets import PRESETS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("layers", type=int)
    p.add_argument("tokenizer")
    p.add_argument("specs", nargs="+", metavar="METHOD:MODE")
    p.add_argument("--preset", default="llama-2-7b", choices=sorted(PRESETS))
    p.add_argument("--rows", default="2x2048", help="micro batch x row length (default 2x2048)")
    p.add_argument("--examples", type=int, choices=(1, 2), default=2, help="examples packed into each row")
    args = p.parse_args()
    rows, length = (int(v) for v in args.rows.lower().split("x"))
    for spec in args.specs:
        print(main(args.layers, args.tokenizer, *spec.split(":"), preset=args.preset, rows=rows, length=length,
                   examples=args.examples), flush=True)
