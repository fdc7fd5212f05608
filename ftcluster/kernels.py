"""Fused GPU kernels from Liger Kernel: RMSNorm, SwiGLU and RoPE in Triton, and the fused linear + cross-entropy
loss, which computes the output layer and the loss a chunk of tokens at a time so the logits are never held whole.
Applied through Liger's documented per-architecture functions, to the built model instance.

``model.liger_kernel``: ``auto`` applies them on a CUDA device when Liger is installed and knows the architecture,
and says why when it does not; ``on`` requires them (the config and the driver refuse a CPU run or a missing
install before anything starts); ``off`` never applies them.
"""

from __future__ import annotations

import functools
import importlib.util
import sys

from torch import nn

from ftcluster import compiled
from ftcluster.config import ConfigError, RunConfig

# model_type -> Liger's apply function; each takes rope, rms_norm, swiglu, fused_linear_cross_entropy and model.
APPLY = {"llama": "apply_liger_kernel_to_llama", "mistral": "apply_liger_kernel_to_mistral",
         "qwen2": "apply_liger_kernel_to_qwen2", "qwen3": "apply_liger_kernel_to_qwen3"}
INSTALL = "pip install 'ftcluster[liger]' (liger-kernel, which needs Triton and a CUDA GPU)"


def installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def check_driver(cfg: RunConfig, model_type: str) -> None:
    """``model.liger_kernel=on`` where Liger cannot run: refused on the driver, before Ray starts."""
    if cfg.model.liger_kernel != "on":
        return
    if not installed():
        raise ConfigError(f"model.liger_kernel=on: liger_kernel is not installed here; {INSTALL}, or set "
                          "model.liger_kernel=auto to run without it")
    if model_type not in APPLY:
        raise ConfigError(f"model.liger_kernel=on: Liger has no kernels wired here for model_type {model_type!r} "
                          f"(known: {', '.join(APPLY)}); set model.liger_kernel=auto or off")


def plan(cfg: RunConfig, model_type: str, device_type: str) -> tuple[dict | None, str]:
    """Which Liger kernels this run gets (the apply function's keyword arguments, or None) and a line saying so."""
    mode = cfg.model.liger_kernel
    if mode == "off":
        return None, "Liger kernels: off (model.liger_kernel=off)"
    why_not = None
    if device_type != "cuda":
        why_not = f"the device is {device_type}; Liger's kernels are Triton kernels for CUDA GPUs"
    elif not installed():
        why_not = f"liger_kernel is not installed ({INSTALL})"
    elif model_type not in APPLY:
        why_not = f"Liger has no kernels wired here for model_type {model_type!r} (known: {', '.join(APPLY)})"
    if why_not:
        if mode == "on":
            raise ConfigError(f"model.liger_kernel=on: {why_not}; set model.liger_kernel=auto or off")
        return None, f"Liger kernels: not applied, {why_not}"
    # The fused loss reads the output layer's weight directly, not through the module's forward, so it would see
    # ZeRO-3's empty partition instead of the gathered weight; under ZeRO-3 the chunked loss
    # (activations.chunked_causal_lm_loss) keeps the logits small instead.
    fused_loss = not cfg.partitions_parameters
    # Compiled layers: Inductor fuses the norm, SwiGLU and RoPE itself, and Liger's autograd functions would break
    # the layer's graph into pieces at each of them (Liger-Kernel#174; transformers' own Liger layers mark them
    # not compile-friendly), each piece paying its own guards and runtime wrapper. Layers are never compiled under
    # ZeRO-3, so the fused loss is always there when they are.
    in_layers = not compiled.compiles(cfg, device_type)
    kinds = (["RMSNorm", "SwiGLU", "RoPE"] if in_layers else []) + (["fused linear cross-entropy"] if fused_loss else [])
    return (dict(rope=in_layers, rms_norm=in_layers, swiglu=in_layers, cross_entropy=False,
                 fused_linear_cross_entropy=fused_loss),
            "Liger kernels: " + ", ".join(kinds) + ("" if fused_loss else " (no fused loss under ZeRO-3)")
            + ("" if in_layers else " (the compiled layers fuse their norms, SwiGLU and RoPE themselves)"))


_REPLACED: dict[str, dict[str, object]] = {}
"""transformers' own objects that a Liger apply function replaced in a modeling module, by module name."""


def apply(model: nn.Module, cfg: RunConfig, device_type: str) -> str:
    """Apply the planned kernels to ``model`` (the causal LM, before PEFT wraps it). Returns the line to print.

    Liger's apply functions patch the instance and also replace names in transformers' modeling module: its norm
    and MLP classes (so every model built later in the process is built from Liger's modules, whatever its own
    plan: a compiled layer then traced Liger's autograd functions, which a selective checkpoint cannot) and its
    RoPE function (looked up at every call; no instance holds it). Here a model gets its own plan only: the classes
    go back as soon as the instance is patched, and a RoPE function an earlier model's plan put in place goes back
    before this one's plan is applied."""
    module = sys.modules[type(model).__module__]
    for name, own in _REPLACED.get(module.__name__, {}).items():
        setattr(module, name, own)
    kinds, line = plan(cfg, model.config.model_type, device_type)
    if kinds is not None:
        import liger_kernel.transformers as liger

        before = dict(vars(module))
        getattr(liger, APPLY[model.config.model_type])(model=model, **kinds)
        scale = cfg.model.fused_loss_chunk_scale
        if kinds["fused_linear_cross_entropy"] and scale != 1:
            # Liger's causal-LM forward hands its keyword arguments on to its loss, which takes those of
            # liger_fused_linear_cross_entropy (LigerForCausalLMLoss); the decoder's layers ignore the extra one.
            model.forward = functools.partial(model.forward, chunk_mem_const=scale)
            line += f" (chunks {scale}x Liger's)"
        for name, own in before.items():
            if vars(module).get(name) is not own:
                _REPLACED.setdefault(module.__name__, {})[name] = own
                if isinstance(own, type):
                    setattr(module, name, own)
    return line
