"""The two ways a run's workers execute, behind one interface: ``InProcess`` (the one worker in the driver's own
process, without Ray, not even imported) and ``OnRay`` (Ray Train workers under a ``TorchTrainer``). The plan picks
one (``Plan.backend``). Everything else exists once, in the modules both use: the worker (ftcluster.worker),
checkpoint keeping and the resume source (ftcluster.checkpoint: the run directory's latest checkpoint), the progress
log (ftcluster.progress), and what a failure is (``WorkerFailed``)."""

from __future__ import annotations

import os
import threading
import time
import traceback
from typing import Protocol

from ftcluster import cluster, collector, patches, worker, worker_errors
from ftcluster.config import ConfigError, RunConfig, from_dict
from ftcluster.hardware import Hardware, node_memory, on_ray_cluster, with_node_memory
from ftcluster.plan import Plan
from ftcluster.progress import ProgressLog
from ftcluster.records import WorkerRecord


class WorkerFailed(Exception):
    """A worker raised: the message is its error, as ``TypeName: message (rank 0)``, one line per distinct error
    (ftcluster.worker_errors)."""


class Backend(Protocol):
    def start(self, cfg: RunConfig, hw: Hardware) -> Hardware:
        """Bring up what the workers need (a Ray cluster, joined or started); returns the hardware as it then
        stands."""

    def check(self, cfg: RunConfig, plan: Plan) -> None:
        """Refuse a plan the backend cannot hold (``ConfigError``, naming the field)."""

    def run(self, cfg: RunConfig, plan: Plan, log: ProgressLog, inputs) -> None:
        """Run the workers to the end of training (or a stop); each report reaches ``log``. Raises ``WorkerFailed``
        when a worker failed and was not restarted."""


def of(plan: Plan) -> Backend:
    return InProcess() if plan.in_process else OnRay()


def with_absolute_storage(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``output.storage_path`` absolute: Ray's workers run in Ray's own working directories."""
    return cfg.model_copy(update={"output": cfg.output.model_copy(update={"storage_path": str(cfg.run_dir.parent)})})


# ---------------------------------------------------------------------------------------------------------------
# In process

class _LocalReporter:
    node_id = None

    def __init__(self, log: ProgressLog):
        self.log = log

    def report(self, record: WorkerRecord) -> None:
        self.log.log([record.to_json()])

    def preempted(self) -> bool:
        return False  # no Ray to drain a node; SIGTERM reaches the driver, and so the STOP file


class InProcess:
    """The one worker, in this process: a one-rank process group of its own, no cluster to join."""

    def start(self, cfg: RunConfig, hw: Hardware) -> Hardware:
        print(f"cluster: none (the worker runs in this process, on {'a GPU' if hw.device == 'cuda' else 'CPUs'}; "
              "ray.local_mode=false runs it on Ray)", flush=True)
        return hw

    def check(self, cfg: RunConfig, plan: Plan) -> None:
        import torch

        if plan.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("scaling.use_gpu=true: torch sees no GPU on this host, where the one worker would run; "
                              "run where GPUs are, join a Ray cluster that has them (ray.address), or set "
                              "scaling.use_gpu=false")

    def run(self, cfg: RunConfig, plan: Plan, log: ProgressLog, inputs) -> None:
        device = local_process_group(plan)
        try:
            worker.run(with_absolute_storage(cfg), plan, 0, 1, device, _LocalReporter(log), inputs)
        except Exception as e:  # noqa: BLE001 - a worker's error, as Ray hands the driver one
            worker_errors.keep(cfg.run_dir, 0, traceback.format_exc())
            raise WorkerFailed(worker_errors.summary({0: e}, cfg.run_dir)) from e
        finally:
            destroy_local_process_group()


def local_process_group(plan: Plan):
    """The device and a one-rank process group for the in-process worker: DeepSpeed needs the group, and the
    launcher's variables (it asserts LOCAL_RANK)."""
    import torch

    device = torch.device("cuda", 0) if plan.device == "cuda" else torch.device("cpu")
    if not torch.distributed.is_initialized():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(cluster.free_port()))
        torch.distributed.init_process_group("nccl" if plan.device == "cuda" else "gloo", rank=0, world_size=1)
    return device


def destroy_local_process_group() -> None:
    """The in-process worker's process group, and DeepSpeed's groups made from it: DeepSpeed keeps them in module
    state, and the next run in this process (another ``launch.run`` in a notebook) found them destroyed ("Group ...
    is not registered")."""
    import deepspeed.comm
    import torch

    if deepspeed.comm.is_initialized():
        deepspeed.comm.destroy_process_group()
    elif torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# On Ray

class _RayReporter:
    def __init__(self):
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()

    def report(self, record: WorkerRecord) -> None:
        import ray.train

        ray.train.report(record.to_json())

    def preempted(self) -> bool:
        return patches.ray_worker_preempted()


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point on every worker: the config and the plan, as the driver made them."""
    import ray.train
    import ray.train.torch

    cfg, plan = from_dict(config["cfg"]), Plan.from_json(config["plan"])
    patches.ray_train_plain_print()
    patches.quiet_library_notices()
    patches.quiet_ray_train_reports(cfg.ray.train_log_level)
    ctx = ray.train.get_context()
    patches.ray_train_error_to_file(cfg.run_dir, ctx.get_world_rank())
    collector.hold()  # this process's start-up, until its first step (ftcluster/collector.py)
    worker.run(cfg, plan, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), _RayReporter())


class OnRay:
    """Ray Train workers under a ``TorchTrainer`` on a Ray cluster: the one named, a running local one, or a new
    local one. Ray Train restarts a failed worker group (``ray.max_failures``); the restarted workers resume from
    the run directory's latest checkpoint, as any resumed run does. With scaling.min_workers the group is elastic:
    restarted on the workers a lost node left, grown back at a checkpoint (patches.torch_trainer)."""

    def __init__(self):
        self.own_cluster = False

    def start(self, cfg: RunConfig, hw: Hardware) -> Hardware:
        import ray

        started = time.time()
        self.own_cluster = cluster.join(cfg) if not ray.is_initialized() else False
        patches.quiet_ray_preemption_watcher_notice()
        hw = on_ray_cluster(cfg, hw, ray.cluster_resources())
        if hw.device == "cuda":  # only a GPU run's checks read the nodes' memory
            hw = with_node_memory(cfg, hw, node_memory())
        print(f"cluster: {time.time() - started:.1f} s, "
              f"{'started' if self.own_cluster else 'joined'}", flush=True)
        return hw

    def check(self, cfg: RunConfig, plan: Plan) -> None:
        cluster.wait_for_resources(cfg, plan.device == "cuda", self.own_cluster)
        collector.release()  # the driver's start-up is over; Ray's workers hold their own full collections

    def run(self, cfg: RunConfig, plan: Plan, log: ProgressLog, inputs) -> None:
        from ray.train import FailureConfig, LoggingConfig, RunConfig as RayRunConfig, ScalingConfig
        from ray.train.torch import TorchConfig

        from ftcluster.ray_progress import RayProgressLog

        s, use_gpu = cfg.scaling, plan.device == "cuda"
        cfg = with_absolute_storage(cfg)
        # Elastic: Ray Train picks the count, from the fewest to the most the plan has an accumulation for.
        workers = (min(plan.elastic), max(plan.elastic)) if plan.elastic else plan.workers
        trainer = patches.torch_trainer(
            str(cfg.run_dir), bool(plan.elastic),
            train_loop_per_worker=train_loop_per_worker,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "plan": plan.to_json()},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                         resources_per_worker=cluster.worker_bundle(cfg, use_gpu),
                                         placement_strategy=s.placement_strategy,
                                         elastic_resize_monitor_interval_s=s.resize_check_s),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RayRunConfig(
                name=cfg.run_name, storage_path=str(cfg.run_dir.parent),
                # Starting the worker group is a controller failure to Ray Train, retried forever by default (a
                # minute each): bound it, so resources that vanish mid-run fail the run instead of hanging it.
                failure_config=FailureConfig(max_failures=cfg.ray.max_failures,
                                             controller_failure_limit=cfg.ray.start_attempts),
                logging_config=LoggingConfig(log_level=cfg.ray.train_log_level),
                callbacks=[RayProgressLog(log)],
            ),
        )
        from ray.train import TrainingFailedError

        # Ray Train's own restarts (ray.max_failures) resume from the run directory's latest checkpoint, there being
        # no checkpoint Ray keeps: every report carries its records only.
        try:
            _fit_off_the_main_thread(trainer)
        except TrainingFailedError as e:
            failures = getattr(e, "worker_failures", None)  # a WorkerGroupError's, by rank
            raise WorkerFailed(worker_errors.summary(failures, cfg.run_dir) if failures else str(e)) from e


def _fit_off_the_main_thread(trainer):
    """``trainer.fit()``, off the main thread when called on it, the main thread waiting. Ray Train installs its own
    SIGINT handler when fit runs on the main thread (abort, no checkpoint); off it, Ctrl-C reaches ours
    (stop.on_signals): the first asks for a checkpoint and a resumable stop, as SIGTERM does, the second interrupts
    at once."""
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
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
