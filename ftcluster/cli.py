"""The commands that say what a run will do before it starts:

    python -m ftcluster plan --config RECIPE [overrides] [--device cuda] [--diff key=value ...]
    python -m ftcluster estimate --config RECIPE [overrides] [--gpu-memory h100]
    python -m ftcluster estimate --model llama-3-70b --method qlora --grad-ckpt --gpu-memory 48

Both read the run's plan (ftcluster/plan.py), as the trainer does: what they show is what would run.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace

from ftcluster import config as C
from ftcluster import checkpoint, estimate, hardware, plan as P
from ftcluster.presets import PRESETS

ESTIMATE_EPILOG = """examples:
  python -m ftcluster estimate --config configs/llama3_70b_qlora.yaml scaling.num_workers=16 --gpu-memory h100
  python -m ftcluster estimate --model llama-3-70b --method qlora --seq-len 512 --grad-ckpt --gpu-memory l40s"""


LIGER_HELP = ("whether the GPU nodes have Liger Kernel installed: yes, no, or here (as this host has it; a login "
              "node often has not, and without it the loss is counted whole, the largest term at long rows)")


def _liger(answer: str) -> bool | None:
    """``--liger``: True or False as said, None for "as this host has it"."""
    return {"yes": True, "no": False, "here": None}[answer]


def _hardware(cfg: C.RunConfig, device: str | None, gpu_memory: float | None,
              liger: bool | None = None) -> hardware.Hardware:
    """This host as the driver would see it, or the device named on the command line; ``liger``: whether the GPU
    nodes have Liger Kernel (None: as this host has it)."""
    liger = hardware.liger_here() if liger is None else liger
    if device is None:
        hw = hardware.here(cfg)
        if gpu_memory:
            hw = replace(hw, gpu_memory_gib=gpu_memory, gpu_memory_source="--gpu-memory")
        return replace(hw, liger_installed=liger)
    given = gpu_memory or cfg.resources.gpu_memory_gib
    return hardware.Hardware(device=device, device_source=f"--device {device}", gpu_memory_gib=given,
                             gpu_memory_source="--gpu-memory" if gpu_memory else
                             "resources.gpu_memory_gib" if given else None,
                             liger_installed=liger and device == "cuda",
                             varlen_kernel=hardware.varlen_kernel_here())


# ---------------------------------------------------------------------------------------------------------------
# plan

def plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ftcluster plan",
                                description="Print every decision a run makes, with its reason, without starting it.")
    p.add_argument("--config", help="a YAML recipe (see configs/); the defaults when absent")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. scaling.num_workers=4 method=qlora")
    p.add_argument("--device", choices=["cuda", "cpu"],
                   help="plan for workers on this device (default: this host's; a Ray run takes its cluster's)")
    p.add_argument("--gpu-memory", help="GiB per GPU, or a GPU name, for the memory verdict")
    p.add_argument("--liger", choices=["here", "yes", "no"], default="here", help=LIGER_HELP)
    p.add_argument("--diff", nargs="+", metavar="KEY=VALUE",
                   help="also plan the run with these overrides and print only the decisions that change")
    p.add_argument("--json", action="store_true", help="print the plan as plan.json holds it")
    return p


def plan_main(argv: list[str] | None = None) -> int:
    a = plan_parser().parse_args(argv)
    try:
        cfg = C.load(a.config, a.overrides)
        budget = gpu_budget_gib(a.gpu_memory) if a.gpu_memory else None
        hw = _hardware(cfg, a.device, budget, _liger(a.liger))
        planned = P.make(cfg, hw, resume=checkpoint.resume_of(cfg.run_dir))
        if a.diff:
            other = C.load(a.config, [*a.overrides, *a.diff])
            changed = P.changes(planned, P.make(other, _hardware(other, a.device, budget, _liger(a.liger))))
            print(f"with {' '.join(a.diff)}:")
            print("\n".join(f"  {line}" for line in changed) if changed else "  no decision changes")
            return 0
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(planned.to_json(), indent=2) if a.json else planned.describe())
    return 0


# ---------------------------------------------------------------------------------------------------------------
# estimate

def estimate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ftcluster estimate", description=estimate.__doc__.splitlines()[0],
                                epilog=ESTIMATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a YAML recipe: estimate the run `python -m ftcluster.train --config` starts "
                                    "with the same recipe and overrides")
    p.add_argument("overrides", nargs="*", help="with --config: dotted overrides, e.g. scaling.num_workers=4")
    p.add_argument("--model", help=f"without --config: a preset ({', '.join(PRESETS)}), a model directory or "
                                   "config.json; the flags below make the run")
    p.add_argument("--method", choices=["full", "lora", "qlora"], default="lora")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=2)
    p.add_argument("--offload", choices=["none", "optimizer", "param", "optimizer+param"], default="none")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing on")
    p.add_argument("--checkpointed-layers", type=int, default=None,
                   help="with --grad-ckpt: checkpoint only this many decoder layers (default: all)")
    p.add_argument("--activation-offloading", action="store_true",
                   help="with --grad-ckpt: the checkpoints wait for backward in host memory")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-targets", default="all-linear", help="all-linear, or a comma list: q_proj,v_proj")
    p.add_argument("--optimizer", choices=sorted(estimate.OPTIMIZER_BYTES), default=None,
                   help="default: paged_adamw_8bit for qlora, adamw otherwise (and with an offloaded optimizer)")
    p.add_argument("--master-weights", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: the optimizer steps the bf16 weights themselves (optimizer.master_weights)")
    p.add_argument("--no-double-quant", action="store_true")
    p.add_argument("--loads-whole", action="store_true",
                   help="the model loads from a GGUF file, not a safetensors checkpoint (local or a hub snapshot)")
    p.add_argument("--gpu-memory", help=f"GiB per GPU, or a GPU name ({', '.join(estimate.GPUS_GIB)}): say whether it fits")
    p.add_argument("--liger", choices=["here", "yes", "no"], default="here", help=LIGER_HELP)
    p.add_argument("--json", action="store_true", help="print the terms as JSON")
    return p


def config_of_flags(a: argparse.Namespace):
    """The run the preset/flag form describes, as the ``RunConfig`` the trainer would take."""
    optimizer = a.optimizer or ("paged_adamw_8bit" if a.method == "qlora" and "optimizer" not in a.offload
                                else "adamw")
    targets = "all-linear" if a.lora_targets == "all-linear" else a.lora_targets.split(",")
    return C.from_dict({
        "method": a.method, "optimizer": {"name": optimizer, "master_weights": a.master_weights},
        "model": {"name_or_path": a.model, "gradient_checkpointing": a.grad_ckpt,
                  "checkpointed_layers": a.checkpointed_layers, "activation_offloading": a.activation_offloading},
        "lora": {"r": a.lora_r, "target_modules": targets},
        "quantization": {"double_quant": not a.no_double_quant},
        "data": {"max_seq_len": a.seq_len}, "training": {"micro_batch_size": a.micro_batch},
        "scaling": {"num_workers": a.gpus},
        "deepspeed": {"zero_stage": a.zero, "offload_optimizer": "cpu" if "optimizer" in a.offload else "none",
                      "offload_param": "cpu" if "param" in a.offload else "none"},
    }, "the estimate flags")


def gpu_budget_gib(text: str) -> float:
    try:
        gib = float(text)
    except ValueError:
        if text not in estimate.GPUS_GIB:
            raise SystemExit(f"--gpu-memory {text}: a number of GiB or one of {', '.join(estimate.GPUS_GIB)}") from None
        return estimate.GPUS_GIB[text] * 1e9 / estimate.GiB
    if not gib > 0:
        raise SystemExit(f"--gpu-memory {text}: the memory of one GPU in GiB (e.g. 80), or one of "
                         f"{', '.join(estimate.GPUS_GIB)}")
    return gib


def estimate_main(argv: list[str] | None = None) -> int:
    a = estimate_parser().parse_args(argv)
    if (a.config is None) == (a.model is None):
        raise SystemExit("give --config RECIPE [overrides] (the run the trainer would start) or --model with flags")
    if a.model is not None and (a.gpus < 1 or a.seq_len < 1 or a.micro_batch < 1):
        raise SystemExit("--gpus, --seq-len and --micro-batch must be positive")
    if a.model is not None:
        estimate.shape_of(a.model)  # a preset, a model directory or a config.json: refused here otherwise
    try:
        cfg = C.load(a.config, a.overrides) if a.config else config_of_flags(a)
        budget = gpu_budget_gib(a.gpu_memory) if a.gpu_memory else cfg.resources.gpu_memory_gib
        planned = P.make(cfg, hardware.Hardware.gpu(budget, liger_installed=_liger(a.liger)), read_data=False)
        shape = P.architecture(cfg).shape
    except C.ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if shape is None:
        raise SystemExit(f"{cfg.model.name_or_path}: the estimator models Llama-style decoders only")
    run = P.estimator_run(cfg, planned)
    if a.loads_whole or not a.config:  # a preset name says nothing about where its weights would come from
        run = replace(run, loads_whole=a.loads_whole)
    if a.json:
        e = estimate.estimate(shape, run)
        print(json.dumps({"run": asdict(run), "terms_gib": {k: v / estimate.GiB for k, v in e.terms.items()},
                          "allocated_gib": e.allocated / estimate.GiB, "device_gib": e.device / estimate.GiB,
                          "loading_gib": e.loading / estimate.GiB, "need_gib": e.need / estimate.GiB}, indent=2))
    else:
        print(estimate.explain(cfg.model.name_or_path, shape, run, budget))
        if planned.loss != "liger-fused":  # the largest term at long rows: say why it is not Liger's fused loss
            hint = "; --liger yes counts it as on GPU nodes that have Liger" if a.liger == "here" \
                and cfg.model.liger_kernel == "auto" and not hardware.liger_here() else ""
            print(f"loss: {planned.reasons['loss']}{hint}")
    return 0
