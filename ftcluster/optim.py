"""The optimizer (with float32 master weights of its own where DeepSpeed keeps none) and the learning-rate
schedule, both stepped by DeepSpeed."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ftcluster.config import RunConfig
from ftcluster.plan import Plan


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(cfg: RunConfig, plan: Plan, model: torch.nn.Module, device: torch.device):
    if cfg.deepspeed.offload_optimizer == "cpu":
        return None  # DeepSpeed builds its CPU Adam from the config
    groups = param_groups(model, cfg.optimizer.weight_decay)
    if plan.masters == "optimizer":
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
    (ZeRO-0, ``Plan.masters`` is ``optimizer``): the inner optimizer steps float32 copies of them, with float32
    gradients, and each step ends by rounding the copies back into the model. Small updates then accumulate in the
    copies instead of vanishing below a bf16 weight's spacing (at lr 5e-5 most do, and stepping the bf16 weights
    themselves scored far lower on the default suite: docs/design.md).

    The copies of each parameter group are one flat float32 tensor (with one flat gradient), as DeepSpeed's are, so
    the inner optimizer steps one tensor a group: bitsandbytes' 8-bit optimizers launch a kernel per tensor, 420 for
    the 135M model's adapters. DeepSpeed's bf16 mode keeps the same copies at ZeRO-0, but adds a hook per gradient
    and steps in Python one tensor at a time; here a step is one cast-copy of the gradients into the flat one, the
    inner optimizer's step, and one copy back.

    Memory is what DeepSpeed's takes: 4 bytes a weight for the copy, and 4 for its gradient only during the step
    (freed after it, as DeepSpeed's ZeRO-1 frees its own: held through backward, they would add their float32 size
    to the peak). Gradients accumulate over micro batches in the model's dtype, as in the HF Trainer's bf16
    loop; a weight no loss reached steps on a zero gradient, as in DeepSpeed's flat groups. Float32 weights (PEFT's
    upcast adapters) need no copy: the inner optimizer steps them in place. The copies are part of ``state_dict``,
    so a resumed run continues from them, not from their rounding."""

    def __init__(self, groups: list[dict], make_inner):
        self.low: list[torch.Tensor] = []  # the 16-bit weights, group after group
        self.views: list[torch.Tensor] = []  # each one's float32 copy, a view into its group's flat tensor
        self.flats: list[torch.Tensor] = []
        self.sizes: list[list[int]] = []  # the weights' element counts, flat tensor by flat tensor
        inner_groups = []
        for g in groups:
            low = [p for p in g["params"] if p.dtype != torch.float32]
            params = [p for p in g["params"] if p.dtype == torch.float32]
            if low:
                devices = {p.device for p in low}
                if len(devices) > 1:
                    raise ValueError(f"float32 master weights: one parameter group spans {sorted(map(str, devices))}")
                sizes = [p.numel() for p in low]
                flat = torch.empty(sum(sizes), dtype=torch.float32, device=low[0].device)
                views = [v.view_as(p) for v, p in zip(flat.split(sizes), low)]
                with torch.no_grad():
                    torch._foreach_copy_(views, [p.detach() for p in low])
                self.low += low
                self.views += views
                self.flats.append(flat)
                self.sizes.append(sizes)
                params.append(flat)
            inner_groups.append({**g, "params": params})
        self.inner = make_inner(inner_groups)
        # The inner optimizer's groups are this one's (the same dicts): the LR schedule sets "lr" on them.
        super().__init__(self.inner.param_groups, self.inner.defaults)
        self.state = self.inner.state

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Float32Masters.step takes no closure")
        grad_views = []
        for flat, sizes in zip(self.flats, self.sizes):
            flat.grad = torch.empty_like(flat)
            grad_views += flat.grad.split(sizes)
        grad_views = [g.view_as(p) for g, p in zip(grad_views, self.low)]
        if all(p.grad is not None for p in self.low):
            torch._foreach_copy_(grad_views, [p.grad for p in self.low])
        else:
            for p, g in zip(self.low, grad_views):
                g.copy_(p.grad) if p.grad is not None else g.zero_()
        self.inner.step()
        torch._foreach_copy_(self.low, self.views)
        for flat in self.flats:
            flat.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        # The flat gradients live only during a step: only the model's own are cleared.
        for p in self.low:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict:
        return {**self.inner.state_dict(), "float32_masters": [f.detach() for f in self.flats]}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        if "float32_masters" not in state_dict:
            raise ValueError("the checkpoint's optimizer state holds no float32 master weights: it was written by "
                             "DeepSpeed's own bf16 optimizer (a ZeRO-0 run of ftcluster before 2026-11-27) or with "
                             "optimizer.master_weights=bf16, and this run cannot continue it. Resume it with the "
                             "settings it was saved with, or start a new run from its weights.")
        saved = state_dict.pop("float32_masters")
        if [t.numel() for t in saved] != [f.numel() for f in self.flats]:
            raise ValueError(f"the checkpoint's float32 master weights hold {[t.numel() for t in saved]} elements a "
                             f"group, this model's {[f.numel() for f in self.flats]}: it was saved from another model "
                             "or method")
        with torch.no_grad():
            for flat, t in zip(self.flats, saved):
                flat.copy_(t)
            torch._foreach_copy_(self.low, self.views)
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


def total_optimizer_steps(cfg: RunConfig, plan: Plan, batches_per_epoch: int) -> int:
    """The run's optimizer steps: ``training.max_steps``, else the epochs' (each of its whole global batches, the
    same number whatever the worker count that keeps the plan's global batch)."""
    per_epoch = batches_per_epoch // plan.accumulation
    if per_epoch == 0:
        raise ValueError(
            f"one epoch gives {batches_per_epoch} micro batches per worker, fewer than the "
            f"{plan.accumulation} a step accumulates (training.gradient_accumulation_steps); lower it or add data"
        )
    return cfg.training.max_steps or per_epoch * cfg.training.epochs
