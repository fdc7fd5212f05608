"""What a worker actually built, read back from the objects themselves (the DeepSpeed engine, the model's layers,
modules and config), in the plan's terms: the worker checks it against its plan before the first step, so a
builder that decided anything on its own shows up as an error, not as a silent difference."""

from __future__ import annotations

from torch import nn

from ftcluster import activations, layer_shards, patches
from ftcluster.plan import Plan


def _base(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)
    return get() if get is not None else model


def _module_of(fn) -> str:
    """The module that defines ``fn``, through wrappers (``__wrapped__``), partials and bound methods."""
    for _ in range(16):
        inner = getattr(fn, "__wrapped__", None) or getattr(fn, "func", None) or getattr(fn, "__func__", None)
        if inner is None:
            break
        fn = inner
    return getattr(fn, "__module__", "") or ""


def observe(model: nn.Module, engine) -> dict:
    """The plan's decisions as the built model and engine show them."""
    from ftcluster import linear4bit

    base = _base(model)
    layers = activations.decoder_layers(base)
    params = list(model.parameters())
    frozen = [p for p in params if not p.requires_grad]
    if not frozen:
        frozen_base = None
    elif layer_shards.of(model) is not None:
        frozen_base = "layer-shards"
    elif any(hasattr(p, "ds_id") for p in frozen):
        frozen_base = "deepspeed"
    else:
        frozen_base = "whole"
    norm = next((m for m in base.modules() if type(m).__name__.endswith("RMSNorm")), None)
    four_bit = [m for m in base.modules() if isinstance(m, linear4bit.Linear4bit)]
    return {
        "zero_stage": engine.zero_optimization_stage(),
        "frozen_base": frozen_base,
        "compile": bool(layers) and all(patches.is_compiled(layer) for layer in layers),
        "liger_layers": norm is not None and _module_of(norm.forward).startswith("liger_kernel"),
        "loss": "liger-fused" if _module_of(vars(base).get("forward")).startswith("liger_kernel") else "chunked",
        "attention": patches.attention_of(base.config),
        "checkpointed_layers": sum(getattr(layer, "ftcluster_checkpoint", None) == "layer" for layer in layers),
        "recompute_only": ("bitsandbytes",) if any(_policy(layer) is not None for layer in layers) else (),
        "keep_recomputed_weights": any(m.keep_dequantized for m in four_bit),
        "quant_storage": _storage(four_bit[0]) if four_bit else None,
    }


def _policy(layer: nn.Module):
    """The selective-checkpointing policy a layer's checkpoint runs under (activations.RecomputePolicy), or None."""
    if getattr(layer, "ftcluster_checkpoint", None) is None:
        return None
    _forward, _host, context_fn = layer.forward.args  # activations._checkpointed's
    return context_fn


def _storage(module) -> str:
    return str(getattr(module.weight, "quant_storage", module.weight.dtype)).removeprefix("torch.")


def check(plan: Plan, model: nn.Module, engine) -> None:
    """Raise where what was built differs from what the plan says."""
    built = observe(model, engine)
    wrong = [f"{name}: built {value!r}, planned {getattr(plan, name)!r}" for name, value in built.items()
             if value != getattr(plan, name)]
    if wrong:
        raise RuntimeError("the worker built a different run than its plan says (a builder decided on its own): "
                           + "; ".join(wrong))
