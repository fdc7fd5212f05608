"""Fused GPU kernels from Liger Kernel: RMSNorm, SwiGLU and RoPE in Triton, and the fused linear + cross-entropy
loss, which computes the output layer and the loss a chunk of tokens at a time so the logits are never held whole.
Applied through Liger's documented per-architecture functions, to the built model instance, as the plan says
(``Plan.liger_layers``, ``Plan.loss``; ``model.liger_kernel`` is resolved there).
"""

from __future__ import annotations

from torch import nn

from ftcluster import patches
from ftcluster.config import RunConfig
from ftcluster.plan import LIGER_MODEL_TYPES, Plan

APPLY = {t: f"apply_liger_kernel_to_{t}" for t in LIGER_MODEL_TYPES}
"""model_type -> Liger's apply function; each takes rope, rms_norm, swiglu, fused_linear_cross_entropy and model."""


def kinds(plan: Plan) -> dict | None:
    """The apply function's keyword arguments for the plan, or None where Liger applies nothing."""
    fused = plan.loss == "liger-fused"
    if not (plan.liger_layers or fused):
        return None
    return dict(rope=plan.liger_layers, rms_norm=plan.liger_layers, swiglu=plan.liger_layers, cross_entropy=False,
                fused_linear_cross_entropy=fused)


def apply(model: nn.Module, cfg: RunConfig, plan: Plan) -> str:
    """Apply the planned kernels to ``model`` (the causal LM, before PEFT wraps it), to this instance only
    (``patches.liger_apply_to_instance``). Returns the line to print."""
    applied = kinds(plan)
    patches.liger_apply_to_instance(model, APPLY[model.config.model_type] if applied else None, applied or {})
    if applied is None:
        return f"Liger kernels: none ({plan.reasons.get('liger_layers', '')})"
    names = (["RMSNorm", "SwiGLU", "RoPE"] if plan.liger_layers else []) + \
        (["fused linear cross-entropy"] if applied["fused_linear_cross_entropy"] else [])
    line = "Liger kernels: " + ", ".join(names)
    if applied["fused_linear_cross_entropy"]:
        patches.liger_fused_loss_in_eval(model)
    scale = cfg.model.fused_loss_chunk_scale
    if applied["fused_linear_cross_entropy"] and scale != 1:
        patches.liger_fused_loss_chunks(model, scale)
        line += f" (chunks {scale}x Liger's)"
    return line
