"""The plain Hugging Face recipe most tutorials give, timed the same way as ftcluster: transformers + PEFT
(+ bitsandbytes with ``prepare_model_for_kbit_training`` for QLoRA), gradient checkpointing, SDPA, full-length
unpacked rows, a plain loop; no Ray, no DeepSpeed.

    python -m benchmarks.hf_baseline --model /root/shapes/llama-3.2-1b --method lora --steps 30
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def build(model_dir: str, method: str, r: int, targets: list[str]):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    from ftcluster.models import quantize_linears_  # the same in-place NF4 quantizer random-init QLoRA uses
    from ftcluster import config as C

    hf = AutoConfig.from_pretrained(model_dir)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16, attn_implementation="sdpa")
    if method == "qlora":
        quantize_linears_(model, C.load(None, ["method=qlora"]), torch.device("cuda"))
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type="CAUSAL_LM"))
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a model directory (weights unused: random init)")
    p.add_argument("--method", choices=["lora", "qlora"], required=True)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj")
    args = p.parse_args()
    torch.manual_seed(0)
    model = build(args.model, args.method, args.r, args.targets.split(","))
    params = [p for p in model.parameters() if p.requires_grad]
    if args.method == "qlora":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(params, lr=2e-4)
    else:
        opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.micro_batch, args.seq_len), device="cuda")
    times = []
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    steady = sorted(times[5:])[len(times[5:]) // 2]
    print(json.dumps({"recipe": "hf", "method": args.method, "model": args.model, "seq_len": args.seq_len,
                      "micro_batch": args.micro_batch, "median_step_s": steady,
                      "tokens_per_s": args.micro_batch * args.seq_len / steady,
                      "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                      "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}))


if __name__ == "__main__":
    main()
