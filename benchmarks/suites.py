"""Benchmark suites: which recipe each method runs, with what overrides, on how many workers, and whether its
quality can be scored. Suites are data; ``benchmarks.compare`` runs them and ``benchmarks.report`` renders them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import shapes

METHODS = ("full", "lora", "qlora")
SHAPES_ROOT = Path(os.environ.get("FTCLUSTER_CACHE", Path.home() / ".cache" / "ftcluster")) / "shapes"


@dataclass(frozen=True)
class Suite:
    name: str
    recipe: str
    """The YAML every run starts from; ``common`` and then the method's overrides go over it."""
    description: str
    common: list[str] = field(default_factory=list)
    methods: dict[str, list[str]] = field(default_factory=dict)
    gpus: dict[str, int] = field(default_factory=dict)
    """GPUs a method needs (1 when absent); a method needing more than the machine has is recorded as skipped."""
    quality: bool = True
    """False for random-init models: their loss and task score mean nothing, and the report says n/a."""
    eval_examples: int | None = None
    """Held-out examples the task score uses (None: all)."""
    hf_steps: int = 20
    peer: list[str] = field(default_factory=list)
    """Overrides for the HF recipe's runs, after the method's: where ftcluster's recipe leaves out what the
    tutorials' recipe does (checkpointing that memory does not need), the peer keeps the tutorials' setting."""
    tasks: tuple[str, ...] = ()
    """The data sources every method is trained and scored on, each in turn (empty: the recipe's own). Speed,
    memory and the peers are measured on the first."""
    grid: dict[str, tuple[tuple[str, ...], ...]] = field(default_factory=dict)
    """Per method, the settings ``--tune`` tries (each a tuple of overrides, e.g. a learning rate and a LoRA
    rank), each scored on validation rows carved from the training data; the best is the one the seeds run."""
    validation_fraction: float = 0.1
    """The share of the training examples the grid's runs hold out to be scored on (``data.validation_fraction``)."""
    quality_every: int = 0
    """Steps between the exports (``training.export_every``) that the first seed's run of each method is scored at,
    for its time to quality; 0: scored at the end only."""

    def overrides(self, method: str, task: str | None = None) -> list[str]:
        source = [f"data.source={task}"] if task else []
        return [*self.common, *source, f"method={method}", *self.methods.get(method, [])]


# Per-method optimizer settings shared by the real-weight suites: full fine-tuning takes a 10x smaller learning
# rate (all weights move); QLoRA takes the paged 8-bit AdamW the QLoRA paper pairs it with.
_REAL = {
    "full": ["optimizer.lr=5.0e-5"],
    "lora": [],
    "qlora": ["optimizer.name=paged_adamw_8bit"],
}


TASKS = ("builtin:required-args", "builtin:extract-json")
"""The default suite's tasks: a pydoc task (a signature's required parameters) and a structured extraction."""


def lrs(*values: float, also: tuple[str, ...] = ()) -> tuple[tuple[str, ...], ...]:
    """A grid of learning rates (each point with the overrides ``also``)."""
    return tuple((f"optimizer.lr={v:g}", *also) for v in values)


def _default(gpu: bool) -> Suite:
    if gpu:
        # The 135M model's steps are host-bound (4,096 tokens a step, 30 layers): QLoRA is checkpointed so that
        # its layers compile (compiled.py), 0.33 s a step against 0.45 for the HF recipe's eager, unchecked one
        # (random-init shape, 1x H200, 2026-11-27), and the peer keeps its own faster unchecked form. Liger's fused
        # loss takes 4 chunks of 1,024 tokens rather than 64 of 64 (a 49k vocabulary over a 576 hidden size).
        return Suite("default", "configs/bench/default_gpu.yaml",
                     "SmolLM2-135M-Instruct (real weights), two tasks, 5 epochs, one GPU; QLoRA checkpointed (so "
                     "compiled), the HF recipe not",
                     common=["model.fused_loss_chunk_scale=16"],
                     methods={**_REAL, "qlora": [*_REAL["qlora"], "model.gradient_checkpointing=true"]},
                     peer=["model.gradient_checkpointing=false"], tasks=TASKS, quality_every=10,
                     # Adapters take learning rates about 10-40x full fine-tuning's; the rank is tried at the
                     # adapters' middle learning rate.
                     grid={"full": lrs(1e-5, 3e-5, 1e-4, 3e-4),
                           "lora": lrs(3e-4, 1e-3, 3e-3, 6e-3) + lrs(3e-3, also=("lora.r=64", "lora.alpha=128")),
                           "qlora": lrs(3e-4, 1e-3, 3e-3, 6e-3) + lrs(3e-3, also=("lora.r=64", "lora.alpha=128"))})
    # On CPU there are no paged optimizers (they page GPU memory): QLoRA keeps torch AdamW there.
    return Suite("default", "configs/bench/default_cpu.yaml",
                 "SmolLM2-135M-Instruct (real weights), two tasks, 6 steps, CPU (float32)",
                 methods={**_REAL, "qlora": []}, eval_examples=32, hf_steps=4, tasks=TASKS, quality_every=2,
                 grid={"full": lrs(5e-5, 2e-4), "lora": lrs(1e-3, 3e-3), "qlora": lrs(1e-3, 3e-3)})


def _llama_7b() -> Suite:
    model = shapes.ensure("llama-2-7b", SHAPES_ROOT)
    return Suite(
        "llama-7b", "configs/bench/llama2_7b.yaml",
        "Llama-2-7B architecture, random init, seq 2048, micro batch 2, gradient checkpointing, LoRA r=8 q,v",
        common=[f"model.name_or_path={model}"],
        methods={"full": ["deepspeed.zero_stage=3", "scaling.num_workers=2", "optimizer.lr=2.0e-5"],
                 "lora": [], "qlora": ["optimizer.name=paged_adamw_8bit"]},
        gpus={"full": 2}, quality=False)


def _llama_1b() -> Suite:
    model = shapes.ensure("llama-3.2-1b", SHAPES_ROOT)
    return Suite(
        "llama-1b", "configs/bench/llama2_7b.yaml",
        "Llama-3.2-1B architecture (128k vocabulary), random init, seq 2048, micro batch 2, LoRA r=8 q,v; every "
        "method on one GPU; gradient checkpointing for QLoRA and in the HF recipe (full fine-tuning and LoRA run "
        "without it at a lower peak than the HF recipe's with it)",
        common=[f"model.name_or_path={model}"],
        # Full fine-tuning as the HF recipe runs it on one GPU: AdamW stepping the bf16 weights (no float32
        # copies), which ZeRO-0 leaves to our optimizer; ZeRO-2 would only add its buckets and hooks on one GPU.
        # Checkpointing only where memory needs it: without it full fine-tuning peaked at 12.65 GiB and LoRA at
        # 6.31 against the HF recipe's 13.15 and 8.53 with it (1x H200, 2026-11-27), so it buys nothing here.
        # The trained output layer's gradient takes one pass per chunk of Liger's fused loss: 8 chunks, not 32.
        methods={"full": ["optimizer.lr=2.0e-5", "optimizer.master_weights=bf16", "deepspeed.zero_stage=0",
                          "model.gradient_checkpointing=false", "model.fused_loss_chunk_scale=8"],
                 "lora": ["model.gradient_checkpointing=false"], "qlora": ["optimizer.name=paged_adamw_8bit"]},
        peer=["model.gradient_checkpointing=true"], quality=False)


def _tiny() -> Suite:
    return Suite("tiny", "configs/bench/tiny.yaml", "2-layer random-init SmolLM2 architecture, 4 CPU steps",
                 methods={"full": [], "lora": [], "qlora": []}, eval_examples=8, hf_steps=2, quality_every=2,
                 grid={"full": lrs(1e-4), "lora": lrs(1e-3, 1e-2), "qlora": lrs(1e-3, 1e-2)})


def _sizes(size: str) -> Suite:
    shape = {"7b": "llama-2-7b", "13b": "llama-2-13b", "33b": "llama-1-33b", "70b": "llama-3-70b"}[size]
    model = shapes.ensure(shape, SHAPES_ROOT)
    return Suite(f"sizes-{size}", "configs/bench/llama2_7b.yaml",
                 f"{shape} architecture, random init, seq 2048, micro batch 2, gradient checkpointing, 8 steps",
                 common=[f"model.name_or_path={model}", "training.max_steps=8", "training.log_every=4"],
                 methods={"full": ["deepspeed.zero_stage=3"], "lora": [],
                          "qlora": ["optimizer.name=paged_adamw_8bit"]}, quality=False)


def _qlora_70b() -> Suite:
    model = shapes.ensure("llama-3-70b", SHAPES_ROOT)
    return Suite("qlora-70b", "configs/bench/llama3_70b_qlora.yaml",
                 "llama-3-70b architecture, random init quantized layer by layer, seq 1024, micro batch 1, gradient "
                 "checkpointing, LoRA r=16 all-linear, paged 8-bit AdamW",
                 common=[f"model.name_or_path={model}"], methods={"qlora": []}, quality=False)


def _nemo_shape() -> Suite:
    # NVIDIA NeMo AutoModel's published single-GPU LoRA throughput is taken at this setting (Llama-3-8B, LoRA r=16
    # on every projection, sequence 4096, micro batch 2, no activation checkpointing); the peers run it as is.
    model = shapes.ensure("llama-3-8b", SHAPES_ROOT)
    return Suite("nemo-shape", "configs/bench/llama2_7b.yaml",
                 "Llama-3-8B architecture (128k vocabulary), random init, at NeMo AutoModel's published LoRA setting: "
                 "seq 4096, micro batch 2, LoRA r=16 on every projection, no activation checkpointing, one GPU",
                 common=[f"model.name_or_path={model}", "data.max_seq_len=4096", "training.micro_batch_size=2",
                         "lora.r=16", "lora.alpha=32", "lora.target_modules=all-linear",
                         "model.gradient_checkpointing=false"],
                 methods={"lora": []}, quality=False)


SUITES = ("default", "llama-7b", "llama-1b", "nemo-shape", "tiny", "sizes-7b", "sizes-13b", "sizes-33b", "sizes-70b",
          "qlora-70b")


def get(name: str, gpu: bool) -> Suite:
    if name == "default":
        return _default(gpu)
    if name == "llama-7b":
        return _llama_7b()
    if name == "llama-1b":
        return _llama_1b()
    if name == "nemo-shape":
        return _nemo_shape()
    if name == "tiny":
        return _tiny()
    if name == "qlora-70b":
        return _qlora_70b()
    if name.startswith("sizes-"):
        return _sizes(name.removeprefix("sizes-"))
    raise SystemExit(f"--suite {name}: unknown suite; choose one of {', '.join(SUITES)}")
