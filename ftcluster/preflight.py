"""What the driver checks before it joins Ray or takes any GPU: the data, the model's config and LoRA targets, and
whether the run fits the workers' GPUs by the memory estimator. A run that cannot start is refused here, with the
field and the fix named, and leaves nothing behind."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ftcluster import embedded, estimate, sources
from ftcluster import plan as P
from ftcluster.config import EMBEDDED_MODEL, ConfigError, RunConfig
from ftcluster.data import packing, prepare
from ftcluster.hardware import Hardware


@dataclass
class Inputs:
    """What ``check_inputs`` prepared: the tokenizer, the rows by split (ftcluster.data), where the rows came from, and the
    line to print. The in-process worker takes them as they are, rather than loading the tokenizer and reading the
    data source again."""
    tokenizer: object
    rows: dict
    where: str
    line: str
    rows_key: str | None = None
    """The rows' identity (``RowStats.key``)."""


def check_inputs(cfg: RunConfig, plan: P.Plan) -> Inputs:
    """The data loads, every row has the fields its format needs as text, and enough rows survive tokenizing for
    every worker; for adapters, the requested target modules exist (on a weightless meta-device copy). Returns the
    prepared inputs, with the data line to print: what tokenizing and packing kept, cut and dropped."""
    if cfg.model.name_or_path == EMBEDDED_MODEL:
        embedded.checkpoint_dir()  # convert once here rather than in every worker
    tokenizer = sources.load_tokenizer(cfg.model)
    try:
        by_split, stats, where = prepare.rows_for(tokenizer, cfg.data, cfg.training.seed, cfg.output.storage_path,
                                                    plan.streaming)
    except Exception as e:  # noqa: BLE001 - any failure to read the data is the user's to fix, named here
        raise ConfigError(f"data.source: cannot use {cfg.data.source}: {e}") from None
    if cfg.trains_adapter:
        check_adapter_targets(cfg)
    rows = by_split["train"]
    check_vocabulary(cfg, tokenizer, rows)
    if not rows:
        raise ConfigError(
            f"data.max_seq_len={cfg.data.max_seq_len}: no example has an answer token within it (longest example "
            f"{stats.longest} tokens, median {stats.median}); raise data.max_seq_len")
    need = cfg.scaling.num_workers * cfg.training.micro_batch_size
    if plan.padding_free:  # counted as the workers will batch them: rows of micro_batch_size x max_seq_len
        b = cfg.training.micro_batch_size
        rows = packing.Regrouped(rows, b, cfg.data.max_seq_len)
        need = cfg.scaling.num_workers
        if len(rows) < need:
            raise ConfigError(
                f"data.padding_free=true: the data gives {len(rows)} rows of {b} x {cfg.data.max_seq_len} tokens, "
                f"fewer than scaling.num_workers={need}: add data, or unset data.padding_free")
    if len(rows) < need:
        raise ConfigError(
            f"the data gives {len(rows)} training rows, fewer than scaling.num_workers x training.micro_batch_size "
            f"({need}): add data, or lower training.micro_batch_size or scaling.num_workers")
    micro_batches = len(rows) // need
    if micro_batches < plan.accumulation:
        raise ConfigError(
            f"the data gives {micro_batches} micro batches per worker an epoch ({len(rows)} rows over "
            f"scaling.num_workers={cfg.scaling.num_workers} x training.micro_batch_size="
            f"{cfg.training.micro_batch_size}{', one padding-free row a micro batch' if plan.padding_free else ''}), "
            f"fewer than the {plan.accumulation} a step accumulates "
            f"(training.gradient_accumulation_steps): lower it to at most {micro_batches}, or add data")
    return Inputs(tokenizer, by_split, where, f"data: {stats.describe(cfg.data.max_seq_len)}; {where}", stats.key)


def check_vocabulary(cfg: RunConfig, tokenizer, rows) -> None:
    """Every token id of the data has a row in the model's embedding: a model of fewer tokens than its tokenizer
    (a vocab_size override, a mismatched tokenizer) would fail in the first step with an IndexError."""
    shape = P.architecture(cfg).shape
    if shape is None or len(tokenizer) <= shape.vocab:
        return
    top = max((max(r["input_ids"], default=-1) for r in rows), default=-1)
    if top >= shape.vocab:
        where = ("model.config_overrides sets vocab_size" if "vocab_size" in cfg.model.config_overrides
                 else f"{cfg.model.name_or_path}'s config")
        raise ConfigError(
            f"model.name_or_path={cfg.model.name_or_path}: the model has {shape.vocab:,} token embeddings ({where}) "
            f"and its tokenizer {len(tokenizer):,} tokens; the data holds token id {top:,}, which has none. Use the "
            f"tokenizer the model was trained with, or a vocab_size of at least {len(tokenizer):,}")


def check_adapter_targets(cfg: RunConfig) -> None:
    """The LoRA target modules and modules to save exist in the model, checked on a weightless meta-device copy
    (none is built for ``all-linear``, which names no module)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftcluster import models

    if cfg.lora.target_modules == "all-linear":
        return
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(sources.load_hf_config(cfg.model))
    models.check_target_modules(meta, cfg)


def check_resume_split(cfg: RunConfig, plan: P.Plan) -> None:
    """A sequence-parallel run resumes only as it was split: the same ``scaling.sequence_parallel`` on the same
    worker count (its DeepSpeed checkpoint holds a model-parallel rank per group member; reading it on another split
    is not made to work yet). The previous attempt's split is in the run directory's plan.json."""
    record = cfg.run_dir / "plan.json"
    if plan.resume_from is None or not record.is_file():
        return
    import json

    before = json.loads(record.read_text())
    was_k, was_n = before.get("sequence_parallel", 1), before.get("workers")
    k = plan.sequence_parallel
    if max(was_k, k) > 1 and (was_k != k or was_n != plan.workers):
        raise ConfigError(
            f"scaling.sequence_parallel={k} on scaling.num_workers={plan.workers}: {cfg.run_dir} was saved with "
            f"sequence_parallel={was_k} on {was_n} workers, and a sequence-parallel checkpoint resumes only as it "
            f"was split; set scaling.sequence_parallel={was_k} scaling.num_workers={was_n} to resume it")


def check_device(cfg: RunConfig, plan: P.Plan) -> None:
    """A worker in this process that is to compute on a GPU needs one here (a Ray cluster's are checked when it is
    joined, ``cluster.check_cluster``); workers on CPUs train in bfloat16 or float32."""
    if plan.device == "cpu":
        half = [f"{field}=float16" for field, dtype in (
            ("model.dtype", cfg.model.dtype),
            ("quantization.compute_dtype", cfg.quantization.compute_dtype if cfg.method == "qlora" else None))
            if dtype == "float16"]
        if half:
            raise ConfigError(f"{half[0]} with workers on CPUs: float16 training (DeepSpeed's loss scaling, half "
                              "matmuls) needs GPUs; use float32 (as configs/*_cpu.yaml do) or bfloat16 on CPUs, or "
                              "run on GPUs")
    if plan.in_process and plan.device == "cuda":
        import torch

        if torch.cuda.device_count() == 0:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise ConfigError("scaling.use_gpu=true, and this host has no GPU that torch can see"
                              + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
                              + ": set scaling.use_gpu=false to train on the CPU, or run where a GPU is visible.")


def check_fit(cfg: RunConfig, plan: P.Plan, hw: Hardware, force: bool = False) -> str:
    """The plan's memory estimate against its GPUs' memory (``hw.gpu_memory_source`` says whose it is).
    Returns the line to print; raises ``ConfigError`` with the cheapest change that fits when it does not fit,
    unless ``force`` or ``resources.check_fit=false``."""
    line = f"memory: {_gib(plan.memory_gib)}{plan.reasons['memory_gib']}"
    budget = hw.gpu_memory_gib
    if plan.memory_gib is None or budget is None:
        return line + ("; no GPU visible here and resources.gpu_memory_gib unset: fit not checked"
                       if plan.memory_gib is not None else "")
    budget *= min(1.0, cfg.scaling.gpus_per_worker)  # workers that share a GPU share its memory
    if plan.memory_gib <= budget:
        return line
    shape, run = P.architecture(cfg).shape, P.estimator_run(cfg, plan)
    fixes = estimate.suggestions(shape, run, budget)
    longest = estimate.longest_fitting(shape, run, budget)
    shorter = f"data.max_seq_len={longest}, the longest rows that fit with every other setting kept"
    if fixes:
        advice = (f"the cheapest change that fits: {fixes[0][0].split(' (--')[0]} "
                  f"({' '.join(estimate.config_overrides(run, fixes[0][2]))}) -> {fixes[0][1]:.1f} GiB"
                  + (f"; or {shorter}" if longest else ""))
    else:
        advice = shorter if longest else "no single change makes it fit; combine them"
    if estimate.estimate(shape, run).loading > budget * estimate.GiB:
        advice = "a 4-bit model from a GGUF file loads whole onto each GPU under ZeRO-3: convert it to a " \
                 "safetensors checkpoint and set model.name_or_path there"
    message = (f"the run needs about {plan.memory_gib:.1f} GiB per GPU and its GPUs have {budget:.1f} "
               f"({hw.gpu_memory_source or 'given'}): {advice}. `python -m ftcluster estimate --config "
               f"<recipe> [overrides]` shows every term; --force (or resources.check_fit=false) starts it anyway.")
    if force or not cfg.resources.check_fit:
        return line + f"; started anyway (--force). {message}"
    raise ConfigError(message)


def check_weights(cfg: RunConfig) -> None:
    """The model's safetensors files here are whole: every shard its index names exists, and each is as long as its
    header says (a download cut short leaves a file that every worker would fail to open, after the cluster started
    and GPU memory was taken). Reads each file's header only. Nothing to check for random weights, for a GGUF file,
    or for a hub id not yet in the cache (its workers download it)."""
    m = cfg.model
    if m.random_init or m.name_or_path == EMBEDDED_MODEL:
        return
    src, kw = sources.resolve_source(m)
    directory = Path(src).expanduser()
    if kw or not directory.is_dir():
        return
    index = directory / "model.safetensors.index.json"
    try:
        files = sources.weight_files(directory)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model.name_or_path={m.name_or_path}: {index} is not a safetensors index "
                          f"({type(e).__name__}: {e}); download the model again") from None
    if files is None:
        return  # weights in another format: transformers says what it finds
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise ConfigError(f"model.name_or_path={m.name_or_path}: {len(missing)} of the {len(files)} weight files "
                          f"{index.name} names are not in {directory} ({', '.join(missing[:3])}"
                          f"{', ...' if len(missing) > 3 else ''}); download the model again")
    for name in files:
        problem = _safetensors_problem(directory / name)
        if problem:
            raise ConfigError(f"model.name_or_path={m.name_or_path}: {directory / name} {problem}; download the "
                              "model again (an interrupted download leaves such a file)")


SAFETENSORS_HEADER_LIMIT = 100_000_000
"""The longest header the safetensors format allows (its reader refuses longer ones)."""


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be whole, from its header alone (8 bytes of header length, a JSON header whose
    tensors' data_offsets end where the file must), or None."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"is {size} bytes long, too short to be a safetensors file"
        n = int.from_bytes(head, "little")
        if n > SAFETENSORS_HEADER_LIMIT:
            return "does not start with a safetensors header"
        if n > size - 8:
            return f"is cut short: its header alone is {n:,} bytes and the file {size:,}"
        try:
            header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "does not start with a safetensors header"
    need = 8 + n + end
    return f"is cut short: {size:,} of the {need:,} bytes its header describes" if size < need else None


HOST_SHARE = 0.9
"""Of the host memory available before a run, the share its offloaded checkpoints may take: the rest is for the
workers' processes themselves (the model on its way to the GPU, the data, the libraries)."""


def check_host_memory(cfg: RunConfig, plan: P.Plan, hw: Hardware, force: bool = False) -> str | None:
    """Offloaded checkpoints (model.activation_offloading) against the memory of the host the workers run on, when
    they run on this one: a run whose checkpoints the host cannot pin would be ended by the kernel's OOM killer,
    after its forward. Returns the line to print (None where nothing is offloaded to a known host); raises
    ``ConfigError`` naming the longest rows whose checkpoints fit, unless ``force`` or ``resources.check_fit=false``."""
    if plan.device != "cuda" or not plan.activation_offloading or hw.host_memory_gib is None:
        return None
    shape, run = P.architecture(cfg).shape, P.estimator_run(cfg, plan)
    # On a Ray cluster's node, as many workers as its GPUs hold; on this host, all of them.
    per_host = max(1, int(hw.gpus_per_host / cfg.scaling.gpus_per_worker)) if hw.gpus_per_host else None
    workers = min(cfg.scaling.num_workers, per_host or cfg.scaling.num_workers)
    need = workers * estimate.host_checkpoints(shape, run) / estimate.GiB
    usable = HOST_SHARE * hw.host_memory_gib
    where = hw.host_memory_source
    line = (f"host memory: offloaded checkpoints {need:.1f} GiB for {workers} worker(s) of the "
            f"{hw.host_memory_gib:.1f} GiB available on {where}")
    if need <= usable:
        return line
    per_token = need / (run.seq_len // run.sequence_parallel * run.micro_batch)
    longest = int(usable / per_token) * run.sequence_parallel // run.micro_batch // 256 * 256
    message = (f"model.activation_offloading keeps each checkpointed layer's input in pinned host memory until "
               f"backward: {need:.1f} GiB for the {workers} worker(s) on one host at data.max_seq_len="
               f"{cfg.data.max_seq_len}, and {where} has {hw.host_memory_gib:.1f} GiB available ({HOST_SHARE:.0%} "
               f"of it for them). "
               + (f"Lower data.max_seq_len to {longest}, " if longest else "")
               + "checkpoint fewer layers (model.checkpointed_layers), split each row over GPUs "
               "(scaling.sequence_parallel), or free memory on the workers' hosts; --force (or "
               "resources.check_fit=false) starts it anyway.")
    if force or not cfg.resources.check_fit:
        return line + f"; started anyway (--force). {message}"
    raise ConfigError(message)


def notes(cfg: RunConfig, plan: P.Plan, hw: Hardware) -> list[str]:
    """What the user should know before a run starts that is not an error: lines to print."""
    out = []
    if plan.device == "cpu" and cfg.model.dtype != "float32" and not hw.cpu_bf16:
        out.append(f"note: no GPU, and this CPU has no {cfg.model.dtype} instructions (AVX512-BF16 or AMX): torch "
                   f"emulates {cfg.model.dtype}, minutes a step even for a small model. Run it where GPUs are, or "
                   "set model.dtype=float32 as the CPU recipes do (configs/*_cpu.yaml)")
    return out


def _gib(value: float | None) -> str:
    return "" if value is None else f"{value:.1f} GiB "
