"""The step loop: optimizer steps over this worker's batches, with logging, evaluation, checkpoints and stops."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ftcluster.config import RunConfig
from ftcluster.data import IGNORE, ShardedBatches


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
    if engine.zero_optimization_partition_weights():
        # Under ZeRO-3 evaluation ends with the last layers still gathered, kept for a backward that never comes.
        engine.empty_partition_cache()
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
    # Device time says which kernels cost; host time shows Python and launch overhead (hooks, small kernels).
    sorts = ["self_cuda_time_total", "self_cpu_time_total"] if device.type == "cuda" else ["self_cpu_time_total"]

    def write(prof):
        averages = prof.key_averages()
        table = "\n".join(f"sorted by {s}:\n" + averages.table(sort_by=s, row_limit=40) for s in sorts)
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
