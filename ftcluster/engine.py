"""DeepSpeed: the engine config generated from ours, the optimizer and schedule, and the step loop."""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ftcluster.config import RunConfig
from ftcluster.data import IGNORE, ShardedBatches


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    """The DeepSpeed JSON for this run; ``deepspeed.config_file`` and then ``deepspeed.overrides`` win over it."""
    t, d = cfg.training, cfg.deepspeed
    zero: dict = {"stage": d.zero_stage, "overlap_comm": d.zero_stage > 0, "contiguous_gradients": True}
    if d.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if d.offload_param == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if d.zero_stage == 3:
        # Adapters are gathered by us at save time; never gather the whole 16-bit model just to save.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    # DeepSpeed's bf16/fp16 modes cast every parameter to 16 bits (keep_in_fp32_modules spares buffers only), which
    # would silently undo PEFT's fp32 upcast; with the upcast on, the model keeps the dtypes PEFT gave it.
    mixed = cfg.method == "qlora" and cfg.quantization.upcast_non_quantized
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * world_size,
        "gradient_clipping": t.max_grad_norm,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16" and not mixed},
        "fp16": {"enabled": cfg.model.dtype == "float16" and not mixed},
        "zero_optimization": zero,
        # bitsandbytes and torch optimizers are passed in as client optimizers.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if d.offload_optimizer == "cpu":
        o = cfg.optimizer
        # Offload steps on the host with DeepSpeed's CPU Adam, which it builds from this section.
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                                       "weight_decay": o.weight_decay}}
    if d.config_file:
        ds = _merge(ds, json.loads(Path(d.config_file).expanduser().read_text()))
    return _merge(ds, d.overrides)


class Zero3Partition:
    """ZeRO-3's partitioning, applied to parameters while the model is still being built: each call hands its
    parameters to ``deepspeed.zero.Init``, which broadcasts rank 0's values and keeps this rank's shard (on the
    device, or in host memory under ``offload_param``). ``deepspeed.initialize`` then finds a partitioned model and
    neither moves the whole model to the device nor partitions it again."""

    def __init__(self, ds_config: dict):
        self.ds_config = ds_config
        self._first = None  # a partitioned parameter: its converter reuses the first Init's settings

    def __call__(self, params: list[torch.nn.Parameter]) -> None:
        import deepspeed

        params = [p for p in params if not hasattr(p, "ds_id")]
        if not params:
            return
        if self._first is None:
            # Joins the torch process group Ray Train made, as deepspeed.initialize does later; the config's batch
            # check needs the world size.
            deepspeed.comm.init_distributed(dist_init_required=False)
            deepspeed.zero.Init(module=torch.nn.ParameterList(params), config_dict_or_path=self.ds_config)
            self._first = params[0]
        else:
            self._first.convert_to_zero_parameters(params)

    @contextlib.contextmanager
    def loading(self):
        """While open, transformers' ``from_pretrained`` builds the model inside ``zero.Init`` and copies each
        checkpoint tensor into its partitions (rank 0 reads the checkpoint into host memory), so no worker holds the
        whole 16-bit model on its device. Not for bitsandbytes models: transformers loads those whole."""
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.comm.init_distributed(dist_init_required=False)
        alive = HfDeepSpeedConfig(self.ds_config)  # transformers holds it by weak reference only
        try:
            yield
        finally:
            del alive


def zero3_partition(cfg: RunConfig, world_size: int) -> Zero3Partition | None:
    """The build-time partitioner when the run is ZeRO-3 (after the user's DeepSpeed config and overrides)."""
    ds = deepspeed_config(cfg, world_size)
    return Zero3Partition(ds) if ds.get("zero_optimization", {}).get("stage") == 3 else None


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(cfg: RunConfig, model: torch.nn.Module, device: torch.device):
    if cfg.deepspeed.offload_optimizer == "cpu":
        return None  # DeepSpeed builds its CPU Adam from the config
    o = cfg.optimizer
    groups = param_groups(model, o.weight_decay)
    kw = dict(lr=o.lr, betas=o.betas, eps=o.eps)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, fused=device.type == "cuda", **kw)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[o.name]
    return cls(groups, **kw)


def lr_lambda(cfg: RunConfig, total_steps: int) -> Callable[[int], float]:
    s = cfg.scheduler
    warmup = s.warmup_steps or int(s.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if s.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if s.name == "cosine" else 1.0 - progress
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * shape

    return factor


def total_optimizer_steps(cfg: RunConfig, batches_per_epoch: int) -> int:
    per_epoch = batches_per_epoch // cfg.training.gradient_accumulation_steps
    if per_epoch == 0:
        raise ValueError(
            f"one epoch gives {batches_per_epoch} micro batches per worker, fewer than "
            f"training.gradient_accumulation_steps={cfg.training.gradient_accumulation_steps}; lower it or add data"
        )
    return cfg.training.max_steps or per_epoch * cfg.training.epochs


def initialize(cfg: RunConfig, model, device: torch.device, world_size: int, total_steps: int):
    """A DeepSpeed engine over ``model`` with our optimizer and schedule. The torch process group is already up
    (Ray Train made it), so DeepSpeed joins it instead of making its own."""
    import deepspeed

    ds_config = deepspeed_config(cfg, world_size)
    optimizer = build_optimizer(cfg, model, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    schedule = lr_lambda(cfg, total_steps)
    # Handing the schedule to DeepSpeed makes it step at accumulation boundaries and live in its checkpoints.
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=trainable if optimizer is None else None, optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=ds_config, dist_init_required=False,
    )
    return engine, scheduler, ds_config


# --- the loop ----------------------------------------------------------------------------------------------------

@dataclass
class Progress:
    """Where training is: enough to resume exactly (with the data order, which is a function of seed and epoch)."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0


@dataclass
class Window:
    """Sums since the last log line."""
    loss_count: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    step_times: list = field(default_factory=list)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def evaluate(engine, batches: ShardedBatches, device, max_batches: int | None) -> dict:
    """Token-weighted loss over this worker's eval shard, reduced over all workers."""
    import torch.distributed as dist

    engine.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for i, batch in enumerate(batches.epoch(0)):
            if max_batches is not None and i >= max_batches:
                break
            batch.pop("num_tokens")
            batch = to_device(batch, device)
            n = (batch["labels"][:, 1:] != IGNORE).sum()
            loss_sum += engine(**batch).loss.double() * n
            count += n
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(loss_sum)
        dist.all_reduce(count)
    loss = (loss_sum / count.clamp(min=1)).item()
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def _mean_over_workers(values: list[float], device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def step_profiler(cfg: RunConfig, device: torch.device):
    """A torch.profiler over ``training.profile_steps`` optimizer steps, or None."""
    n = cfg.training.profile_steps
    if not n:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    out = cfg.run_dir / f"profile_rank{rank}.txt"
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"

    def write(prof):
        table = prof.key_averages().table(sort_by=sort, row_limit=40)
        out.write_text(table)
        if rank == 0:
            print(f"profile of {n} steps ({out}):\n{table}", flush=True)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities, schedule=schedule(wait=0, warmup=3, active=n, repeat=1),
                   on_trace_ready=write)
    prof.start()
    return prof


def train(cfg: RunConfig, engine, scheduler, batches: ShardedBatches, eval_batches: ShardedBatches | None,
          device: torch.device, progress: Progress, total_steps: int, flops_per_token: float, peak_flops: float,
          report: Callable[[dict, str | None], None],
          should_stop: Callable[[], str | None] | None = None) -> Progress:
    """Run optimizer steps until ``total_steps``, or until ``should_stop()`` (called on every worker after every
    step, and agreed between them) gives a reason: then a resume checkpoint is saved and the loop ends early.
    ``report(metrics, checkpoint)`` is called on every worker at the same steps, with checkpoint None, "resume" or
    "final"."""
    from ftcluster import metrics as M

    t = cfg.training
    gas = t.gradient_accumulation_steps
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    window, loss_acc = Window(), torch.zeros((), device=device)
    profiler = step_profiler(cfg, device)
    first_step_unix = None  # wall clock at the end of this process's first step: the harness's time to first step
    step_started = time.perf_counter()
    while progress.step < total_steps:
        for batch in batches.epoch(progress.epoch, progress.batch_in_epoch):
            window.tokens += int(batch.pop("num_tokens"))
            batch = to_device(batch, device)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            loss_acc += loss.detach().float()
            window.loss_count += 1
            progress.batch_in_epoch += 1
            if progress.batch_in_epoch % gas:
                continue
            progress.step += 1
            if profiler is not None:
                profiler.step()
                if progress.step >= cfg.training.profile_steps + 3:
                    profiler.stop()
                    profiler = None
            now = time.perf_counter()
            first_step_unix = first_step_unix or time.time()
            window.step_times.append(now - step_started)
            step_started = now
            last = progress.step >= total_steps
            stopped = None if last or should_stop is None else should_stop()
            log = progress.step % t.log_every == 0 or last or stopped
            do_eval = eval_batches is not None and ((t.eval_every and progress.step % t.eval_every == 0) or last)
            periodic = t.save_every and progress.step % t.save_every == 0
            save = ("final" if cfg.output.checkpoint_at_end else None) if last else \
                ("resume" if periodic or stopped else None)
            if log or do_eval or save:
                paused = time.perf_counter()
                metrics = {"step": progress.step, "epoch": progress.epoch, "first_step_unix": first_step_unix}
                if stopped:
                    metrics["stopped"] = stopped
                if log:
                    M.sync(device)
                    elapsed = time.perf_counter() - window.started
                    loss_mean, tok_total = _mean_over_workers([loss_acc.item() / window.loss_count,
                                                               window.tokens * world], device)
                    tok_s = window.tokens / elapsed
                    progress.tokens_seen += int(tok_total)
                    grad_norm = engine.get_global_grad_norm()
                    metrics.update({
                        "loss": loss_mean, "lr": scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm) if grad_norm is not None else None,
                        "step_time_s": sorted(window.step_times)[len(window.step_times) // 2],
                        "tokens_per_s": tok_s, "tokens_per_s_total": tok_s * world,
                        "tokens_seen": progress.tokens_seen,
                        "mfu": tok_s * flops_per_token / peak_flops if peak_flops else None,
                        **M.memory(device),
                    })
                    window, loss_acc = Window(), torch.zeros((), device=device)
                if do_eval:
                    metrics.update(evaluate(engine, eval_batches, device, t.eval_batches))
                report(metrics, save)
                # Evaluation and checkpointing are not training: keep them out of step times and tokens/s.
                step_started = time.perf_counter()
                window.started += step_started - paused
            if last or stopped:
                return progress
        progress.epoch += 1
        progress.batch_in_epoch = 0
    return progress
