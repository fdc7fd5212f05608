"""The optimizer (with float32 master weights of its own where DeepSpeed keeps none) and the learning-rate
schedule, both stepped by DeepSpeed."""

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
    groups = param_groups(model, cfg.optimizer.weight_decay)
    if cfg.keeps_float32_masters:
        return Float32Masters(groups, lambda master_groups: _optimizer(cfg, master_groups, device))
    return _optimizer(cfg, groups, device)


def _optimizer(cfg: RunConfig, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optimizer
    kw = dict(lr=o.lr, betas=o.betas, eps=o.eps)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, fused=device.type == "cuda", **kw)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[o.name]
    return cls(groups, **kw)


class Float32Masters(torch.optim.Optimizer):
    """Float32 master weights kept by the optimizer itself, where DeepSpeed hands it the model's 16-bit weights
    (ZeRO-0, ``RunConfig.keeps_float32_masters``): the inner optimizer steps float32 copies of them, with float32
    gradients, and each step ends by rounding the copies back into the model. Small updates then accumulate in the
    copies instead of vanishing below a bf16 weight's spacing (at lr 5e-5 most do: stepping the bf16 weights
    themselves scored 67.7% against 93.8% on the default suite, reports/default/2026-11-27-1xh200-full-bf16-master).

    DeepSpeed's bf16 mode keeps the same copies at ZeRO-0, but adds a hook per gradient and steps in Python one
    tensor at a time (0.17-0.19 s a step of the 135M shape on an H200 against 0.08 for the bf16 weights alone);
    here a step is one cast-copy of the gradients, the inner optimizer's fused step, and one copy back. Memory is
    what DeepSpeed's takes: 4 bytes a weight for the copy and 4 for its gradient. Gradients accumulate over micro
    batches in the model's dtype, as they do in the HF Trainer's bf16 loop. Float32 weights (PEFT's upcast adapters)
    need no copy: the inner optimizer steps them in place. The copies are part of ``state_dict``, so a resumed run
    continues from them, not from their rounding."""

    def __init__(self, groups: list[dict], make_inner):
        low = [p for g in groups for p in g["params"] if p.dtype != torch.float32]
        with torch.no_grad():
            masters = {p: p.detach().float() for p in low}
        for m in masters.values():
            m.grad = torch.zeros_like(m)  # one buffer each, written at every step
        self.low = low
        self.masters = [masters[p] for p in low]
        self.inner = make_inner([{**g, "params": [masters.get(p, p) for p in g["params"]]} for g in groups])
        # The inner optimizer's groups are this one's (the same dicts): the LR schedule sets "lr" on them.
        super().__init__(self.inner.param_groups, self.inner.defaults)
        self.state = self.inner.state

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Float32Masters.step takes no closure")
        have = [i for i, p in enumerate(self.low) if p.grad is not None]
        if len(have) == len(self.low):
            torch._foreach_copy_([m.grad for m in self.masters], [p.grad for p in self.low])
        else:  # a weight no loss reached this step: its copy takes no gradient, as the weight itself would not
            for i, (p, m) in enumerate(zip(self.low, self.masters)):
                if p.grad is None:
                    m.grad = None
                else:
                    if m.grad is None:
                        m.grad = torch.empty_like(m)
                    m.grad.copy_(p.grad)
        self.inner.step()
        torch._foreach_copy_(self.low, self.masters)

    def zero_grad(self, set_to_none: bool = True) -> None:
        # The copies' gradients are overwritten at every step: only the model's own are cleared.
        for p in self.low:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict:
        return {**self.inner.state_dict(), "float32_masters": [m.detach() for m in self.masters]}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("float32_masters")
        if len(saved) != len(self.masters):
            raise ValueError(f"the checkpoint's optimizer holds {len(saved)} float32 master weights, this model "
                             f"{len(self.masters)}: it was saved from another model or method")
        with torch.no_grad():
            torch._foreach_copy_(self.masters, [t.to(m.device) for t, m in zip(saved, self.masters)])
            torch._foreach_copy_(self.low, self.masters)
        self.inner.load_state_dict(state_dict)
        # torch's load_state_dict replaces the groups and state it held: share the inner optimizer's again.
        self.param_groups, self.state = self.inner.param_groups, self.inner.state


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
