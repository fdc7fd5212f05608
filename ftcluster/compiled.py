"""Decoder layers compiled with ``torch.compile``, one layer at a time ("regional compilation"): every layer of a
model has the same code, so torch compiles it once and reuses it for all of them (nn.Module inlining makes the
layer's parameters inputs of the graph rather than constants). A compiled layer runs as a few fused kernels launched
from one call, where eager PyTorch launches each of dozens of small kernels from Python: small and adapter models
spend most of a step in that Python, and the GPU waits.

``model.compile``: ``auto`` compiles on a CUDA device where nothing in the layer's call stands in its way;
``on`` requires it; ``off`` (the default) never compiles. Measured on one H100 at the Llama-3.2-1B shape
(reports/llama-1b/2026-11-26-1xh100-compile), compiled layers were slower, not faster: 0.87x the eager step time
for LoRA and 0.83x for QLoRA, with the same losses; so they are opt-in until a profile says why. Not compiled:
- under ZeRO-3, whose gather and release hooks run in each layer's call and swap its parameters' data;
- with ``model.activation_offloading``, whose saved-tensor hooks torch.compile cannot trace.
"""

from __future__ import annotations

from torch import nn

from ftcluster import activations
from ftcluster.config import ConfigError, RunConfig


def why_not(cfg: RunConfig, device_type: str) -> str | None:
    """Why this run's layers cannot be compiled, or None."""
    if cfg.partitions_parameters:
        return "ZeRO-3 gathers and releases each layer's parameters in hooks on the layer's call"
    if cfg.model.activation_offloading:
        return "model.activation_offloading's saved-tensor hooks cannot be traced by torch.compile"
    if device_type != "cuda":
        return f"the device is {device_type}; compiled layers pay off on GPUs, whose kernels the host must keep fed"
    return None


def compiles(cfg: RunConfig, device_type: str) -> bool:
    """Whether this run's decoder layers will be compiled with Inductor."""
    return cfg.model.compile != "off" and why_not(cfg, device_type) is None


def apply(model: nn.Module, cfg: RunConfig, device_type: str, backend="inductor") -> str:
    """Compile each decoder layer of ``model`` (after checkpointing and kernels are in place; compilation happens at
    the first call). Returns the line to print."""
    mode = cfg.model.compile
    if mode == "off":
        return "compiled layers: off (model.compile=off)"
    reason = why_not(cfg, device_type) if backend == "inductor" else None
    if reason:
        if mode == "on":
            raise ConfigError(f"model.compile=on: {reason}; set model.compile=auto or off")
        return f"compiled layers: no, {reason}"
    layers = activations.decoder_layers(model)
    if not layers:
        if mode == "on":
            raise ConfigError(f"model.compile=on: {type(model).__name__} has no decoder layers to compile; set "
                              "model.compile=auto or off")
        return "compiled layers: no, the model has no decoder layers that transformers marks"
    for layer in layers:
        layer.compile(backend=backend)
    name = backend if isinstance(backend, str) else getattr(backend, "__name__", "a custom backend")
    return f"compiled layers: {len(layers)} x {type(layers[0]).__name__} with torch.compile ({name})"

