"""Model builders: ``full`` (all weights trainable), ``lora`` (frozen base + PEFT LoRA), ``qlora`` (4-bit NF4 base
from bitsandbytes + LoRA). Plain functions from the config to an ``nn.Module``; no trainer classes."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import ContextManager, Protocol

import torch
from torch import nn

from ftcluster import activations, compiled, kernels, layer_shards, patches, sources
from ftcluster.config import ConfigError, RunConfig
from ftcluster.plan import Plan


class Partition(Protocol):
    """ZeRO-3's partitioning during the build: DeepSpeed's (``deepspeed_setup.Zero3Partition``), or a frozen
    base's by whole decoder layers (``layer_shards.LayerShards``)."""

    loads_checkpoints: bool
    """Whether ``loading`` exists: ``from_pretrained`` can load a checkpoint straight into partitions."""

    def plan(self, model: nn.Module) -> None:
        """See the model's structure (weightless, on the meta device) before any parameter is handed over."""

    def __call__(self, params: list[nn.Parameter], owner: str) -> None:
        """Shard parameters that are final (initialised, quantized); ``owner`` is their module's qualified name."""

    def loading(self) -> ContextManager:
        """A context in which ``from_pretrained`` loads a checkpoint straight into partitions."""

    def adopt(self, model: nn.Module) -> None:
        """Partition a model that was loaded whole (or leave it to ``deepspeed.initialize``)."""

    def finish(self, model: nn.Module) -> None:
        """Whatever the built model needs to run partitioned (hooks)."""


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def linear_module_names(model: nn.Module) -> set[str]:
    """Leaf names of the linear layers LoRA can target (lm_head excluded, as PEFT's 'all-linear' does)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            leaf = name.rsplit(".", 1)[-1]
            if leaf != "lm_head":
                names.add(leaf)
    return names


def check_target_modules(model: nn.Module, cfg: RunConfig) -> None:
    targets = cfg.lora.target_modules
    if targets == "all-linear":
        return
    available = linear_module_names(model)
    missing = [t for t in targets if not any(fnmatch.fnmatch(a, t) for a in available)]
    if missing:
        raise ConfigError(
            f"lora.target_modules: {missing} not found in {model.config.model_type}; its linear layers are "
            f"{sorted(available)} (or use 'all-linear')"
        )
    all_modules = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing_save = [m for m in cfg.lora.modules_to_save if m not in all_modules]
    if missing_save:
        raise ConfigError(f"lora.modules_to_save: {missing_save} not found in {model.config.model_type}")


def bnb_config(cfg: RunConfig, quant_storage: str):
    """bitsandbytes' 4-bit config for QLoRA; ``quant_storage``: the plan's dtype for the packed weights."""
    from transformers import BitsAndBytesConfig

    q = cfg.quantization
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
        bnb_4bit_quant_storage=torch.uint8 if quant_storage == "uint8" else DTYPES[quant_storage],
    )


def linear_to_4bit(linear: nn.Linear, q, device: torch.device) -> nn.Module:
    """A bitsandbytes Linear4bit holding ``linear``'s weights, quantized on ``device``."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=q.bnb_4bit_compute_dtype, compress_statistics=q.bnb_4bit_use_double_quant,
        quant_type=q.bnb_4bit_quant_type, quant_storage=q.bnb_4bit_quant_storage, device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.data, requires_grad=False, compress_statistics=q.bnb_4bit_use_double_quant,
        quant_type=q.bnb_4bit_quant_type, quant_storage=q.bnb_4bit_quant_storage, module=layer,
    ).to(device)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.to(device), requires_grad=False)
    return layer


def _is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)))


class SafetensorsCheckpoint:
    """The tensors of a local safetensors checkpoint (one file, or shards named by model.safetensors.index.json),
    read one at a time by name."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self._open, self._handles = safe_open, {}
        index = directory / "model.safetensors.index.json"
        if index.exists():
            self.files = {k: directory / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            with safe_open(directory / "model.safetensors", "pt") as f:
                self.files = dict.fromkeys(f.keys(), directory / "model.safetensors")

    @staticmethod
    def found(directory: Path) -> bool:
        return (directory / "model.safetensors.index.json").exists() or (directory / "model.safetensors").exists()

    def get(self, name: str) -> torch.Tensor:
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = self._open(path, "pt")
        return self._handles[path].get_tensor(name)

    def fill(self, module: nn.Module, prefix: str, recurse: bool = True) -> None:
        """Copy the checkpoint's tensors into ``module``'s parameters and persistent buffers (cast to their dtype)."""
        for name, t in (*module.named_parameters(recurse=recurse), *module.named_buffers(recurse=recurse)):
            key = f"{prefix}.{name}"
            if key in self.files:
                t.copy_(self.get(key))


def build_module_by_module(cfg: RunConfig, hf, device: torch.device, partition: Partition | None = None,
                           checkpoint: SafetensorsCheckpoint | None = None, quant=None, **from_config) -> nn.Module:
    """The model built one module at a time: made weightless on the meta device, then each module is given memory
    on ``device`` and filled, from ``checkpoint`` or else by the model's own ``_init_weights`` (random init); for
    QLoRA (``quant``: its ``bnb_config``) each linear layer is quantized to NF4 as soon as it is filled. The peak is the finished model plus one
    16-bit layer, so a 70B QLoRA model (~40 GB in 4 bits, 140 GB in 16) is built on one GPU. With ``partition``
    (ZeRO-3) each module's parameters are handed to it as soon as they are final, so a worker holds only its shard
    plus one module."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf, **from_config)
    if partition is not None:
        partition.plan(model)
    q = quant
    # PEFT's fp32 upcast of the non-quantized parameters would cast a partitioned parameter's empty placeholder and
    # not its shard: cast them here instead, before they are partitioned, and PEFT finds nothing left to cast.
    upcast = q is not None and partition is not None and cfg.quantization.upcast_non_quantized
    tied = model.get_output_embeddings() if getattr(hf, "tie_word_embeddings", False) else None
    with torch.no_grad():
        for parent_name, parent in list(model.named_modules()):
            for name, child in list(parent.named_children()):
                if child is tied or not _is_meta(child):
                    continue  # a tied output layer takes the input embedding's weight below
                qualified = f"{parent_name}.{name}" if parent_name else name
                if any(b.is_meta for b in child.buffers(recurse=False)):
                    # Buffers computed in __init__ (rotary inverse frequencies): construct the module again there.
                    if not hasattr(child, "config"):
                        raise ConfigError(f"model: cannot build {type(child).__name__} ({qualified}) of "
                                          f"{hf.model_type} one module at a time (model.random_init, or 4-bit "
                                          "under ZeRO-3); load it whole instead")
                    with torch.device(device):
                        setattr(parent, name, type(child)(config=child.config))
                    if checkpoint is not None:
                        checkpoint.fill(getattr(parent, name), qualified)
                    if partition is not None:
                        partition(list(getattr(parent, name).parameters()), qualified)
                    continue
                child.to_empty(device=device, recurse=False)
                if checkpoint is None:
                    patches.init_module_weights(model, child)
                else:
                    checkpoint.fill(child, qualified, recurse=False)
                if q is not None and isinstance(child, nn.Linear) and name != "lm_head":
                    quantized = linear_to_4bit(child, q, device)
                    setattr(parent, name, quantized)
                    child.to("meta")  # free its 16-bit weight now: the list above still holds the module
                    child = quantized
                if upcast:
                    for p in child.parameters(recurse=False):
                        if p.__class__.__name__ != "Params4bit" and p.dtype in (torch.float16, torch.bfloat16):
                            p.data = p.data.float()
                if partition is not None:
                    partition(list(child.parameters(recurse=False)), qualified)
    if tied is not None:
        model.tie_weights()
    if q is not None:
        model.config.quantization_config = q
        model.is_loaded_in_4bit = True
    return model


def checkpoint_for_module_build(src: str, kw: dict, meta_model: nn.Module) -> SafetensorsCheckpoint | None:
    """The checkpoint, when it can be read one module at a time: a local safetensors checkpoint that holds every
    tensor of the model under the model's own names (a tied output layer may be absent) and nothing else."""
    directory = Path(src).expanduser()
    if kw or not directory.is_dir() or not SafetensorsCheckpoint.found(directory):
        return None
    ckpt = SafetensorsCheckpoint(directory)
    names = set(meta_model.state_dict())
    required = names
    if getattr(meta_model.config, "tie_word_embeddings", False):
        out = meta_model.get_output_embeddings()
        required = names - {f"{n}.weight" for n, m in meta_model.named_modules() if m is out}
    return ckpt if required <= set(ckpt.files) <= names else None


def build_base_model(cfg: RunConfig, plan: Plan, device: torch.device, partition: Partition | None = None):
    """The base model as the plan builds it (its attention, its 4-bit storage), on ``device`` or partitioned."""
    from transformers import AutoModelForCausalLM

    from ftcluster import attention

    m = cfg.model
    hf = sources.load_hf_config(m)
    if plan.attention == attention.NAME:
        line = attention.register(hf, DTYPES[m.dtype], device)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(line, flush=True)
    common = dict(dtype=DTYPES[m.dtype], attn_implementation=plan.attention, trust_remote_code=m.trust_remote_code)
    quant = bnb_config(cfg, plan.quant_storage) if cfg.method == "qlora" else None
    if m.random_init:
        return build_module_by_module(cfg, hf, device, partition, quant=quant, **common)
    src, kw = sources.resolve_source(m)
    if partition is not None and cfg.method != "qlora" and partition.loads_checkpoints:
        with partition.loading():  # device placement is zero.Init's: no device_map
            return AutoModelForCausalLM.from_pretrained(src, config=hf, **common, **kw)
    if partition is not None:
        # transformers does not load a quantized model inside zero.Init (it would put the whole 4-bit model on each
        # device), nor into a frozen base's layer shards. Read a local checkpoint module by module instead,
        # quantizing and partitioning as it goes.
        with torch.device("meta"):
            checkpoint = checkpoint_for_module_build(src, kw, AutoModelForCausalLM.from_config(hf, **common))
        if checkpoint is not None:
            return build_module_by_module(cfg, hf, device, partition, checkpoint, quant=quant, **common)
        print(f"model.name_or_path={src}: not a local safetensors checkpoint with this model's tensor names; "
              "each GPU loads the whole model before ZeRO-3 partitions it (download it to a directory to "
              "load it partitioned)", flush=True)
    if quant is not None:
        kw["quantization_config"] = quant
    # device_map pins the weights to this worker's device: Ray remaps CUDA_VISIBLE_DEVICES, so "auto" or a bare
    # index would land 4-bit weights on the wrong GPU (accelerate#2713).
    model = AutoModelForCausalLM.from_pretrained(src, config=hf, device_map={"": device}, **common, **kw)
    if partition is not None:
        partition.adopt(model)
    return model


def _prepare_for_kbit(model: nn.Module, cfg: RunConfig) -> None:
    from ftcluster import linear4bit

    linear4bit.adopt(model)
    if cfg.quantization.upcast_non_quantized:
        from peft import prepare_model_for_kbit_training

        # Checkpointing is ours (activations.checkpoint_layers); PEFT's would checkpoint each layer a second time.
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # Without the upcast, the frozen 4-bit base needs nothing else: non-reentrant checkpointing does not need
    # inputs that require grad, and norms/embeddings stay in bf16.


def build_model(cfg: RunConfig, plan: Plan, device: torch.device | str = "cpu",
                partition: Partition | None = None) -> nn.Module:
    """The model to train, as the plan says, on ``device``: all parameters trainable for ``full``, LoRA adapters only
    otherwise. ``partition`` (ZeRO-3's, from ``deepspeed_setup.zero3_partition``) shards the base model as it is
    built or loaded."""
    device = torch.device(device)
    model = build_base_model(cfg, plan, device, partition)
    if partition is not None:
        partition.finish(model)
    model.config.use_cache = False
    line = kernels.apply(model, cfg, plan)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(line, flush=True)
    activations.use_chunked_loss(model)
    recompute = frozenset(plan.recompute_only)
    checkpointed = plan.checkpointed_layers
    if checkpointed:
        activations.checkpoint_layers(model, offload=plan.activation_offloading, count=checkpointed,
                                      must_recompute=recompute)
    if recompute:
        activations.recompute_only(activations.decoder_layers(model)[checkpointed:], recompute)
    if cfg.method == "full":
        model.requires_grad_(True)
    else:
        model = _with_adapters(model, cfg)
    if plan.tiled_mlp:
        from ftcluster import tiled_mlp

        tiled_mlp.apply(model)
    if plan.keep_recomputed_weights:
        from ftcluster import linear4bit

        linear4bit.keep_dequantized_in(activations.decoder_layers(model)[:checkpointed])
    line = compiled.apply(model, plan)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(line, flush=True)
    return model


def _with_adapters(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """``model`` frozen, with PEFT's LoRA adapters (on the 4-bit base, prepared, for QLoRA)."""
    check_target_modules(model, cfg)
    model.requires_grad_(False)
    if cfg.method == "qlora":
        _prepare_for_kbit(model, cfg)
    from peft import LoraConfig, get_peft_model

    lc = cfg.lora
    peft_cfg = LoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules, bias=lc.bias,
        modules_to_save=lc.modules_to_save or None, task_type="CAUSAL_LM",
    )
    # Adapters in the base dtype: the fp32 master copy lives in DeepSpeed's optimizer, and fp32 adapters would
    # upcast every LoRA layer's activations.
    peft_model = get_peft_model(model, peft_cfg, autocast_adapter_dtype=cfg.quantization.upcast_non_quantized)
    if sources.is_hub_id(cfg.model.name_or_path):  # the adapter names the hub id, not the cache it was read from
        peft_model.peft_config["default"].base_model_name_or_path = cfg.model.name_or_path
        peft_model.peft_config["default"].revision = cfg.model.revision
    return peft_model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) counted as PEFT counts them: a 4-bit weight stores two values per byte."""
    trainable = total = 0
    for p in model.parameters():
        n = layer_shards.full_numel(p)
        if p.__class__.__name__ == "Params4bit":
            n *= 2 * p.element_size()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def describe_parameters(model: nn.Module) -> str:
    trainable, total = parameter_counts(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
