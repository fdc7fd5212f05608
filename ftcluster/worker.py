"""The Ray Train worker: wires model → data → engine → checkpoints → metrics, in that order, and nothing else."""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time

import torch

from ftcluster import (checkpoint, collector, data, deepspeed_setup, engine, metrics, models, optim, row_cache,
                       run_dir, stop, tracking)
from ftcluster.config import RunConfig, from_dict
from ftcluster.records import CheckpointKind, Progress, WorkerRecord


def use_expandable_segments() -> None:
    """Let the CUDA caching allocator grow segments in place instead of keeping many fixed-size blocks: the gap
    between reserved and allocated memory shrinks (1.7 GiB of 43.8 reserved on the 70B QLoRA run without it),
    which is what decides whether a run fits a 48 GB card. A user's own PYTORCH_CUDA_ALLOC_CONF wins."""
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ:
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    # The allocator may already be running (Ray set the device up): apply the setting to it too.
    torch.cuda.memory._set_allocator_settings("expandable_segments:True")


class CommunicatorWarmUp:
    """Builds the process group's communicator in a background thread while the worker loads its data and builds
    its model. NCCL builds it at the first collective, which is DeepSpeed's broadcast of the model in its engine's
    setup, and building it runs no Python: 0.36-0.59 s of a 0.7-1.5 s engine phase at 7B on H100 hosts
    (reports/ttfs/2026-11-28-1xh100-startup.md). The model build is Python and imports, holding the GIL, so the
    two overlap. ``join()`` before any other collective: collectives from two threads could reach the ranks in
    different orders."""

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


def setup(cfg: RunConfig, rank: int, world: int, device: torch.device,
          inputs=None) -> tuple[engine.Loop, object]:
    """Everything a worker needs before its first step, in order: data, model, DeepSpeed engine. ``inputs``: the
    driver's checked tokenizer and rows (preflight.Inputs), for a worker in its process. Returns the loop's state
    and the tokenizer (saved beside final models)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        use_expandable_segments()
        # DeepSpeed's op builder reads this; unset, it derives "9.0a" on Hopper and fails to parse it
        # (ValueError: invalid literal for int() with base 10: '0a'), seen with deepspeed 0.19 on H100/H200.
        major, minor = torch.cuda.get_device_capability(device)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    random.seed(cfg.training.seed + rank)
    torch.manual_seed(cfg.training.seed)  # same init of LoRA weights on every rank
    started = time.time()
    phases = Phases(rank)
    communicator = CommunicatorWarmUp(device)

    if inputs is None:
        tokenizer = models.load_tokenizer(cfg.model)
        # The driver prepared the rows while checking the data (row_cache): this memory-maps them.
        rows, _, where = row_cache.rows_for(tokenizer, cfg.data, cfg.training.seed, cfg.output.storage_path)
    else:
        tokenizer, rows, where = inputs.tokenizer, inputs.rows, inputs.where
    pad_to = cfg.data.max_seq_len if cfg.data.packing else None
    shard = lambda rows, mb, acc: data.ShardedBatches(
        rows, mb, rank, world, cfg.training.seed, tokenizer.pad_token_id, cfg.data.packing, pad_to, acc)
    train_rows, eval_rows = rows["train"], rows["evaluation"]
    batches = shard(train_rows, cfg.training.micro_batch_size, cfg.training.gradient_accumulation_steps)
    eval_batches = shard(eval_rows, 1, 1) if len(eval_rows) >= world else None
    total_steps = optim.total_optimizer_steps(cfg, len(batches))
    phases.done("data", f"{len(train_rows):,} rows of up to {cfg.data.max_seq_len} tokens, {len(batches):,} micro "
                        f"batches per worker, {len(eval_rows):,} eval rows; {where}")

    ds_config = deepspeed_setup.deepspeed_config(cfg, world)
    partition = deepspeed_setup.zero3_partition(cfg, ds_config)
    if partition is not None:
        communicator.join()  # a ZeRO-3 build partitions the model with collectives
    model = models.build_model(cfg, device, partition)
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
    # training step gets, and showed 83% "MFU" against a one-thread peak.
    peak = metrics.matmul_peak_flops(device, models.DTYPES[compute_dtype]) if device.type == "cuda" else None
    communicator.join()
    ds_engine, scheduler, _ = deepspeed_setup.initialize(cfg, model, device, ds_config, total_steps)
    zero = ("ZeRO-3 (frozen base partitioned by layers, adapters under ZeRO-2)" if cfg.frozen_base_by_layers
            else "ZeRO-3 on one worker (nothing to partition: the frozen base whole, adapters under ZeRO-2)"
            if cfg.frozen_base_whole_on_one_worker else f"ZeRO-{cfg.deepspeed.zero_stage}")
    master = ", bf16 master weights" if cfg.optimizer.master_weights == "bf16" else ""
    phases.done("engine", f"DeepSpeed {zero}, {cfg.optimizer.name}{master}")
    record = WorkerRecord(rank=rank, world_size=world, trainable_params=trainable, total_params=total,
                          total_steps=total_steps, device=str(device), pid=os.getpid(),
                          peak_matmul_tflops=peak / 1e12 if peak else None, compute_dtype=compute_dtype,
                          flops_per_token=flops_per_token, setup_started_unix=started, setup_s=phases.seconds)
    clip = engine.GradClip([p for p in model.parameters() if p.requires_grad], cfg.training.max_grad_norm) \
        if cfg.steps_model_weights else None
    loop = engine.Loop(cfg, ds_engine, scheduler, batches, eval_batches, device, total_steps, peak, record, clip)
    return loop, tokenizer


def quiet_ray_train_reports(level: str) -> None:
    """Ray Train logs an INFO line with the whole metrics dict at every ``ray.train.report``, beside our own
    progress line. ``RunConfig(logging_config=...)`` does not reach it: its filter matches loggers named
    ``ray.train*`` (ray-project/ray#61550), and this one is named by its file's path
    (``logging.getLogger(__file__)`` in ray/train/v2/_internal/execution/context.py, Ray 2.60)."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray, another layout: its lines show, training goes on
        return
    logging.getLogger(context.__file__).setLevel(level)


def local_process_group(cfg: RunConfig) -> torch.device:
    """The device and a one-rank process group for a worker in local mode, which has no Ray Train to set up either:
    DeepSpeed needs the group, and the launcher's variables (it asserts LOCAL_RANK)."""
    from ftcluster.cluster import free_port

    use_gpu = cfg.scaling.use_gpu if cfg.scaling.use_gpu is not None else torch.cuda.is_available()
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    if not torch.distributed.is_initialized():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
        torch.distributed.init_process_group("nccl" if use_gpu else "gloo", rank=0, world_size=1)
    return device


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train entry point: ``setup``, restore, train, reporting and checkpointing through Ray."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(config)
    quiet_ray_train_reports(cfg.ray.train_log_level)
    collector.hold()  # this process's start-up, until its first step (ftcluster/collector.py)
    ctx = ray.train.get_context()
    _train(cfg, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), None, None)


def train_here(cfg: RunConfig, log, inputs=None) -> None:
    """The one worker of a local-mode run (``ray.local_mode``), in the driver's process and without Ray: it makes
    its own one-rank process group, hands its reports to ``log`` (launch.ProgressLog), keeps its checkpoints in the
    run directory, which Ray's controller does otherwise, and takes the driver's checked ``inputs``
    (preflight.Inputs)."""
    device = local_process_group(cfg)
    try:
        _train(cfg, 0, 1, device, log, inputs)
    finally:
        destroy_local_process_group()


def destroy_local_process_group() -> None:
    """The local-mode worker's process group, and DeepSpeed's groups made from it: DeepSpeed keeps them in module
    state, and the next run in this process (another ``launch.run`` in a notebook) found them destroyed ("Group ...
    is not registered")."""
    import deepspeed.comm

    if deepspeed.comm.is_initialized():
        deepspeed.comm.destroy_process_group()
    else:
        torch.distributed.destroy_process_group()


def _train(cfg: RunConfig, rank: int, world: int, device: torch.device, local_log, inputs) -> None:
    """Set up, resume, train and report: through Ray Train, or to ``local_log`` in local mode, which imports no
    Ray (1.3 s of imports on an H100 host)."""
    metrics.start_device_sampler(device)  # before the model exists, so its peak covers everything the run holds
    loop, tokenizer = setup(cfg, rank, world, device, inputs)
    local = local_log is not None
    if not local:
        import ray
        import ray.train

        loop.record.node_id = ray.get_runtime_context().get_node_id()

    progress, resumed = Progress(), None
    if local:
        latest = run_dir.latest_checkpoint(cfg.run_dir)
        if latest is not None:
            progress, resumed = checkpoint.restore(loop.engine, cfg, str(latest)), str(latest)
    elif (resume_from := ray.train.get_checkpoint()) is not None:
        with resume_from.as_directory() as d:
            progress, resumed = checkpoint.restore(loop.engine, cfg, d), resume_from.path
    if resumed is not None and rank == 0:
        print(f"resumed from {resumed} at step {progress.step}", flush=True)
    metrics.reset_peaks(device)
    trackers = tracking.Trackers(cfg, rank)

    def report(record: WorkerRecord, kind: CheckpointKind | None) -> None:
        trackers.log(record)
        if local:
            saved = None
            if kind is not None:
                saved = str(run_dir.save_checkpoint(
                    cfg.run_dir, progress.step, lambda d: checkpoint.save(loop.engine, cfg, progress, d, kind,
                                                                          tokenizer=tokenizer),
                    cfg.output.keep_checkpoints))
            local_log.log([record.to_json()], saved)
            return
        if kind is None:
            ray.train.report(record.to_json())
            return
        with tempfile.TemporaryDirectory() as d:
            checkpoint.save(loop.engine, cfg, progress, d, kind, tokenizer=tokenizer)
            ray.train.report(record.to_json(), checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=run_dir.checkpoint_name(progress.step))

    try:
        engine.train(loop, progress, engine.Hooks(report, should_stop=stop.StopCheck(cfg.run_dir, device)))
    finally:
        trackers.close()
