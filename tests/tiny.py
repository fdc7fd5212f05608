"""A tiny Llama and a locally trained tokenizer (no hub): what the tests train."""

from __future__ import annotations

from pathlib import Path

from benchmarks.shapes import build_tokenizer


def build_model(out: Path, tokenizer, layers: int = 2, hidden: int = 64) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build(root: Path) -> Path:
    out = root / "tiny-llama"
    if not (out / "config.json").exists():
        build_model(out, build_tokenizer(out))
    return out


def tiny_overrides(model_dir: Path, storage: Path, name: str, **extra) -> list[str]:
    """Overrides that turn any recipe into a seconds-long CPU run on the tiny model."""
    base = {
        "model.name_or_path": str(model_dir), "model.dtype": "bfloat16",
        "data.max_examples": 256, "data.max_seq_len": 128, "data.eval_fraction": 0.1,
        "training.micro_batch_size": 2, "training.max_steps": 12, "training.log_every": 2,
        "training.eval_batches": 4, "scaling.num_workers": 2, "scaling.use_gpu": False,
        "output.storage_path": str(storage), "output.name": name, "optimizer.lr": 3e-3,
        "scheduler.warmup_steps": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def fixed_batch(rows: int = 2, length: int = 24):
    """The same random token ids every call: a batch to overfit for a few steps."""
    import torch

    return torch.randint(5, 500, (rows, length), generator=torch.Generator().manual_seed(0))


def adamw_losses(model, steps: int, lr: float, ids=None) -> list[float]:
    """Losses of ``steps`` plain AdamW steps on one fixed batch (the trainable parameters only)."""
    import torch

    ids = fixed_batch() if ids is None else ids
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def engine_losses(engine, steps: int) -> list[float]:
    """Losses of ``steps`` DeepSpeed engine steps on one fixed batch."""
    ids = fixed_batch()
    losses = []
    for _ in range(steps):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def train_recording(loop, cfg, tokenizer, progress, held) -> tuple[list[float], dict]:
    """Run the worker's step loop, recording ``held()`` after the build, at every reported step (and evaluation)
    and after every checkpoint save that the loop asks for. Returns (losses, states by moment)."""
    import tempfile

    from ftcluster import checkpoint, engine

    losses, states = [], {"build": held()}

    def report(record, kind) -> None:
        losses.append(record.loss)
        states[f"step {record.step}{' eval' if record.eval_loss is not None else ''}"] = held()
        if kind:
            with tempfile.TemporaryDirectory() as d:
                checkpoint.save(loop.engine, cfg, progress, d, kind, tokenizer=tokenizer)
            states[f"step {record.step} saved"] = held()

    engine.train(loop, progress, engine.Hooks(report))
    return losses, states


def plan_for(cfg, device: str = "cpu", **hardware):
    """The run's plan on a worker of ``device`` (``hardware``: more ``Hardware`` fields, e.g. liger_installed),
    with the data source left unread unless ``read_data=True``."""
    from ftcluster import plan
    from ftcluster.hardware import Hardware

    read_data = hardware.pop("read_data", False)
    return plan.make(cfg, Hardware(device=device, device_source="the test", **hardware), read_data=read_data)


def model_for(cfg, device="cpu"):
    """The model a worker on ``device`` builds for ``cfg``, by its plan."""
    from ftcluster import models

    return models.build_model(cfg, plan_for(cfg, str(device)), device)


def base_for(cfg, device="cpu"):
    """The base model (no adapters, no kernels) a worker on ``device`` loads for ``cfg``, by its plan."""
    import torch

    from ftcluster import models

    return models.build_base_model(cfg, plan_for(cfg, str(device)), torch.device(device))


def plan_here(cfg):
    """The run's plan on this host's hardware, as the driver makes it (the GPU tests: Liger as installed there)."""
    from ftcluster import hardware, plan

    return plan.make(cfg, hardware.here(cfg), read_data=False)
