"""One worker: wires data → model → engine → checkpoints → reports, in that order, and nothing else. It runs what
the run's plan says, under either backend (ftcluster.backends), which hands it a ``Reporter``: where its records go
and whether its node is being taken away."""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import replace
from typing import Protocol

import torch

from ftcluster import built, checkpoint, deepspeed_setup, engine, metrics, models, optim, patches, \
    sequence_parallel, sources, stop, tracking
from ftcluster.config import RunConfig
from ftcluster.data import packing, prepare
from ftcluster.plan import Plan, reshards
from ftcluster.records import CheckpointKind, Progress, WorkerRecord


class Reporter(Protocol):
    """What a backend gives its workers: where each record goes, and the node's fate."""

    node_id: str | None

    def report(self, record: WorkerRecord) -> None:
        """Called by every worker at the same steps; ``record.checkpoint`` names the checkpoint the step saved."""

    def preempted(self) -> bool:
        """Whether this worker's node is being taken away (a spot reclaim, a drained node)."""


def use_expandable_segments() -> None:
    """Let the CUDA caching allocator grow segments in place instead of keeping many fixed-size blocks: the gap
    between reserved and allocated memory shrinks, which can decide whether a run fits its card. A user's own
    PYTORCH_CUDA_ALLOC_CONF wins."""
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ:
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    patches.expandable_segments_now()


class CommunicatorWarmUp:
    """Builds the process group's communicator in a background thread while the worker loads its data and builds
    its model. NCCL builds it at the first collective, which is DeepSpeed's broadcast of the model in its engine's
    setup, and building it runs no Python: about half of the engine phase. The model build is Python and imports,
    holding the GIL, so the two overlap. ``join()`` before any other collective: collectives from two threads could
    reach the ranks in different orders."""

    def __init__(self, device: torch.device):
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._barrier, args=(device,), name="communicator-warm-up", daemon=True)
        self.thread.start()

    def _barrier(self, device: torch.device) -> None:
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)  # the current device is per thread
                torch.distributed.barrier(device_ids=[device.index])
            else:
                torch.distributed.barrier()
        except BaseException as e:  # noqa: BLE001 - raised again in the worker's thread by join()
            self.error = e

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


class Phases:
    """Times the worker's setup phases; rank 0 prints one line per phase with its duration."""

    def __init__(self, rank: int):
        self.rank, self.seconds, self._since = rank, {}, time.perf_counter()

    def done(self, name: str, detail: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._since
        self._since = now
        if self.rank == 0:
            print(f"{name}: {self.seconds[name]:.1f} s, {detail}", flush=True)


def setup(cfg: RunConfig, plan: Plan, rank: int, world: int, device: torch.device,
          inputs=None, load_universal: bool = False) -> tuple[engine.Loop, object]:
    """Everything a worker needs before its first step, in order: data, model, DeepSpeed engine. ``inputs``: the
    driver's checked tokenizer and rows (preflight.Inputs), for a worker in its process; ``load_universal``: the
    engine will resume from a universal checkpoint. Returns the loop's state and the tokenizer (saved beside final
    models)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        use_expandable_segments()
        # DeepSpeed's op builder reads this; unset, it derives "9.0a" on Hopper and fails to parse it
        # (ValueError: invalid literal for int() with base 10: '0a').
        major, minor = torch.cuda.get_device_capability(device)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    random.seed(cfg.training.seed + rank)
    torch.manual_seed(cfg.training.seed)  # same init of LoRA weights on every rank
    started = time.time()
    phases = Phases(rank)
    communicator = CommunicatorWarmUp(device)

    if inputs is None:
        tokenizer = sources.load_tokenizer(cfg.model)
        # The driver prepared the rows while checking the data (ftcluster.data): this memory-maps them.
        rows, _, where = prepare.rows_for(tokenizer, cfg.data, cfg.training.seed, cfg.output.storage_path,
                                            plan.streaming)
    else:
        tokenizer, rows, where = inputs.tokenizer, inputs.rows, inputs.where
    # Sequence parallelism gathers a group's rows at one width (gloo gathers equal sizes only).
    pad_to = cfg.data.max_seq_len if cfg.data.packing or plan.sequence_parallel > 1 else None
    shard = lambda rows, mb, acc, split=1, padding_free=False: packing.ShardedBatches(
        rows, mb, rank, world, cfg.training.seed, tokenizer.pad_token_id, cfg.data.packing, pad_to, acc, split,
        padding_free)
    train_rows, eval_rows = rows["train"], rows["evaluation"]
    batches = shard(train_rows, plan.micro_batch, plan.accumulation, plan.sequence_parallel, plan.padding_free)
    eval_batches = shard(eval_rows, 1, 1) if len(eval_rows) >= world else None
    total_steps = optim.total_optimizer_steps(cfg, plan, len(batches))
    regrouped = (f" regrouped into {len(batches.rows):,} padding-free rows of up to {batches.pad_to:,} tokens,"
                 if plan.padding_free else "")
    phases.done("data", f"{len(train_rows):,} rows of up to {cfg.data.max_seq_len} tokens,{regrouped} "
                        f"{len(batches):,} micro batches per worker, {len(eval_rows):,} eval rows; {where}")

    ds_config = deepspeed_setup.deepspeed_config(cfg, plan, world, load_universal)
    partition = deepspeed_setup.zero3_partition(plan, ds_config)
    if partition is not None:
        communicator.join()  # a ZeRO-3 build partitions the model with collectives
    model = models.build_model(cfg, plan, device, partition)
    if rank == 0:
        print(models.describe_parameters(model), flush=True)
    trainable, total = models.parameter_counts(model)
    phases.done("model", f"{total / 1e9:.2f}B parameters ({cfg.method}, {cfg.model.dtype}), {trainable:,} trainable, "
                         f"on {device}")
    hf = model.config
    flops_per_token = metrics.train_flops_per_token(
        total, hf.num_hidden_layers, hf.hidden_size, cfg.data.max_seq_len, cfg.method, trainable)
    compute_dtype = cfg.quantization.compute_dtype if cfg.method == "qlora" else cfg.model.dtype
    # On CPUs no MFU: a matmul timed here runs on however many threads torch has at this moment, not on what the
    # training step gets.
    peak = metrics.matmul_peak_flops(device, models.DTYPES[compute_dtype]) if device.type == "cuda" else None
    datasheet = (metrics.datasheet_peak_flops(torch.cuda.get_device_name(device), models.DTYPES[compute_dtype])
                 if device.type == "cuda" else None)
    communicator.join()
    mpu = None
    if plan.sequence_parallel > 1:
        mpu = sequence_parallel.register(model, plan.attention, plan.sequence_parallel, plan.micro_batch)
        batches = sequence_parallel.SequenceShards(batches, mpu, device, plan.zero_stage)
    ds_engine, scheduler, _ = deepspeed_setup.initialize(cfg, plan, model, device, ds_config, total_steps, mpu)
    built.check(plan, ds_engine.module, ds_engine)
    phases.done("engine", f"DeepSpeed ZeRO-{plan.zero_stage}"
                          + (f", frozen base {plan.frozen_base}" if plan.frozen_base else "")
                          + f", {cfg.optimizer.name}, float32 masters: {plan.masters}")
    record = WorkerRecord(rank=rank, world_size=world, trainable_params=trainable, total_params=total,
                          total_steps=total_steps, device=str(device), pid=os.getpid(),
                          peak_matmul_tflops=peak / 1e12 if peak else None,
                          datasheet_tflops=datasheet / 1e12 if datasheet else None, compute_dtype=compute_dtype,
                          flops_per_token=flops_per_token, setup_started_unix=started, setup_s=phases.seconds)
    clip = engine.GradClip([p for p in model.parameters() if p.requires_grad], cfg.training.max_grad_norm) \
        if plan.steps_model_weights else None
    loop = engine.Loop(cfg=cfg, plan=plan, engine=ds_engine, scheduler=scheduler, batches=batches,
                       eval_batches=eval_batches, device=device, total_steps=total_steps, peak_flops=peak,
                       record=record, clip=clip)
    return loop, tokenizer


def run(cfg: RunConfig, plan: Plan, rank: int, world: int, device: torch.device, reporter: Reporter,
        inputs=None) -> None:
    """Set up, resume from the run directory's latest checkpoint, train, and report every logging, evaluation and
    checkpoint step to ``reporter``."""
    metrics.start_device_sampler(device)  # before the model exists, so its peak covers everything the run holds
    plan = plan.for_workers(world)  # an elastic run's worker count is Ray Train's to choose
    if rank == 0 and plan.elastic:
        print(f"workers: {world} (scaling.min_workers={min(plan.elastic)} to num_workers={max(plan.elastic)}), "
              f"{plan.accumulation} micro batches of {plan.micro_batch} each, {plan.global_batch} rows a step",
              flush=True)
    latest = checkpoint.latest(cfg.run_dir)
    saved_on = (checkpoint.progress_of(latest).get("workers") or None) if latest is not None else None
    universal = reshards(saved_on, world, plan.zero_stage)
    loop, tokenizer = setup(cfg, plan, rank, world, device, inputs, load_universal=universal)
    loop.record.node_id = reporter.node_id
    progress = Progress()
    if latest is not None:
        if universal:
            checkpoint.universal_for(latest, cfg.optimizer.name)
        progress = checkpoint.restore(loop.engine, cfg, latest, universal)
        if rank == 0:
            print(f"resumed from step {progress.step} on {world} workers (saved on {saved_on or world}): {latest}",
                  flush=True)
    progress.workers, progress.global_batch = world, plan.micro_batch * plan.accumulation * world
    metrics.reset_peaks(device)
    trackers = tracking.Trackers(cfg, rank)

    def report(record: WorkerRecord, kind: CheckpointKind | None) -> None:
        trackers.log(record)
        if kind is not None:
            write = lambda d: checkpoint.save(loop.engine, cfg, progress, d, kind, tokenizer=tokenizer)
            # Once the run has finished, no earlier checkpoint is needed to resume it.
            keep = 1 if kind is CheckpointKind.FINAL else cfg.output.keep_checkpoints
            saved = checkpoint.keep(cfg.run_dir, progress.step, write, keep)
            record = replace(record, checkpoint=str(saved))
            should_stop.saved()
        reporter.report(record)

    should_stop = stop.StopCheck(cfg.run_dir, device, reporter.preempted,
                                 save_every_s=cfg.training.save_every_minutes * 60)
    try:
        export = lambda step: checkpoint.export(loop.engine, cfg, step, tokenizer)
        engine.train(loop, progress, engine.Hooks(report, should_stop=should_stop, export=export))
    finally:
        trackers.close()
    if should_stop.reason == stop.RESIZE:
        await_resize(cfg, rank)


RESIZE_WAIT_S = 300.0


def await_resize(cfg: RunConfig, rank: int, limit_s: float = RESIZE_WAIT_S) -> None:
    """After the checkpoint a resize asked for: answer the request and wait for Ray Train to stop these workers
    and start more from that checkpoint. Returning would end the run as finished; a resize that does not come
    fails the attempt instead, and Ray Train restarts it from the same checkpoint."""
    if rank == 0:
        stop.resized(cfg.run_dir)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(1)
    raise RuntimeError(f"the workers saved a checkpoint for Ray Train to restart them on more workers, and it did "
                       f"not within {limit_s:.0f} s")
