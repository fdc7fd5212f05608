"""The driver: checks the run before anything heavy starts, joins (or starts) a Ray cluster, runs the workers
under a ``TorchTrainer``, and leaves the run directory complete: config.yaml, metrics.jsonl, checkpoints, final/
and summary.json. With ``ray.local_mode`` the one worker runs in this process without Ray: no cluster is joined or
started, and Ray is not imported."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from ftcluster import cluster, collector, preflight, records, run_dir as rundir, stop
from ftcluster.config import RunConfig


class ProgressLog:
    """On every report: append the workers' records as one line of metrics.jsonl and print its progress line.
    For a run on Ray, Ray Train's controller calls it (``ray_progress.RayProgressLog``, in the controller's process
    on the head node, where the run directory is); in local mode the worker calls it, in this process.
    ``checkpoint``: the last checkpoint reported, the run's result."""

    def __init__(self, run_dir: str, started_unix: float):
        self.run_dir, self.started_unix, self.first_step_said = Path(run_dir), started_unix, False
        self.checkpoint: str | None = None

    def log(self, metrics: list[dict], checkpoint: str | None) -> None:
        line = records.Line.of_workers([records.WorkerRecord.from_json(m) for m in metrics], checkpoint)
        self.checkpoint = checkpoint or self.checkpoint
        records.append_line(self.run_dir, line)
        if line.first_step_unix and line.first_step_unix >= self.started_unix and not self.first_step_said:
            print(f"first step: done {line.first_step_unix - self.started_unix:.1f} s after the command started "
                  "(summary.json splits it by phase)", flush=True)
            self.first_step_said = True
        print(records.progress_line(line), flush=True)


def _fit_off_the_main_thread(trainer):
    """``trainer.fit()`` in another thread, the main thread waiting on it. Ray Train installs its own SIGINT handler
    when fit runs on the main thread (abort, no checkpoint); off it, Ctrl-C reaches ours (stop.on_signals): the
    first asks for a checkpoint and a resumable stop, as SIGTERM does, the second interrupts at once."""
    outcome = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # in slices: the main thread must keep running its signal handlers
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def settle_local_mode(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``ray.local_mode=auto`` decided: local for one worker, no restarts, and no Ray cluster it was
    meant to join (ray.address or RAY_ADDRESS, one started in this process, or a live one `ray start` recorded on
    this host; a stale record, left by a cluster that died, is no cluster)."""
    r = cfg.ray
    if r.local_mode != "auto":
        return cfg
    ray = sys.modules.get("ray")  # not imported: then not started in this process either (importing it costs 0.3 s)
    alone = (cfg.scaling.num_workers == 1 and r.max_failures == 0 and not r.address
             and not os.environ.get("RAY_ADDRESS") and not (ray is not None and ray.is_initialized())
             and cluster.live_recorded() is None)
    return cfg.model_copy(update={"ray": r.model_copy(update={"local_mode": alone})})


def run(cfg: RunConfig, force: bool = False, command_started: float | None = None) -> dict:
    """Train; return the summary (also written to ``<run_dir>/summary.json``). ``force`` starts a run the memory
    estimator says will not fit its GPUs. ``command_started``: when the command began, before its imports (the
    time to the first step is counted from there); by default, now."""
    started = time.time()
    command_started = command_started or started
    cfg = settle_local_mode(cfg)
    # Before the run directory exists and before Ray: a refused run leaves no run directory and takes no GPU (the
    # data check leaves its prepared rows under the storage path, for the next try).
    rundir.check(cfg)
    inputs = preflight.check_inputs(cfg)
    print(inputs.line, flush=True)
    print(preflight.check_fit(cfg, force), flush=True)
    checked = time.time()
    print(f"checks: {checked - started:.1f} s", flush=True)
    s = cfg.scaling
    if cfg.ray.local_mode:
        import torch

        use_gpu = s.use_gpu if s.use_gpu is not None else torch.cuda.is_available()
        ready = time.time()
        print(f"cluster: none (ray.local_mode; scaling.num_workers=1 and no cluster to join, or set it to false): the "
              f"worker runs in this process, on {'a GPU' if use_gpu else 'CPUs'}", flush=True)
    else:
        import ray

        own_cluster = cluster.join(cfg) if not ray.is_initialized() else False
        use_gpu = s.use_gpu if s.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
        cluster.wait_for_resources(cfg, use_gpu, own_cluster)
        collector.release()  # the driver's start-up is over; Ray's workers hold their own full collections
        ready = time.time()
        print(f"cluster: {ready - checked:.1f} s, {'started' if own_cluster else 'joined'}; {s.num_workers} "
              f"worker(s) on {'GPUs' if use_gpu else 'CPUs'}", flush=True)
    run_dir = rundir.prepare(cfg)
    try:
        return _train(cfg, run_dir, use_gpu, command_started,
                      {"imports": started - command_started, "checks": checked - started, "cluster": ready - checked,
                       "ready_unix": ready}, inputs)
    finally:
        rundir.release(run_dir)


def _train(cfg: RunConfig, run_dir: Path, use_gpu: bool, started: float, driver_phases: dict,
           inputs: preflight.Inputs) -> dict:
    """The workers (under a ``TorchTrainer``, or in this process with ``ray.local_mode``), then the run directory's
    final/ and summary.json. The first SIGTERM or SIGINT asks them for a checkpoint and a resumable stop."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
    if in_main:
        stop.on_signals(run_dir)
    try:
        if cfg.ray.local_mode:
            from ftcluster.worker import train_here

            progress_log = ProgressLog(str(run_dir), started)
            train_here(_with_absolute_storage(cfg, run_dir), progress_log, inputs)
            checkpoint = progress_log.checkpoint
        else:
            checkpoint = _train_on_ray(cfg, run_dir, use_gpu, started, in_main)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    final = rundir.publish_final(run_dir, checkpoint)
    # Ray attaches metrics to the result only with a checkpoint: the records are the source.
    summary = records.Summary.of_lines(
        records.read_lines(run_dir), run_dir, cfg.method, time.time() - started, started, driver_phases,
        checkpoint=checkpoint,
        final_model=str(final) if final else None, final_model_bytes=rundir.dir_bytes(final) if final else None,
        checkpoint_bytes=rundir.dir_bytes(Path(checkpoint)) if checkpoint else None)
    summary.write(run_dir)
    return summary.to_json()


def _with_absolute_storage(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """``cfg`` with ``output.storage_path`` absolute: Ray's workers run in Ray's own working directories."""
    return cfg.model_copy(update={"output": cfg.output.model_copy(update={"storage_path": str(run_dir.parent)})})


def _train_on_ray(cfg: RunConfig, run_dir: Path, use_gpu: bool, started: float, in_main: bool) -> str | None:
    """The workers under Ray Train's ``TorchTrainer``; returns the path of the run's last checkpoint, or None."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ftcluster.ray_progress import RayProgressLog
    from ftcluster.worker import train_loop_per_worker

    s = cfg.scaling
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=_with_absolute_storage(cfg, run_dir).model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=preflight.worker_bundle(cfg, use_gpu),
                                     placement_strategy=s.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RayRunConfig(
            name=cfg.run_name, storage_path=str(run_dir.parent),
            # Starting the worker group is a controller failure to Ray Train, retried forever by default (a
            # minute each): bound it, so resources that vanish mid-run fail the run instead of hanging it.
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures,
                                         controller_failure_limit=cfg.ray.start_attempts),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.output.keep_checkpoints),
            logging_config=LoggingConfig(log_level=cfg.ray.train_log_level),
            callbacks=[RayProgressLog(str(run_dir), started)],
        ),
    )
    result = _fit_off_the_main_thread(trainer) if in_main else trainer.fit()
    return result.checkpoint.path if result.checkpoint is not None else None
