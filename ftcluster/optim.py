"""The optimizer and the learning-rate schedule (both stepped by DeepSpeed)."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ftcluster.config import RunConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(cfg: RunConfig, model: torch.nn.Module, device: torch.device):
    if cfg.deepspeed.offload_optimizer == "cpu":
        return None  # DeepSpeed builds its CPU Adam from the config
    o = cfg.optimizer
    groups = param_groups(model, o.weight_decay)
    kw = dict(lr=o.lr, betas=o.betas, eps=o.eps)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, fused=device.type == "cuda", **kw)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[o.name]
    return cls(groups, **kw)


def lr_lambda(cfg: RunConfig, total_steps: int) -> Callable[[int], float]:
    s = cfg.scheduler
    warmup = s.warmup_steps or int(s.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if s.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if s.name == "cosine" else 1.0 - progress
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * shape

    return factor


def total_optimizer_steps(cfg: RunConfig, batches_per_epoch: int) -> int:
    per_epoch = batches_per_epoch // cfg.training.gradient_accumulation_steps
    if per_epoch == 0:
        raise ValueError(
            f"one epoch gives {batches_per_epoch} micro batches per worker, fewer than "
            f"training.gradient_accumulation_steps={cfg.training.gradient_accumulation_steps}; lower it or add data"
        )
    return cfg.training.max_steps or per_epoch * cfg.training.epochs
