"""Checkpoints: what a Ray Train checkpoint holds, and how a worker restores from one.

Layout of one checkpoint directory (every worker writes its own files into it; Ray merges them)::

    deepspeed/state/...        DeepSpeed engine state: trainable weights (frozen base excluded for adapters),
                               optimizer shards per rank, LR schedule
    progress.json              step, epoch, batch within the epoch, tokens seen (rank 0)
    rng/rank{r}.pt             python / torch RNG state per rank
    hf/                        (final checkpoints) the adapter or model in Hugging Face format + run.yaml
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import torch

from ftcluster.config import RunConfig, save_resolved
from ftcluster.records import CheckpointKind, Progress

TAG = "state"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def save_hf(engine, cfg: RunConfig, out: Path, tokenizer=None) -> None:
    """The trained adapter or model in Hugging Face format. Under ZeRO-3 only the trainable parameters are
    gathered for an adapter (a few MB), never the whole model (peft#453); full models are gathered one module at
    a time by DeepSpeed."""
    model = engine.module
    rank = _rank()
    if cfg.trains_adapter:
        if cfg.deepspeed.zero_stage == 3:
            import deepspeed

            trainable = [p for p in model.parameters() if p.requires_grad]
            with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
                if rank == 0:
                    model.save_pretrained(out)
        elif rank == 0:
            model.save_pretrained(out)
    else:
        state = engine._zero3_consolidated_16bit_state_dict() if cfg.deepspeed.zero_stage == 3 else None
        if rank == 0:
            model.save_pretrained(out, state_dict=state)
    if rank == 0:
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        save_resolved(cfg, out / "run.yaml")


def save(engine, cfg: RunConfig, progress: Progress, directory: Path, kind: CheckpointKind, tokenizer=None) -> None:
    """Write this worker's part of a checkpoint into ``directory`` (all workers call it)."""
    directory = Path(directory)
    engine.save_checkpoint(str(directory / "deepspeed"), tag=TAG, exclude_frozen_parameters=cfg.trains_adapter)
    rank = _rank()
    (directory / "rng").mkdir(exist_ok=True)
    torch.save({"python": random.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               directory / "rng" / f"rank{rank}.pt")
    if rank == 0:
        (directory / "progress.json").write_text(json.dumps(asdict(progress)))
    if kind is CheckpointKind.FINAL and cfg.output.save_final_model:
        save_hf(engine, cfg, directory / "hf", tokenizer)


def restore(engine, cfg: RunConfig, directory: Path) -> Progress:
    """Load engine state, RNG and progress from a checkpoint directory; training continues at the saved step."""
    directory = Path(directory)
    # Adapters were saved without the frozen base, so the module state is loaded non-strictly; the base is
    # already in place from the model builder (peft#746).
    _, client = engine.load_checkpoint(str(directory / "deepspeed"), tag=TAG,
                                       load_module_strict=not cfg.trains_adapter)
    if client is None:
        raise RuntimeError(f"checkpoint {directory} holds no DeepSpeed state for this run (different ZeRO layout?)")
    rng_file = directory / "rng" / f"rank{_rank()}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return Progress(**json.loads((directory / "progress.json").read_text()))
