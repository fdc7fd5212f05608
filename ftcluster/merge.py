"""``python -m ftcluster merge --adapter RUN/final --out DIR``: fold a LoRA/QLoRA adapter into a bf16 copy of its
base and save safetensors.

A QLoRA adapter was trained against the 4-bit base, i.e. against dequantize(quantize(W)), not W. Merging it into
the original bf16 W, or into the 4-bit weights themselves, gives a different model (transformers#31293,
peft#1043). So the base is quantized exactly as in training, dequantized to bf16, and the adapter merged into that.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from ftcluster import config as C
from ftcluster import models, sources


def dequantize_linears_(model: nn.Module, dtype: torch.dtype) -> None:
    """Replace every bitsandbytes Linear4bit with an nn.Linear holding its dequantized weight."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit):
                continue
            weight = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state).to(dtype)
            linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                               device=weight.device, dtype=dtype)
            linear.weight.data.copy_(weight)
            if child.bias is not None:
                linear.bias.data.copy_(child.bias.data.to(dtype))
            setattr(parent, name, linear)
    # What transformers' own remove_quantization_config clears, so the model saves and casts as a plain one.
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.is_loaded_in_4bit = False


def run_config_of(adapter_dir: Path) -> C.RunConfig:
    if not adapter_dir.is_dir():
        runs = sorted(str(p.parent) for p in Path("runs").glob("*/final")) if Path("runs").is_dir() else []
        found = f"; the runs here with one: {', '.join(runs)}" if runs else ""
        raise C.ConfigError(f"--adapter {adapter_dir} does not exist: point it at a finished run's final/ directory, "
                            f"<output.storage_path>/<output.name>/final{found}")
    record = adapter_dir / "run.yaml"
    if not record.exists():
        raise C.ConfigError(f"{adapter_dir} has no run.yaml; point --adapter at a run's final/ directory")
    cfg = C.load(record)
    if not cfg.trains_adapter:
        raise C.ConfigError(f"{adapter_dir} holds a fully fine-tuned model (method=full); there is no adapter to merge")
    if cfg.model.random_init:
        raise C.ConfigError(f"{adapter_dir} was trained on a randomly initialised base; there is no base to merge into")
    return cfg


def merged_base(cfg: C.RunConfig, device: str) -> nn.Module:
    """The base the adapter was trained on, as bf16 (dequantized when it was 4-bit), built as the run's plan on this
    device builds it."""
    from ftcluster import hardware, plan

    hw = hardware.Hardware(device=torch.device(device).type, device_source=f"merge --device {device}")
    base = models.build_base_model(cfg, plan.make(cfg, hw), torch.device(device))
    if cfg.method == "qlora":
        dequantize_linears_(base, models.DTYPES[cfg.quantization.compute_dtype])
    return base.to(torch.bfloat16)


def check_base(adapter_dir: Path, cfg: C.RunConfig) -> None:
    """Refuse a base whose weights changed since the adapter was trained (same path, other files; a hub revision
    that moved): the merge would be of an adapter into a model it was never trained with."""
    from ftcluster.checkpoint import BASE_RECORD

    record = adapter_dir / BASE_RECORD
    if not record.is_file():  # an adapter saved before the base was recorded
        return
    changes = sources.base_changes(json.loads(record.read_text()), sources.base_identity(cfg.model))
    if changes:
        raise C.ConfigError(f"model.name_or_path={cfg.model.name_or_path} is not the base {adapter_dir} was trained "
                            f"on ({record}): {'; '.join(changes[:4])}. Merge into the base it was trained on (with "
                            "model.revision pinned for a hub model), or train the adapter again on this one")


def merge(adapter_dir: str | Path, out_dir: str | Path, device: str = "cpu") -> Path:
    from peft import PeftModel

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        what = "is a file" if not out_dir.is_dir() else "exists and is not empty"
        raise C.ConfigError(f"--out {out_dir} {what}; choose a new directory (nothing was overwritten)")
    cfg = run_config_of(adapter_dir)
    check_base(adapter_dir, cfg)
    try:
        model = PeftModel.from_pretrained(merged_base(cfg, device), adapter_dir)
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        raise C.ConfigError(f"{adapter_dir} was trained on a different base than model.name_or_path="
                            f"{cfg.model.name_or_path} holds now: its weights have other shapes "
                            f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}). Merge into "
                            "the base it was trained on") from None
    merged = model.merge_and_unload()
    merged.save_pretrained(out_dir)
    sources.load_tokenizer(cfg.model).save_pretrained(out_dir)
    (out_dir / "merged_from.json").write_text(json.dumps({"adapter": str(adapter_dir.resolve()),
                                                          "method": cfg.method}, indent=2))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ftcluster merge", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, help="a run's final/ directory (adapter + run.yaml)")
    p.add_argument("--out", required=True, help="a new directory for the merged bf16 model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        out = merge(args.adapter, args.out, args.device)
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged model saved to {out}")
    return 0
