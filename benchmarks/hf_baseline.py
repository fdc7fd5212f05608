"""The plain Hugging Face recipe most tutorials give, run on a recipe's model, data shape and optimizer and timed
like ftcluster, so ``benchmarks.compare --baseline hf`` can put the two side by side.

The recipe: ``from_pretrained`` (with ``BitsAndBytesConfig`` and ``prepare_model_for_kbit_training`` for QLoRA),
``get_peft_model``, SDPA attention, the examples tokenized with labels = inputs and concatenated into full rows
of ``data.max_seq_len`` (run_clm's ``group_texts``: no padding waste, so the baseline is not handicapped),
gradient checkpointing as the recipe sets it, and a plain loop; no Ray, no DeepSpeed.

``--recipe hf-tuned`` is the same without ``prepare_model_for_kbit_training``, whose float32 upcast of the
embeddings, norms and output layer makes QLoRA 1.8-2.8x slower: what axolotl and LLaMA-Factory run. Only QLoRA
differs between the two.

``--recipe unsloth`` is Unsloth's ``FastLanguageModel`` (its patched Llama forward, Triton kernels for RoPE, RMSNorm,
SwiGLU, LoRA and cross-entropy, and its offloaded gradient checkpointing) over the same checkpoint, LoRA settings,
rows, optimizer and loop: what people pick today for single-GPU LoRA and QLoRA speed. Unsloth loads only from a
checkpoint, so a random-init shape is first written once, with the same seed, to a directory under the temporary
directory (``random_checkpoint``). Unsloth needs a CUDA GPU; elsewhere the recipe stops with an error saying so.

    python -m benchmarks.hf_baseline --config CONFIG [overrides ...] --steps 30 --out FILE.json [--recipe hf-tuned|unsloth]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ftcluster import config as C
from ftcluster import metrics, models, sources
from ftcluster.data import formatting, reading


RECIPES = ("hf", "hf-tuned", "unsloth")


def build(cfg: C.RunConfig, device: torch.device, recipe: str = "hf"):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    m = cfg.model
    dtype = models.DTYPES[m.dtype]
    hf = sources.load_hf_config(m)
    # bitsandbytes' packed bytes, as transformers' own 4-bit loading stores them.
    quant = models.bnb_config(cfg, "uint8") if cfg.method == "qlora" else None
    if m.random_init:  # no weights to load: the same layer-by-layer builder random-init runs use
        model = models.build_module_by_module(cfg, hf, device, quant=quant, dtype=dtype, attn_implementation="sdpa")
    else:
        src, kw = sources.resolve_source(m)
        if quant is not None:
            kw["quantization_config"] = quant
        model = AutoModelForCausalLM.from_pretrained(src, config=hf, dtype=dtype, attn_implementation="sdpa",
                                                     device_map={"": device}, **kw)
    model.config.use_cache = False
    if cfg.method == "qlora" and recipe == "hf":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=m.gradient_checkpointing)
    elif m.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    if cfg.method == "full":
        return model
    lc = cfg.lora
    return get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                            target_modules=lc.target_modules, task_type="CAUSAL_LM"))


def import_unsloth():
    """Unsloth, imported before transformers and PEFT (it patches both on import), or a clear stop."""
    # A benchmark sends nothing home: Unsloth otherwise downloads a README from the Hub to count its users.
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    try:
        import unsloth  # noqa: F401
    except ImportError as e:
        raise ImportError(f"--recipe unsloth: Unsloth is not importable here ({e}). Install it with `pip install "
                          "unsloth` (it needs a CUDA GPU), or leave unsloth out of --baseline.") from e
    except NotImplementedError as e:  # what it raises on a machine without a supported accelerator
        raise RuntimeError(f"--recipe unsloth: Unsloth cannot run here: {e}") from e
    from unsloth import FastLanguageModel

    return FastLanguageModel


def random_checkpoint(cfg: C.RunConfig, device: torch.device) -> Path:
    """A random-init shape written as a bf16 safetensors checkpoint with its tokenizer, for loaders that take only
    a path (Unsloth). Built the way the other recipes build it, from the current seed, so all of them start from
    the same weights; written once per shape and reused (keyed by the model config)."""
    hf = sources.load_hf_config(cfg.model)
    key = hashlib.sha256(hf.to_json_string(use_diff=False).encode()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / f"ftcluster-random-{hf.model_type}-{key}"
    if (out / "config.json").exists():
        return out
    unquantized = cfg.model_copy(update={"method": "lora"})  # the 16-bit weights: a loader quantizes them itself
    model = models.build_module_by_module(unquantized, hf, device, dtype=models.DTYPES[cfg.model.dtype])
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    sources.load_tokenizer(cfg.model).save_pretrained(partial)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    partial.rename(out)  # whole or absent: an interrupted write is never taken for a checkpoint
    return out


def build_unsloth(cfg: C.RunConfig, device: torch.device):
    """Unsloth's recipe from its notebooks: ``FastLanguageModel.from_pretrained`` (4-bit NF4 for QLoRA, 16-bit for
    LoRA, ``full_finetuning`` for full), then ``get_peft_model`` with its own gradient checkpointing."""
    FastLanguageModel = import_unsloth()
    m, lc = cfg.model, cfg.lora
    if m.random_init:
        src, kw = str(random_checkpoint(cfg, device)), {}
    else:
        src, kw = sources.resolve_source(m)
    checkpointing = "unsloth" if m.gradient_checkpointing else False
    model, _ = FastLanguageModel.from_pretrained(
        src, max_seq_length=cfg.data.max_seq_len, dtype=models.DTYPES[m.dtype], load_in_4bit=cfg.method == "qlora",
        load_in_16bit=cfg.method == "lora", full_finetuning=cfg.method == "full", device_map={"": device},
        use_gradient_checkpointing=checkpointing, use_exact_model_name=True, random_state=cfg.training.seed, **kw)
    if cfg.method != "full":
        model = FastLanguageModel.get_peft_model(
            model, r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
            bias="none", use_gradient_checkpointing=checkpointing, random_state=cfg.training.seed)
    FastLanguageModel.for_training(model)
    return model


def optimizer(cfg: C.RunConfig, params, device: torch.device):
    o = cfg.optimizer
    kw = dict(lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, fused=device.type == "cuda", **kw)
    import bitsandbytes as bnb

    return {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
            "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[o.name](params, **kw)


def grouped_rows(cfg: C.RunConfig, tokenizer, n_rows: int) -> torch.Tensor:
    """run_clm's ``group_texts``: every example's tokens end to end, cut into rows of ``max_seq_len``."""
    train = reading.load_examples(cfg.data, cfg.training.seed).train
    stream: list[int] = []
    need = n_rows * cfg.data.max_seq_len
    while len(stream) < need:
        for ex in train:
            stream += formatting.tokenize_example(tokenizer, ex, cfg.data)["input_ids"]
            if len(stream) >= need:
                break
    return torch.tensor(stream[:need]).view(n_rows, cfg.data.max_seq_len)


def run(cfg: C.RunConfig, steps: int, warmup: int, recipe: str = "hf") -> dict:
    if recipe == "unsloth":
        import_unsloth()  # before the tokenizer below imports transformers
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    metrics.start_device_sampler(device)
    torch.manual_seed(cfg.training.seed)
    tokenizer = sources.load_tokenizer(cfg.model)
    mb, gas = cfg.training.micro_batch_size, cfg.training.gradient_accumulation_steps
    rows = grouped_rows(cfg, tokenizer, mb * gas * 4)
    model = build_unsloth(cfg, device) if recipe == "unsloth" else build(cfg, device, recipe)
    opt = optimizer(cfg, [p for p in model.parameters() if p.requires_grad], device)
    trainable, total = models.parameter_counts(model)
    metrics.reset_peaks(device)  # the same window as ftcluster's: training, after the model is built
    times, losses, micro = [], [], 0
    for step in range(warmup + steps):
        metrics.sync(device)
        started = time.perf_counter()
        for _ in range(gas):
            ids = rows[(micro * mb) % len(rows):][:mb].to(device)
            micro += 1
            loss = model(input_ids=ids, labels=ids).loss / gas
            loss.backward()
        if cfg.training.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                           cfg.training.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        metrics.sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - started)
        losses.append(loss.item() * gas)
    step_time = sorted(times)[len(times) // 2]
    tokens_per_step = mb * gas * cfg.data.max_seq_len
    return {"recipe": recipe, "method": cfg.method, "device": str(device), "steps_timed": steps,
            "step_time_s": step_time, "tokens_per_s_total": tokens_per_step / step_time,
            "trainable_params": trainable, "total_params": total, "first_loss": losses[0],
            "final_loss": losses[-1],
            **metrics.memory(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path)
    p.add_argument("--recipe", choices=RECIPES, default="hf")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    result = run(C.load(args.config, args.overrides), args.steps, args.warmup, args.recipe)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
