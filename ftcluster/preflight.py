"""What the driver checks before it joins Ray or takes any GPU: the data, the model's config and LoRA targets, and
whether the run fits the workers' GPUs by the memory estimator. A run that cannot start is refused here, with the
field and the fix named, and leaves nothing behind."""

from __future__ import annotations

from dataclasses import dataclass

from ftcluster import embedded, estimate, kernels, row_cache
from ftcluster.config import EMBEDDED_MODEL, ConfigError, RunConfig


@dataclass
class Inputs:
    """What ``check_inputs`` prepared: the tokenizer, the rows by split (row_cache), where the rows came from, and the
    line to print. A worker in the driver's process (``ray.local_mode``) takes them as they are, rather than loading
    the tokenizer and reading the data source again."""
    tokenizer: object
    rows: dict
    where: str
    line: str


def check_inputs(cfg: RunConfig) -> Inputs:
    """The data loads, every row has the fields its format needs as text, and enough rows survive tokenizing for
    every worker; the model's config loads and, for adapters, the requested target modules exist (on a weightless
    meta-device copy). Returns the prepared inputs, with the data line to print: what tokenizing and packing kept,
    cut and dropped."""
    from ftcluster import models

    if cfg.model.name_or_path == EMBEDDED_MODEL:
        embedded.checkpoint_dir()  # convert once here rather than in every worker
    tokenizer = models.load_tokenizer(cfg.model)
    try:
        by_split, stats, where = row_cache.rows_for(tokenizer, cfg.data, cfg.training.seed, cfg.output.storage_path)
    except Exception as e:  # noqa: BLE001 - any failure to read the data is the user's to fix, named here
        raise ConfigError(f"data.source: cannot use {cfg.data.source}: {e}") from None
    hf = models.load_hf_config(cfg.model)
    kernels.check_driver(cfg, hf.model_type)
    layers, wanted = getattr(hf, "num_hidden_layers", None), cfg.model.checkpointed_layers
    if layers is not None and wanted is not None and wanted > layers:
        raise ConfigError(f"model.checkpointed_layers={wanted}: {hf.model_type} has {layers} decoder layers; set "
                          f"at most {layers}, or leave it unset to checkpoint all of them")
    if cfg.trains_adapter:
        check_adapter_targets(cfg, hf)
    rows = by_split["train"]
    if not rows:
        raise ConfigError(
            f"data.max_seq_len={cfg.data.max_seq_len}: no example has an answer token within it (longest example "
            f"{stats.longest} tokens, median {stats.median}); raise data.max_seq_len")
    need = cfg.scaling.num_workers * cfg.training.micro_batch_size
    if len(rows) < need:
        raise ConfigError(
            f"the data gives {len(rows)} training rows, fewer than scaling.num_workers x training.micro_batch_size "
            f"({need}): add data, or lower training.micro_batch_size or scaling.num_workers")
    return Inputs(tokenizer, by_split, where, f"data: {stats.describe(cfg.data.max_seq_len)}; {where}")


def check_adapter_targets(cfg: RunConfig, hf) -> None:
    """The LoRA target modules and modules to save exist in the model, checked on a weightless meta-device copy
    (none is built for ``all-linear``, which names no module)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftcluster import models

    if cfg.lora.target_modules == "all-linear":
        return
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(hf)
    models.check_target_modules(meta, cfg)


def visible_gpu_memory_gib() -> float | None:
    """The smallest GPU this host can see, by NVML (None without GPUs or a driver)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        n = pynvml.nvmlDeviceGetCount()
        sizes = [pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total for i in range(n)]
    except Exception:  # noqa: BLE001 - no NVML, no driver, no GPU: the same answer
        return None
    return min(sizes) / 2**30 if sizes else None


def check_fit(cfg: RunConfig, force: bool = False) -> str:
    """Estimate the run's memory per GPU against its GPUs (``resources.gpu_memory_gib``, else the GPUs this host
    sees). Returns the line to print; raises ``ConfigError`` with the cheapest change that fits when it does not
    fit, unless ``force`` or ``resources.check_fit=false``."""
    if cfg.scaling.use_gpu is False:
        return "memory: a CPU run, not estimated"
    budget = cfg.resources.gpu_memory_gib or visible_gpu_memory_gib()
    try:
        shape, run = estimate.shape_from(cfg), estimate.run_of(cfg)
    except SystemExit as e:
        return f"memory: not estimated ({e})"
    e = estimate.estimate(shape, run)
    need = e.need / estimate.GiB
    per = f"memory: {need:.1f} GiB per GPU estimated ({e.allocated / estimate.GiB:.1f} allocated by torch"
    per += f"; {e.loading / estimate.GiB:.1f} while loading)" if e.loading > e.device else ")"
    if budget is None:
        return per + "; no GPU visible here and resources.gpu_memory_gib unset: fit not checked"
    budget *= min(1.0, cfg.scaling.gpus_per_worker)  # workers that share a GPU share its memory
    if need <= budget:
        return per + f", of {budget:.1f} GiB: fits"
    fixes = estimate.suggestions(shape, run, budget)
    advice = (f"the cheapest change that fits: {fixes[0][0].split(' (--')[0]} "
              f"({' '.join(estimate.config_overrides(run, fixes[0][2]))}) -> {fixes[0][1]:.1f} GiB" if fixes
              else "no single change makes it fit; combine them")
    if e.loading > budget * estimate.GiB:
        advice = "a 4-bit model from a hub id or GGUF file loads whole onto each GPU under ZeRO-3: download it " \
                 "to a directory and set model.name_or_path there"
    message = (f"the run needs about {need:.1f} GiB per GPU and its GPUs have {budget:.1f} "
               f"(resources.gpu_memory_gib or what NVML reports): {advice}. `python -m ftcluster estimate --config "
               f"<recipe> [overrides]` shows every term; --force (or resources.check_fit=false) starts it anyway.")
    if force or not cfg.resources.check_fit:
        return per + f", of {budget:.1f} GiB: does NOT fit; started anyway (--force). {message}"
    raise ConfigError(message)


def worker_bundle(cfg: RunConfig, use_gpu: bool) -> dict[str, float]:
    """The resources one worker asks Ray for."""
    s = cfg.scaling
    return {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if use_gpu else {}), **s.resources_per_worker}


def check_cluster(cfg: RunConfig, use_gpu: bool, nodes: list[dict[str, float]]) -> str | None:
    """Why the cluster (each node's total resources) cannot hold the run's workers, or None. Ray would otherwise
    retry starting the worker group for as long as it is let, a traceback a minute."""
    bundle, n = worker_bundle(cfg, use_gpu), cfg.scaling.num_workers
    fields = {"CPU": "scaling.cpus_per_worker", "GPU": "scaling.gpus_per_worker"}
    have = {k: sum(node.get(k, 0.0) for node in nodes) for k in bundle}
    for k, per in bundle.items():
        if per * n > have[k] + 1e-9:
            field = fields.get(k, f"scaling.resources_per_worker.{k}")
            return (f"scaling.num_workers={n} x {field}={per:g} needs {per * n:g} {k}, and the Ray cluster has "
                    f"{have[k]:g} over {len(nodes)} node(s); lower scaling.num_workers or {field}, or add nodes")
    fits = [node for node in nodes if all(node.get(k, 0.0) + 1e-9 >= per for k, per in bundle.items())]
    if not fits:
        return (f"no node of the Ray cluster can hold one worker ({bundle}); its nodes have "
                f"{[{k: node.get(k, 0.0) for k in bundle} for node in nodes]}: lower scaling.cpus_per_worker, "
                "scaling.gpus_per_worker or scaling.resources_per_worker")
    return None
