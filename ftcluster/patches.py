"""Every place ftcluster reaches into another library's internals, in one module: each names the version range it
was written for (``PATCHES``), a version outside that range is warned about when this module is imported, and
tests/unit/test_patches.py fails when the behaviour a patch relies on changes upstream.

The libraries are imported by each function when it runs, never here: an in-process run imports no Ray at all.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import os
import sys
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Patch:
    name: str
    """The function below (or the module) that holds it."""
    package: str
    """The distribution whose internals it relies on."""
    versions: str
    """The versions it was written for and tested with, as a specifier."""
    why: str


PATCHES = (
    Patch("ray_worker_preempted", "ray", ">=2.60,<2.61",
          "reads the worker's own preemption mark, which ray.train.get_preemption_info() reads through a collective"),
    Patch("quiet_ray_train_reports", "ray", ">=2.60,<2.61",
          "Ray Train's per-report INFO line comes from a logger named by its file's path (ray-project/ray#61550)"),
    Patch("start_local_ray_cluster", "ray", ">=2.60,<2.61",
          "the state API finds its cluster by RAY_API_SERVER_ADDRESS, else by the host's record (ray-project/ray#65447)"),
    Patch("is_compiled", "torch", ">=2.11,<2.15",
          "nn.Module.compile() keeps the compiled call in the module's _compiled_call_impl"),
    Patch("attention_of", "transformers", ">=5.0,<6",
          "a built model's config names its attention implementation in _attn_implementation"),
    Patch("sdpa_backend", "torch", ">=2.11,<2.15",
          "torch._fused_sdp_choice returns the SDPBackend number scaled_dot_product_attention dispatches such a call to"),
    Patch("expandable_segments_now", "torch", ">=2.11,<2.15",
          "applies the allocator setting to an allocator already running (torch._C._accelerator_setAllocatorSettings)"),
    Patch("torch_extension_locks_with_owner", "torch", ">=2.11,<2.15",
          "cpp_extension._jit_compile takes its build directory's lock as FileBaton(<dir>/lock), builds only if "
          "try_acquire() succeeds and otherwise waits for the file to go (pytorch/pytorch#189245)"),
    Patch("cache_custom_autograd_functions", "torch", ">=2.11,<2.15",
          "AOTAutograd's cache keeps graphs holding a custom autograd.Function only behind a flag "
          "(pytorch/pytorch#149751)"),
    Patch("deepspeed_autotuner_without_mlflow", "deepspeed", ">=0.19,<0.20",
          "deepspeed.autotuning.autotuner, imported by every `import deepspeed`, imports mlflow where installed "
          "(for autotuning experiments) and falls back on any exception"),
    Patch("deepspeed_without_shm_op", "deepspeed", ">=0.19,<0.20",
          "deepspeed.comm.torch.TorchBackend builds its CPU shared-memory op by the module's build_shm_op(), and uses "
          "it only in inference_all_reduce"),
    Patch("deepspeed_nvtx", "deepspeed", ">=0.19,<0.20",
          "DeepSpeed's NVTX ranges are a module switch (deepspeed.utils.nvtx.enable_nvtx)"),
    Patch("tiled_mlp_function", "deepspeed", ">=0.19,<0.20",
          "TiledMLP's backward reads the fn, self, shards and compute_params its forward leaves on ctx, and the saved x"),
    Patch("checkpoints_without_tied_frozen_weights", "deepspeed", ">=0.19,<0.20",
          "exclude_frozen_parameters leaves out frozen parameters by named_parameters(), which skips tied ones"),
    Patch("zero3_full_state_dict", "deepspeed", ">=0.19,<0.20",
          "the 16-bit model gathered from ZeRO-3 partitions (DeepSpeedEngine._zero3_consolidated_16bit_state_dict)"),
    Patch("liger_apply_to_instance", "liger-kernel", ">=0.8.5,<0.9",
          "Liger's apply functions also replace names in transformers' modeling module, for every later model"),
    Patch("liger_fused_loss_chunks", "liger-kernel", ">=0.8.5,<0.9",
          "Liger's causal-LM forward hands extra keywords on to its fused loss (chunk_mem_const)"),
    Patch("liger_fused_loss_in_eval", "liger-kernel", ">=0.8.5,<0.9",
          "Liger's causal-LM forward fuses the loss only in training mode unless asked (skip_logits)"),
    Patch("init_module_weights", "transformers", ">=5.0,<6",
          "PreTrainedModel._init_weights initialises one module as from_config would"),
    Patch("linear4bit.adopt", "bitsandbytes", ">=0.48,<0.51",
          "MatMul4Bit keeps a view of the packed weight in its autograd context (ftcluster/linear4bit.py)"),
    Patch("quiet_bitsandbytes_cpu_notice", "bitsandbytes", ">=0.48,<0.51",
          "bitsandbytes' CPU backend logs a warning when the optional `kernels` package is absent"),
    Patch("quiet_liger_backend_discovery", "liger-kernel", ">=0.8.5,<0.9",
          "Liger's backend registry logs a warning for every optional kernel backend that does not import"),
    Patch("torch_trainer", "ray", ">=2.60,<2.61",
          "hands Ray Train's controller a failure policy that restarts no deterministic error and no requested stop, "
          "and an elastic run its scaling policy changed to grow the workers only at a checkpoint and to count only "
          "the nodes alive in the reservation the autoscaling coordinator keeps by node ID (it refreshes it every 20 s)"),
    Patch("ray_train_error_to_file", "ray", ">=2.60,<2.61",
          "a Ray Train worker logs its training function's error as one record, 'Error in training function:' and "
          "the whole traceback, on the logger of ray/train/v2/_internal/util.py"),
    Patch("ray_train_plain_print", "ray", ">=2.60,<2.61",
          "Ray Train's workers route print() to a logger and, where stdout is Ray's, print it too: each line twice"),
    Patch("quiet_ray_preemption_watcher_notice", "ray", ">=2.60,<2.61",
          "Ray core logs an error-level notice for Ray Train's PreemptionWatcher actor in every run"),
    Patch("quiet_library_notices", "deepspeed", ">=0.19,<0.20",
          "DeepSpeed warns at import, in every CPU process, that it set its accelerator to CPU"),
    Patch("datasets_from_cache", "datasets", ">=5.0,<6",
          "load_dataset fetches a hub dataset's card (through huggingface_hub's retries) before it falls back on the "
          "datasets cache, unless datasets.config.HF_HUB_OFFLINE, which it reads at each call"),
    Patch("bnb_state_as_adam", "bitsandbytes", ">=0.48,<0.51",
          "bitsandbytes' Adam keeps its moments as state1/state2 (8-bit: blocks of 256 scaled by absmax1/2 through "
          "qmap1/2), under a wrapper key in its state_dict; DeepSpeed's universal checkpoint reads exp_avg/exp_avg_sq"),
    Patch("bnb_state_from_adam", "bitsandbytes", ">=0.48,<0.51",
          "the inverse: Optimizer2State.init_state lays out a parameter's state, quantize_blockwise fills it"),
)


def _out_of_range() -> list[str]:
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
    except ImportError:  # a Python without ftcluster's dependencies: the trainer says so itself
        return []
    out = []
    for p in PATCHES:
        try:
            installed = importlib.metadata.version(p.package)
        except importlib.metadata.PackageNotFoundError:
            continue
        if Version(installed).release and Version(installed) not in SpecifierSet(p.versions, prereleases=True):
            out.append(f"{p.package} {installed} is outside {p.versions}, the versions ftcluster's patch {p.name} "
                       f"was written for ({p.why}); check it still holds (tests/unit/test_patches.py)")
    return out


for _message in _out_of_range():
    warnings.warn(_message, RuntimeWarning, stacklevel=2)


class _OnImport:
    """A meta path finder that hands a module to its patch as soon as the module has run, whoever imports it."""

    def __init__(self, patches: dict):
        self.patches = patches

    def find_spec(self, name, path=None, target=None):
        patch = self.patches.get(name)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        run = spec.loader.exec_module  # the loader is this module's own

        def run_then_patch(module):
            run(module)
            patch(module)

        spec.loader.exec_module = run_then_patch
        return spec


def on_import() -> None:
    """The patches that must hold wherever their module is used (a worker, a test building one part, a notebook),
    applied as the module is imported, or now where it already is. Importing ftcluster installs them; the libraries
    are not imported for it."""
    patches = {"torch.utils.cpp_extension": torch_extension_locks_with_owner,
               "deepspeed.comm.torch": deepspeed_without_shm_op}
    if not any(isinstance(f, _OnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _OnImport(patches))
    for name, patch in patches.items():
        if name in sys.modules:
            patch(sys.modules[name])


# ---------------------------------------------------------------------------------------------------------------
# Ray

def ray_worker_preempted() -> bool:
    """Whether Ray Train's preemption watcher has marked this worker (its node is draining). The public
    ``ray.train.get_preemption_info()`` answers the same question but through a Ray collective on each call, too
    slow for every step; this reads the worker's own mark, which that function reads too
    (train/v2/_internal/execution/train_fn_utils.py)."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context.preemption_info is not None
    except Exception:  # noqa: BLE001 - outside Ray Train, or another Ray: no preemption signal, not an error
        return False


def quiet_ray_train_reports(level: str) -> None:
    """Ray Train logs an INFO line with the whole metrics dict at every ``ray.train.report``, beside our own
    progress line. ``RunConfig(logging_config=...)`` does not reach it: its filter matches loggers named
    ``ray.train*``, and this one is named by its file's path (``logging.getLogger(__file__)`` in
    ray/train/v2/_internal/execution/context.py)."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray, another layout: its lines show, training goes on
        return
    logging.getLogger(context.__file__).setLevel(level)


def start_local_ray_cluster(port: int, **init_kwargs) -> None:
    """``ray.init`` of a new local cluster whose dashboard (which serves the state API) listens on ``port``, its
    processes started with RAY_API_SERVER_ADDRESS naming it.

    Ray Train's placement-group cleaner asks the state API whether the run's controller is alive, and the state API
    finds its cluster by RAY_ADDRESS or else by the record `ray start` leaves on the host (ray-project/ray#65447). A
    record of a dead cluster made every run end late, with a traceback ("Failed to stop PlacementGroupCleaner
    gracefully"); a record of another live cluster would answer that the controller does not exist, and the cleaner
    would remove the run's placement group. The cluster's processes inherit the driver's environment when
    ``ray.init`` starts them; the driver's own is restored after."""
    import ray

    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    try:
        ray.init(address="local", dashboard_port=port, log_to_driver=True, **init_kwargs)
    finally:
        if saved is None:
            del os.environ["RAY_API_SERVER_ADDRESS"]
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


def torch_trainer(run_dir: str, elastic: bool, **trainer_kwargs):
    """A ``TorchTrainer`` whose controller (Ray 2.60's Train V2; ``_initialize_and_run_controller`` and its
    ``failure_policy`` and ``scaling_policy`` arguments, ``DefaultFailurePolicy._is_retryable_error``):

    - restarts no worker group after an error a restart would only repeat (``stop.deterministic``: a config, data or
      code error), nor after a stop was asked for (``stop.requested``), whatever ``ray.max_failures`` says: with
      ``max_failures=-1`` such a run restarted forever, and SIGTERM could not end it;
    - for an elastic run (``ScalingConfig(num_workers=(min, max))``), grows the worker group only at a checkpoint.
      Ray Train's ``ElasticScalingPolicy`` restarts a group on fewer workers after a lost node, from the latest
      checkpoint, as wanted; but when room for more workers returns it restarts the running group at once, and
      every step since the last checkpoint is done again. Here a grow decision is held back: the policy asks the
      workers for a checkpoint (``stop.request_resize``), they save and wait (``worker.await_resize``), and the
      decision goes to the controller once they have answered;
    - sizes an elastic group by the nodes alive now, not by a reservation that may still hold a lost node.

    Ray's classes are subclassed inside this function, so this module imports no Ray; cloudpickle takes them to the
    controller's process."""
    import ray
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
    from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy, NoopDecision, ResizeDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from ftcluster import stop

    class NoPointlessRestart(DefaultFailurePolicy):
        def __init__(self, failure_config, run_dir: str):
            super().__init__(failure_config)
            self.run_dir = run_dir

        def _is_retryable_error(self, training_failed_error) -> bool:
            if stop.requested(self.run_dir):
                return False
            if isinstance(training_failed_error, WorkerGroupError) and training_failed_error.worker_failures and all(
                    stop.deterministic(f"{type(e).__name__}: {e}")
                    for e in training_failed_error.worker_failures.values()):
                return False
            return super()._is_retryable_error(training_failed_error)

    class CheckpointedResize(ElasticScalingPolicy):
        def __init__(self, scaling_config, run_dir: str):
            super().__init__(scaling_config)
            self.run_dir, self.waiting, self.polls_after = run_dir, None, 0

        def _count_possible_workers(self, reserved_resources) -> int:
            # Ray Data's autoscaling coordinator, which reserves the nodes, looks at the cluster again only every
            # 20 s: a node lost since still counts there, so the restart after a loss asked for the old worker count
            # and waited out the worker group's start timeout (60 s) before Ray Train tried again with fewer. Only
            # nodes alive now are counted (the reservation is keyed by node ID, as ray.nodes() names them).
            alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
            return super()._count_possible_workers({k: v for k, v in reserved_resources.items() if k in alive})

        def make_decision_for_non_running_worker_group(self):
            if self.waiting is not None:  # the group ended before it saved: that attempt's request is void
                self.waiting = None
                stop.resized(self.run_dir)
            return super().make_decision_for_non_running_worker_group()

        def make_decision_for_running_worker_group(self, worker_group_state, worker_group_status):
            if self.waiting is not None:
                if stop.resize_pending(self.run_dir):
                    return NoopDecision()
                # Answered. The report of the step that saved was queued before the answer, and the controller
                # reads a worker's reports one per poll: one more poll first, so that it reaches metrics.jsonl.
                self.polls_after += 1
                if self.polls_after < 2:
                    return NoopDecision()
                decision, self.waiting = self.waiting, None
                return decision
            decision = super().make_decision_for_running_worker_group(worker_group_state, worker_group_status)
            if isinstance(decision, ResizeDecision) and decision.num_workers > worker_group_state.num_workers:
                stop.request_resize(self.run_dir, decision.num_workers)
                self.waiting, self.polls_after = decision, 0
                return NoopDecision()
            return decision

    class Trainer(TorchTrainer):
        def _initialize_and_run_controller(self, **controller_init_kwargs):
            controller_init_kwargs["failure_policy"] = NoPointlessRestart(self.run_config.failure_config, run_dir)
            if elastic:
                controller_init_kwargs["scaling_policy"] = CheckpointedResize(self.scaling_config, run_dir)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    return Trainer(**trainer_kwargs)


def ray_train_plain_print() -> None:
    """``print`` as Python's own in a Ray Train worker. Ray Train replaces it with one that logs each line through
    the root logger and, where stdout is Ray's redirect (always, in a worker), also prints it: every line the
    worker printed reached the driver twice. ``RAY_TRAIN_ENABLE_PRINT_PATCH=0`` would do the same, but must be in
    the worker's environment before it starts."""
    import builtins

    from ray.train.v2._internal.logging import patch_print

    builtins.print = patch_print._original_print


_RAY_NOTICE = "has constructor arguments in the object store"


RAY_TRAIN_ERROR = "Error in training function:"


def ray_train_error_to_file(run_dir, rank: int) -> None:
    """On a Ray Train worker: the traceback Ray Train logs when the training function raises goes to this rank's
    file (``worker_errors.keep``); the record, which Ray streams to the driver's terminal, keeps its last line (the
    error) and the file's name. Where the file cannot be written, the record is left whole."""
    from ftcluster import worker_errors

    class ToFile(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            text = record.getMessage()
            if text.startswith(RAY_TRAIN_ERROR):
                traceback_text = text[len(RAY_TRAIN_ERROR):].strip()
                path = worker_errors.keep(run_dir, rank, traceback_text)
                if path is not None:
                    last = traceback_text.splitlines()[-1] if traceback_text else ""
                    record.msg, record.args = f"{RAY_TRAIN_ERROR} {last} (traceback: {path})", ()
            return True

    logger = logging.getLogger("ray.train.v2._internal.util")
    for f in [f for f in logger.filters if type(f).__name__ == "ToFile"]:
        logger.removeFilter(f)  # one per process: a restarted worker group may reuse it
    logger.addFilter(ToFile())


def quiet_ray_preemption_watcher_notice() -> None:
    """Drop, from the worker logs the driver prints, Ray core's error-level notice that Ray Train's own
    PreemptionWatcher actor "has constructor arguments in the object store and max_restarts > 0": printed by every
    run on Ray, about Ray Train's internals, and nothing for the user to act on. After ``ray.init``, which registers
    the printing handler (``ray_print_logs``) with the log dispatcher."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    def filtered(handler):
        def handle(data):
            lines = [line for line in data.get("lines", []) if _RAY_NOTICE not in line]
            if lines:
                handler({**data, "lines": lines})

        handle.ftcluster_filtered = True
        return handle

    with dispatcher._lock:
        dispatcher.handlers = [(name, filtered(h) if name == "ray_print_logs" and not getattr(
            h, "ftcluster_filtered", False) else h) for name, h in dispatcher.handlers]


def quiet_library_notices() -> None:
    """In a training process: no deprecation warnings from the libraries (theirs to fix, nothing the user can act
    on); not DeepSpeed's notice, at import in every CPU process, that it chose the CPU accelerator, nor its warning
    that ZeRO runs an untested optimizer (bitsandbytes' optimizers, which deepspeed_setup allows on purpose); and
    not transformers' deprecation log line for ``config.use_return_dict``, which Liger's causal-LM forward reads."""
    for module in (r"transformers\.", r"torch\.", r"deepspeed\.", r"peft\.", r"bitsandbytes\.", r"ray\."):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    _drop("DeepSpeed", "Setting accelerator to CPU")
    _drop("DeepSpeed", "You are using ZeRO with an untested optimizer")
    _drop("transformers.configuration_utils", "`use_return_dict` is deprecated")


# ---------------------------------------------------------------------------------------------------------------
# torch

def is_compiled(module) -> bool:
    """Whether ``module.compile()`` made ``module`` call a compiled graph."""
    return getattr(module, "_compiled_call_impl", None) is not None


def attention_of(config) -> str:
    """The attention implementation a built transformers model runs."""
    return config._attn_implementation


def sdpa_backend(query, key, value, **kwargs):
    """The kernel (``torch.nn.attention.SDPBackend``) that ``scaled_dot_product_attention`` would run for these
    tensors and keywords: their device, dtype, shapes and whether they require grad decide it."""
    import torch
    from torch.nn.attention import SDPBackend

    return SDPBackend(torch._fused_sdp_choice(query, key, value, **kwargs))


def expandable_segments_now() -> None:
    """Expandable segments for a CUDA caching allocator that may already be running (Ray set the device up):
    PYTORCH_CUDA_ALLOC_CONF is read only when the allocator starts."""
    import torch

    # torch 2.11 warns (FutureWarning, to the user) that torch.cuda.memory._set_allocator_settings is deprecated for
    # this accelerator-wide setter, which it then calls.
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    setter("expandable_segments:True")


LOCK_NOTICE_AFTER_S = 60.0
"""How long a JIT build waits on another process's lock before saying which lock, whose, and how to clear it."""


def torch_extension_locks_with_owner(ext=None) -> None:
    """torch's JIT builds of C++ ops (DeepSpeed's CPU Adam under optimizer offload, among others) hold a lock *file*
    in the op's build directory, which a process killed while holding it (Slurm's preemption, the OOM killer, a
    SIGKILL after a grace period) leaves behind: every later build of that op, on every node that shares the
    directory, then waits on it forever, printing nothing (pytorch/pytorch#189245). Here the lock names its holder
    (host, PID and the PID's start time): a process on the holder's host takes over a lock whose holder is gone
    and builds the op itself, whether the lock was there when it came or its holder died while it waited; a
    process elsewhere cannot tell, and says after ``LOCK_NOTICE_AFTER_S`` which lock it waits on, whose it is and
    how to clear it. ``ext``: ``torch.utils.cpp_extension``, as it finishes importing (``on_import``)."""
    if ext is None:
        import torch.utils.cpp_extension as ext

    if getattr(ext.FileBaton, "names_its_holder", False):
        return
    ext.FileBaton = _baton_naming_its_holder(ext.FileBaton)
    build = ext._jit_compile

    @functools.wraps(build)
    def build_again_if_the_holder_died(*args, **kwargs):
        try:
            return build(*args, **kwargs)
        except _HolderGone:
            # Its lock is this process's now: build the op. torch builds only an op whose sources changed since
            # this process last asked for it, which the first call recorded.
            ext.JIT_EXTENSION_VERSIONER.entries.pop(kwargs.get("name", args[0] if args else None), None)
            return build(*args, **kwargs)

    ext._jit_compile = build_again_if_the_holder_died


class _HolderGone(Exception):
    pass


def _holder_line() -> str:
    return f"{_this_host()} {os.getpid()} {_started(os.getpid())}\n"


def _this_host() -> str:
    """The host name, and the PID namespace where there is one: containers sharing a host name do not share PIDs."""
    import socket

    try:
        namespace = os.readlink("/proc/self/ns/pid").removeprefix("pid:")
    except OSError:
        namespace = ""
    return socket.gethostname() + namespace


def _started(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), which a reused PID does not share; "-" elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "-"


def _holder_gone(line: str) -> bool:
    """Whether the lock's holder, as its line names it, was a process on this host that no longer runs."""
    parts = line.split()
    if len(parts) != 3 or parts[0] != _this_host() or not parts[1].isdigit():
        return False  # another host's, or a lock taken without ftcluster: it cannot be judged from here
    pid, started = int(parts[1]), parts[2]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # another user's live process
    return started != "-" and _started(pid) not in (started, "-")  # the PID now another process's


def _baton_naming_its_holder(FileBaton):
    import fcntl
    import time

    class BatonNamingItsHolder(FileBaton):
        names_its_holder = True

        def _take_over_if_holder_gone(self) -> bool:
            """Make the lock this process's if its holder died. The lock file stays in place throughout, so the other
            waiters go on waiting, now on this process; they check one at a time (a kernel lock on a file beside
            it, released if one dies), so only one takes it over."""
            if not _holder_gone(self._holder()):
                return False  # the common case, a holder at work, seen without the guard
            with open(self.lock_file_path + ".check", "a") as guard:
                fcntl.flock(guard, fcntl.LOCK_EX)
                line = self._holder()
                if not _holder_gone(line):
                    return False  # released, or already taken over by another waiter
                with open(self.lock_file_path, "w") as f:
                    f.write(_holder_line())
            print(f"ftcluster: took over {self.lock_file_path}, left by a build whose process ({line.split()[1]}) "
                  "died holding it; building the op here", file=sys.stderr, flush=True)
            return True

        def _holder(self) -> str:
            try:
                with open(self.lock_file_path) as f:
                    return f.read()
            except FileNotFoundError:
                return ""

        def _ours(self) -> bool:
            return self._holder() == _holder_line()

        def try_acquire(self) -> bool:
            if self._ours() or self._take_over_if_holder_gone():
                return True  # release() removes the file; it has no descriptor of ours to close
            if not super().try_acquire():
                return False
            with open(self.lock_file_path, "w") as f:  # torch's own descriptor is read-only
                f.write(_holder_line())
            return True

        def wait(self) -> None:
            start = time.monotonic()
            told = False
            while os.path.exists(self.lock_file_path):
                if self._take_over_if_holder_gone():
                    raise _HolderGone(self.lock_file_path)
                time.sleep(self.wait_seconds)
                if not told and time.monotonic() - start > LOCK_NOTICE_AFTER_S:
                    told = True
                    holder = self._holder().split()
                    whose = (f"PID {holder[1]} on {holder[0].split('[')[0]}" if len(holder) == 3
                             else "a process that did not name itself")
                    print(f"ftcluster: waiting on {self.lock_file_path}, held by {whose} building the op; if no "
                          "such build is running (its job was killed), delete that file and start this run again",
                          file=sys.stderr, flush=True)

    return BatonNamingItsHolder


def cache_custom_autograd_functions() -> None:
    """Let AOTAutograd's cache keep a graph that holds a custom ``autograd.Function`` (QLoRA's 4-bit matmul,
    ftcluster.linear4bit): otherwise every start traces and partitions the QLoRA layer again. PyTorch checked that
    such an op is pure in its inputs and keeps it behind this flag while it tests it (pytorch/pytorch#149751); the
    graph, the function's forward and backward traced into it, is the key."""
    import torch._functorch.config

    torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True


# ---------------------------------------------------------------------------------------------------------------
# transformers, Liger Kernel, bitsandbytes

def init_module_weights(model, module) -> None:
    """Initialise one module's parameters as the model's ``from_config`` would (``_init_weights``): for a model
    built one module at a time."""
    model._init_weights(module)


_LIGER_REPLACED: dict[str, dict[str, object]] = {}
"""transformers' own objects that a Liger apply function replaced in a modeling module, by module name."""


def liger_apply_to_instance(model, apply_name: str | None, kinds: dict) -> None:
    """Liger's ``apply_name`` (e.g. ``apply_liger_kernel_to_llama``) with ``kinds``, for this model instance only;
    with ``apply_name`` None, only undo what an earlier model's call left behind.

    Liger's apply functions patch the instance and also replace names in transformers' modeling module: its norm
    and MLP classes (so every model built later in the process is built from Liger's modules, whatever its own
    plan: a compiled layer then traced Liger's autograd functions, which a selective checkpoint cannot) and its
    RoPE function (looked up at every call; no instance holds it). Here a model gets its own kernels only: the
    classes go back as soon as the instance is patched, and a RoPE function an earlier model's call put in place
    goes back before this one's kernels are applied."""
    import sys

    module = sys.modules[type(model).__module__]
    for name, own in _LIGER_REPLACED.get(module.__name__, {}).items():
        setattr(module, name, own)
    if apply_name is None:
        return
    import liger_kernel.transformers as liger

    before = dict(vars(module))
    getattr(liger, apply_name)(model=model, **kinds)
    for name, own in before.items():
        if vars(module).get(name) is not own:
            _LIGER_REPLACED.setdefault(module.__name__, {})[name] = own
            if isinstance(own, type):
                setattr(module, name, own)


def liger_fused_loss_chunks(model, scale: int) -> None:
    """Liger's fused linear + cross-entropy in chunks ``scale`` times its default size. Liger's causal-LM forward
    hands its keyword arguments on to its loss, which takes those of ``liger_fused_linear_cross_entropy``
    (``LigerForCausalLMLoss``, ``chunk_mem_const``); the decoder's layers ignore the extra one."""
    import functools

    model.forward = functools.partial(model.forward, chunk_mem_const=scale)


def liger_fused_loss_in_eval(model) -> None:
    """Liger's fused linear + cross-entropy in evaluation too. Its causal-LM forward fuses the loss only where
    ``skip_logits`` is set or the model is in training mode; evaluating with labels it computes all the logits
    first (86 GiB in bfloat16 for a 360k-token row and a 128k vocabulary). With labels it is now asked to skip
    them: the output's loss is the same, and its logits are None. The wrapper is ``functools.wraps``' of Liger's
    forward (``__wrapped__``), so the built model still shows whose loss it computes (built.observe)."""
    forward = model.forward

    @functools.wraps(forward)
    def fused(*args, **kwargs):
        if kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None:
            kwargs.setdefault("skip_logits", True)
        return forward(*args, **kwargs)

    model.forward = fused


class _DropNotice(logging.Filter):
    """Drops the records whose message holds ``text``."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _drop(logger_name: str, text: str) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropNotice) and f.text == text for f in logger.filters):
        logger.addFilter(_DropNotice(text))


def quiet_bitsandbytes_cpu_notice() -> None:
    """bitsandbytes' CPU backend warns, once a process, that it "Failed to load CPU gemm_4bit_forward from
    kernels-community" when the optional ``kernels`` package is not installed, and falls back to its own kernel:
    nothing for the user to do, so nothing to show."""
    _drop("bitsandbytes.backends.cpu.ops", "pip install kernels")


def quiet_liger_backend_discovery() -> None:
    """Liger's backend registry warns "Backend impl ... could not be imported" for each optional implementation
    of an op that does not import here (another vendor's, another Triton's) and uses one that does: nothing for the
    user to do. ``liger_kernel.backends.registry.get_discovery_failures()`` still lists them."""
    _drop("liger_kernel.backends.registry", "could not be imported")


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed

class _NoMlflowForDeepSpeedsAutotuner:
    """A meta path finder that refuses ``import mlflow`` to DeepSpeed's autotuner module alone."""

    def find_spec(self, name, path=None, target=None):
        if name == "mlflow":
            frame = sys._getframe(1)
            while frame is not None:
                if frame.f_globals.get("__name__") == "deepspeed.autotuning.autotuner":
                    raise ImportError("ftcluster.patches: DeepSpeed's autotuner runs without mlflow")
                frame = frame.f_back
        return None


def deepspeed_autotuner_without_mlflow() -> None:
    """``import deepspeed`` imports its autotuner, which imports mlflow where it is installed (the ``tracking``
    extra), in every process's start, for autotuning experiments that ftcluster never runs.
    The autotuner falls back on the ImportError this finder gives it; every other import of mlflow (ftcluster's
    own ``tracking.mlflow``) goes on as usual, before or after."""
    if not any(isinstance(f, _NoMlflowForDeepSpeedsAutotuner) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoMlflowForDeepSpeedsAutotuner())


def deepspeed_without_shm_op(backend=None) -> None:
    """On CPUs, DeepSpeed's torch backend JIT-builds its shared-memory all-reduce op when it joins the process group,
    for ``inference_all_reduce`` alone, which training never calls: a C++ build at the first start on a host, and
    the ninja check and the build directory's lock at every later one. Training runs without it, as on GPUs (where
    DeepSpeed has no such op); so would DeepSpeed's CPU inference in a process that imported ftcluster, through
    torch's all-reduce. ``backend``: ``deepspeed.comm.torch``, as it finishes importing (``on_import``)."""
    if backend is None:
        import importlib

        # By its module's name: ``deepspeed.comm.torch`` as an attribute is the torch library, which the package
        # imports.
        backend = importlib.import_module("deepspeed.comm.torch")
    backend.build_shm_op = lambda: None


@contextlib.contextmanager
def datasets_from_cache():
    """datasets' offline mode for the calls inside: a hub dataset is read from the datasets cache at once. Online,
    ``load_dataset`` first fetches the dataset's card through huggingface_hub's retries (half a minute and more
    where the hub takes no connection), and only then falls back on the cache. Its two notices of the fallback
    (one says offline mode is enabled, which the user did not do) are left to the caller to say."""
    import datasets.config

    before = datasets.config.HF_HUB_OFFLINE
    notices = [logging.getLogger(n) for n in ("datasets.load", "datasets.packaged_modules.cache.cache")]
    levels = [n.level for n in notices]
    datasets.config.HF_HUB_OFFLINE = True
    for n in notices:
        n.setLevel(logging.ERROR)
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before
        for n, level in zip(notices, levels):
            n.setLevel(level)


def deepspeed_nvtx(enabled: bool) -> None:
    """DeepSpeed's NVTX ranges on or off: a module switch, the one DeepSpeed's own ``engine.compile()`` turns off.
    Off, ZeRO-3 stops opening and closing a range around every gather, wait and release of every parameter."""
    import deepspeed.utils.nvtx

    deepspeed.utils.nvtx.enable_nvtx = enabled


@functools.cache
def tiled_mlp_function():
    """DeepSpeed's ``TiledMLP`` with a forward that writes each slice's output into the row's output as it is made.
    DeepSpeed's own joins a list of the slices' outputs (torch.cat), so the row's MLP output is held twice at once:
    2.75 GiB more for a 360k-token row of a 4096-wide model, at the moment a recomputed layer holds the most. Its
    backward, kept as it is, recomputes each slice from what this forward leaves on ``ctx``."""
    import torch
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    class TiledMLPWrittenInPlace(TiledMLP):
        @staticmethod
        def forward(ctx, fn, self, x, shards, compute_params):
            ctx.fn, ctx.self, ctx.shards = fn, self, shards
            ctx.compute_params = [p for p in compute_params if p.requires_grad]
            ctx.save_for_backward(x)
            out, at = None, 0
            with torch.no_grad():
                for part in torch.chunk(x, chunks=shards, dim=-2):
                    y = fn(self, part)
                    if out is None:
                        out = y.new_empty((*x.shape[:-2], x.shape[-2], y.shape[-1]))
                    out.narrow(-2, at, part.shape[-2]).copy_(y)
                    at += part.shape[-2]
            return out

    return TiledMLPWrittenInPlace


def checkpoints_without_tied_frozen_weights(engine) -> None:
    """Have ``engine.save_checkpoint(..., exclude_frozen_parameters=True)`` leave out every frozen parameter,
    a tied one too. DeepSpeed drops the frozen entries of the module's state dict by ``named_parameters()``, which
    lists a tied parameter once, under its first name: a LoRA checkpoint of a model with tied embeddings held the
    whole frozen output layer (its vocabulary x hidden weight) under ``lm_head.weight``."""
    original = engine.module_state_dict

    def module_state_dict(*args, exclude_frozen_parameters=False, **kwargs):
        state = original(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters:
            for name, p in engine.module.named_parameters(remove_duplicate=False):
                if not p.requires_grad:
                    state.pop(name, None)
        return state

    engine.module_state_dict = module_state_dict


def zero3_full_state_dict(engine) -> dict | None:
    """The 16-bit model's state dict gathered from ZeRO-3's partitions, a module at a time (on rank 0; None on the
    others)."""
    return engine._zero3_consolidated_16bit_state_dict()


# ---------------------------------------------------------------------------------------------------------------
# bitsandbytes optimizer state through DeepSpeed's universal checkpoint

_BNB_BLOCK = 256  # the block of bitsandbytes' blockwise 8-bit optimizer states (Optimizer2State.init_state)


def bnb_state_as_adam(state: dict) -> dict:
    """One flat parameter's bitsandbytes Adam state, as its ``state_dict`` saves it, in torch AdamW's terms:
    float32 ``exp_avg`` and ``exp_avg_sq`` (dequantized from 8-bit blocks, or the 32-bit ones as they are) beside
    ``step``, which is what DeepSpeed's universal checkpoint converter cuts into each parameter's state. A state
    already in those terms is returned as it is."""
    import torch

    from bitsandbytes import functional as F
    from bitsandbytes.optim.optimizer import Optimizer8bit

    quant = {**state.get(Optimizer8bit._FSDP_WRAPPED_QUANT_STATE_KEY, {}),
             **{k: v for k, v in state.items() if k.startswith(("state", "absmax", "qmap"))}}
    if "state1" not in quant:
        return state
    out = {k: v for k, v in state.items() if k == "step"}
    for moment, i in (("exp_avg", 1), ("exp_avg_sq", 2)):
        q = quant[f"state{i}"]
        out[moment] = (q.float() if q.dtype != torch.uint8 else
                       F.dequantize_blockwise(q, absmax=quant[f"absmax{i}"], code=quant[f"qmap{i}"],
                                              blocksize=_BNB_BLOCK).float())
    return out


def bnb_state_from_adam(optimizer) -> None:
    """The inverse of :func:`bnb_state_as_adam` on a live bitsandbytes optimizer, after DeepSpeed loaded a
    universal checkpoint into it as AdamW moments: each parameter's state is laid out anew by the optimizer itself
    (8-bit blocks of this run's partition, or 32-bit for a small one) and the moments quantized into it."""
    import torch

    from bitsandbytes import functional as F

    for gindex, group in enumerate(optimizer.param_groups):
        for pindex, p in enumerate(group["params"]):
            state = optimizer.state.get(p)
            if not state or "exp_avg" not in state:
                continue
            moments, step = (state.pop("exp_avg"), state.pop("exp_avg_sq")), state.get("step", 0)
            state.clear()
            optimizer.init_state(group, p, gindex, pindex)
            state = optimizer.state[p]
            state["step"] = int(step.item() if torch.is_tensor(step) else step)
            for i, moment in enumerate(moments, start=1):
                target = state[f"state{i}"]
                if target.dtype == torch.uint8:
                    F.quantize_blockwise(moment.to(p.device, torch.float32).contiguous(), code=state[f"qmap{i}"],
                                         absmax=state[f"absmax{i}"], out=target, blocksize=_BNB_BLOCK)
                else:
                    target.copy_(moment)
