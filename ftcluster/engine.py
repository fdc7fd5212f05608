"""The step loop: optimizer steps over this worker's batches, with logging, evaluation, checkpoints and stops."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ftcluster import collector, metrics as M, stop
from ftcluster.config import RunConfig
from ftcluster.data.formatting import IGNORE
from ftcluster.data.packing import ShardedBatches
from ftcluster.plan import Plan
from ftcluster.records import CheckpointKind, Progress, WorkerRecord
from ftcluster.stop import DIVERGED


@dataclass
class Loop:
    """What the loop runs on, built once by the worker's set-up: the engine and its schedule, this worker's
    batches, and the figures its records carry from step to step (``record``: who and what, set at every step)."""
    cfg: RunConfig
    plan: Plan
    engine: object
    scheduler: object
    batches: ShardedBatches  # or sequence_parallel.SequenceShards: the same interface
    eval_batches: ShardedBatches | None
    device: torch.device
    total_steps: int
    peak_flops: float | None
    record: WorkerRecord
    clip: "GradClip | None" = None
    """Set where the optimizer steps the model's own weights (``Plan.clips_gradients``): the loop clips."""

    def __post_init__(self):
        # ZeRO-0 on one rank: DeepSpeed would still copy every gradient into flat buckets, all-reduce them with itself
        # and copy them back; no_sync (its public switch for skipping that reduction) leaves them where they are.
        alone = self.record.world_size == 1 and self.plan.zero_stage == 0
        self.backward_context = self.engine.no_sync if alone else contextlib.nullcontext


@dataclass
class GradClip:
    """Gradient clipping where DeepSpeed wraps nothing around the optimizer: one foreach norm over the 16-bit
    gradients and one foreach scale, at each optimizer step (DeepSpeed's own takes a float32 copy of each gradient
    and its norm in turn). The norm is kept for the log, which DeepSpeed has none of in this mode. ``max_norm`` 0:
    the norm only."""
    params: list
    max_norm: float
    norm: torch.Tensor | None = None

    def __call__(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        self.norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if self.max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.max_norm, self.norm, foreach=True)


@dataclass
class Hooks:
    """What the loop calls out to. ``report(record, checkpoint)`` runs on every worker at the same steps, with the
    kind of checkpoint to save or None; ``should_stop()`` after every step (agreed between workers) gives a reason
    to stop early, ``stop.TIMED`` for a checkpoint due by time (saved, and training goes on), or None."""
    report: Callable[[WorkerRecord, CheckpointKind | None], None]
    should_stop: Callable[[], str | None] | None = None
    export: Callable[[int], None] | None = None
    """Write the model in Hugging Face format at this step (``training.export_every``); every worker calls it."""


@dataclass
class Window:
    """Sums since the last log line."""
    loss_count: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    step_times: list = field(default_factory=list)


VARYING = ("cu_seq_lens_q", "cu_seq_lens_k")
"""Batch tensors whose length changes from batch to batch (one boundary per packed example)."""


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch on ``device``, its varying lengths marked dynamic for torch.compile: compiled layers are then
    compiled once for any number of examples, where each new length would otherwise be a recompile, seconds each.
    Nothing changes where nothing is compiled."""
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    for k in VARYING:
        if k in moved:
            torch._dynamo.maybe_mark_dynamic(moved[k], 0)
    return moved


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
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}  # exp overflows past ~700


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


def _window_figures(loop: Loop, window: Window, loss_sum: torch.Tensor, progress: Progress) -> dict:
    """The logging window's figures, the same on every worker (loss and tokens are averaged over workers)."""
    M.sync(loop.device)
    world = loop.record.world_size
    elapsed = time.perf_counter() - window.started
    loss_mean, tok_total = _mean_over_workers([loss_sum.item() / window.loss_count, window.tokens * world],
                                              loop.device)
    tok_s = window.tokens / elapsed
    progress.tokens_seen += int(tok_total)
    grad_norm = loop.clip.norm if loop.clip is not None else loop.engine.get_global_grad_norm()
    flops = loop.record.flops_per_token
    return {"loss": loss_mean, "lr": loop.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "step_time_s": statistics.median(window.step_times),
            "tokens_per_s": tok_s, "tokens_per_s_total": tok_s * world, "tokens_seen": progress.tokens_seen,
            "mfu": tok_s * flops / loop.peak_flops if loop.peak_flops and flops else None,
            "mfu_datasheet": (tok_s * flops / (loop.record.datasheet_tflops * 1e12)
                              if loop.record.datasheet_tflops and flops else None),
            **M.memory(loop.device)}


@dataclass
class DivergenceGuard:
    """Says when logged figures show training has diverged: a NaN or infinite loss or gradient norm, a loss past
    ``training.divergence_loss_factor`` times the lowest so far and ``MIN_RISE`` above it, or a zero gradient norm at
    ``training.divergence_zero_grad_logs`` logging steps in a row. The figures are the same on every worker (the
    loss is averaged over them and the norm is global), so every worker stops at the same step without a
    collective."""
    loss_factor: float
    zero_grad_logs: int
    lowest: float = math.inf
    zero_grads: int = 0

    MIN_RISE = 1.0
    """Nats a loss must also rise above the lowest to count as diverged: near zero a factor alone fires on the
    batch-to-batch spread (0.013 then 0.08 on a learned task), where a diverging run's loss climbs by nats."""

    def check(self, loss: float, grad_norm: float | None) -> str | None:
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            return f"loss {loss} and gradient norm {grad_norm} are not finite"
        if self.loss_factor and loss > self.loss_factor * self.lowest and loss - self.lowest > self.MIN_RISE:
            return (f"loss {loss:.4g} is over {self.loss_factor:g}x the lowest so far ({self.lowest:.4g}; "
                    "training.divergence_loss_factor)")
        self.lowest = min(self.lowest, loss)
        self.zero_grads = self.zero_grads + 1 if grad_norm == 0 else 0
        if self.zero_grad_logs and self.zero_grads >= self.zero_grad_logs:
            return (f"the gradient norm has been 0 at {self.zero_grads} logging steps in a row "
                    "(training.divergence_zero_grad_logs): the weights no longer learn")
        return None


def _checkpoint_kind(cfg: RunConfig, step: int, last: bool, asked: str | None) -> CheckpointKind | None:
    """``asked``: what the stop check returned (a stop, a resize, or a checkpoint due by time)."""
    if last:
        return CheckpointKind.FINAL if cfg.output.checkpoint_at_end else None
    periodic = cfg.training.save_every and step % cfg.training.save_every == 0
    return CheckpointKind.RESUME if periodic or asked else None


def train(loop: Loop, progress: Progress, hooks: Hooks) -> Progress:
    """Run optimizer steps until ``loop.total_steps``, or until ``hooks.should_stop()`` gives a reason: then a
    resume checkpoint is saved and the loop ends early."""
    # transformers loads models in eval mode: without this, the model's own modules (not the adapters, which start
    # in training mode) would run as in evaluation until the first evaluation ended: its dropout off, and Ulysses
    # attention bypassed (ftcluster/sequence_parallel.py).
    loop.engine.train()
    try:
        return _steps(loop, progress, hooks)
    finally:
        collector.release()


def _steps(loop: Loop, progress: Progress, hooks: Hooks) -> Progress:
    cfg, engine, t = loop.cfg, loop.engine, loop.cfg.training
    gas = loop.plan.accumulation
    window, loss_sum = Window(), torch.zeros((), device=loop.device)
    profiler = step_profiler(cfg, loop.device)
    first_step_unix = None
    guard = DivergenceGuard(t.divergence_loss_factor, t.divergence_zero_grad_logs)
    step_started = time.perf_counter()
    slices = loop.plan.sequence_parallel
    while progress.step < loop.total_steps:
        part = 0
        for batch in loop.batches.epoch(progress.epoch, progress.rows_in_epoch):
            window.tokens += int(batch.pop("num_tokens"))
            batch = to_device(batch, loop.device)
            loss = engine(**batch).loss
            with loop.backward_context():
                engine.backward(loss)
            if loop.clip is not None and engine.is_gradient_accumulation_boundary():
                loop.clip()
            engine.step()
            # Sequence parallelism: each micro step trains a slice of one group member's rows, and K of them take
            # one micro step's rows of every member (ftcluster/sequence_parallel.py).
            loss_sum += loss.detach().float() if slices == 1 else loop.batches.row_loss(loss)
            window.loss_count += 1
            part += 1
            if part < slices:
                continue
            part = 0
            progress.rows_in_epoch += loop.batches.rows_per_micro_step
            if progress.rows_in_epoch % (loop.batches.rows_per_micro_step * gas):
                continue
            progress.step += 1
            if profiler is not None:
                profiler.step()
                if progress.step >= t.profile_steps + 3:
                    profiler.stop()
                    profiler = None
            now = time.perf_counter()
            if first_step_unix is None:
                first_step_unix = time.time()
                # What the first step built (compiled graphs, kernels, the engine's state) lives to the end: out of
                # the collector's sight, a full collection no longer walks it (each would cost a step's worth of
                # time on a small model). Full collections, held off through start-up, run again after this one.
                collector.after_first_step()
            window.step_times.append(now - step_started)
            step_started = now
            last = progress.step >= loop.total_steps
            asked = None if last or hooks.should_stop is None else hooks.should_stop()
            save = _checkpoint_kind(cfg, progress.step, last, asked)
            stopped = None if asked == stop.TIMED else asked
            # A checkpoint step is a logging step: the divergence guard sees its figures before it is saved, so a
            # checkpoint is never written from diverged weights (DeepSpeed's bf16 steps skip no non-finite step).
            export = bool(t.export_every) and progress.step % t.export_every == 0 and not last
            log = progress.step % t.log_every == 0 or last or stopped or save is not None or export
            do_eval = loop.eval_batches is not None and ((t.eval_every and progress.step % t.eval_every == 0)
                                                         or last)
            if log or do_eval or save:
                paused = time.perf_counter()
                figures = {"step": progress.step, "epoch": progress.epoch, "first_step_unix": first_step_unix,
                           "stopped": stopped}
                if log:
                    figures.update(_window_figures(loop, window, loss_sum, progress))
                    window, loss_sum = Window(), torch.zeros((), device=loop.device)
                    diverged = guard.check(figures["loss"], figures["grad_norm"])
                    if diverged:
                        # Report it without a checkpoint: the last good one stays the latest, and no final model
                        # is written from diverged weights.
                        figures["stopped"] = f"{DIVERGED} at step {progress.step}: {diverged}"
                        hooks.report(replace(loop.record, **figures), None)
                        return progress
                    if save is CheckpointKind.RESUME and figures["grad_norm"] == 0:
                        # Weights whose gradient vanished are how a run that diverged in bf16 looks before the guard
                        # is sure: never kept as the one to resume from, which stays the previous checkpoint.
                        save = None
                        if loop.record.rank == 0:
                            print(f"step {progress.step}: no checkpoint saved, the gradient norm is 0; the latest "
                                  "checkpoint stays the one to resume from", flush=True)
                if do_eval:
                    figures.update(evaluate(engine, loop.eval_batches, loop.device, t.eval_batches))
                if export and hooks.export is not None:
                    hooks.export(progress.step)
                hooks.report(replace(loop.record, **figures), save)
                # Evaluation and checkpointing are not training: keep them out of step times and tokens/s.
                step_started = time.perf_counter()
                window.started += step_started - paused
            if last or stopped:
                return progress
        progress.epoch += 1
        progress.rows_in_epoch = 0
    return progress
