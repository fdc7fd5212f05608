"""Stopping a run early without losing it: the driver asks, every worker agrees at the same step, the run saves
a checkpoint and ends resumable.

Two things ask:

* the driver, on SIGTERM or SIGINT (``sbatch``'s ``--signal``, ``scancel``, ``ray job stop``, Ctrl-C), by writing
  ``<run_dir>/STOP``. The run directory is on storage every node sees (Ray Train needs that for checkpoints), and
  only rank 0 reads it;
* Ray, when a node that holds a worker is draining: a cloud reclaiming a spot node, or ``ray start`` given SIGTERM
  (it drains its node for ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S`` first). Ray Train's preemption watcher marks
  the workers on that node; every worker reads its own mark.

A third thing asks for a checkpoint without ending the run: Ray Train, when an elastic run (scaling.min_workers)
can grow back to more workers. Its scaling policy (patches.torch_trainer) writes ``<run_dir>/RESIZE``; the
workers save, rank 0 removes the file, and they wait for Ray Train to restart them on more workers from that
checkpoint, so no step is done twice.

Every optimizer step the workers all-reduce one flag, so they stop at the same step whoever asked. The reduction
is not waited for: each step reads the previous step's, so the host never waits for the GPU to finish a step to
decide (a blocking all-reduce and ``.item()`` every step made a 7B LoRA step on several GPUs wait for the GPU
before launching the next one), and a request is obeyed one step later, by every worker at the same step.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

STOP_FILE = "STOP"
TIMED = "checkpoint due"
"""The reason a check returns when training.save_every_minutes has passed since the last checkpoint: save, go on."""
RESIZE_FILE = "RESIZE"
RESIZE = "resize"
"""A record's ``stopped`` when the workers saved for Ray Train to restart them on more workers."""
EXIT_STOPPED = 75
"""The driver's exit code for a run that stopped early with a checkpoint (EX_TEMPFAIL: run it again to resume)."""
EXIT_DIVERGED = 3
"""The driver's exit code for a run stopped because training diverged: its last good checkpoint is kept and no
final model is written; running it again unchanged would diverge again."""
DIVERGED = "diverged"
"""How a record's ``stopped`` reason starts when the divergence guard stopped the run."""
DETERMINISTIC = ("ConfigError", "ValueError", "KeyError", "TypeError", "AttributeError", "AssertionError",
                 "NotImplementedError", "IndexError", "ModuleNotFoundError", "ImportError", "SafetensorError")
"""Worker errors that the same data, config and code raise again: a restart would fail the same way."""


DISK_FULL = "No space left on"
"""How a full disk's error reads (ENOSPC's text, and ftcluster.checkpoint's own): a restart would fill it again."""


def deterministic(error: str) -> bool:
    """Whether a worker's error (its text, traceback included) is one a restart would only repeat."""
    return any(f"{name}:" in error for name in DETERMINISTIC) or DISK_FULL in error


def requested(run_dir: Path) -> bool:
    """Whether a stop was asked for (a signal to the driver, ``ray job stop``): no restart then."""
    return (Path(run_dir) / STOP_FILE).exists()


def requested_by(run_dir: Path) -> str | None:
    """What asked for the stop (``SIGTERM``, ...), or None when none was asked for."""
    try:
        return (Path(run_dir) / STOP_FILE).read_text().strip() or "a stop request"
    except FileNotFoundError:
        return None


def request(run_dir: Path, reason: str) -> None:
    (Path(run_dir) / STOP_FILE).write_text(reason + "\n")


def clear(run_dir: Path) -> None:
    """A new attempt must not obey the request that stopped the previous one."""
    (Path(run_dir) / STOP_FILE).unlink(missing_ok=True)
    resized(run_dir)


def request_resize(run_dir: Path, workers: int) -> None:
    (Path(run_dir) / RESIZE_FILE).write_text(f"{workers}\n")


def resize_pending(run_dir: Path) -> bool:
    return (Path(run_dir) / RESIZE_FILE).exists()


def resized(run_dir: Path) -> None:
    """The workers saved the checkpoint a resize asked for (or a new attempt starts): the request is answered."""
    (Path(run_dir) / RESIZE_FILE).unlink(missing_ok=True)


def on_signals(run_dir: Path) -> None:
    """In the driver: the first SIGTERM or SIGINT asks the workers to checkpoint and stop; the driver then waits
    for them. A second SIGINT interrupts as usual."""
    def handler(signum, frame):
        name = signal.Signals(signum).name
        print(f"ftcluster: {name}: asking the workers to save a checkpoint and stop", flush=True)
        request(run_dir, name)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


class StopCheck:
    """Called once per optimizer step on every worker (at the same steps: the flag is a collective); returns the
    reason to stop (or ``TIMED``: a checkpoint is due), the same on every worker."""

    REASONS = ("", TIMED, RESIZE, "stop requested", "node preempted")
    """By flag; the workers agree on the largest: a stop wins over a resize, and both save as a due checkpoint
    would."""

    def __init__(self, run_dir: Path, device, preempted=lambda: False, poll_s: float = 1.0,
                 save_every_s: float = 0.0):
        import torch
        import torch.distributed as dist

        self.path = Path(run_dir) / STOP_FILE
        self.resize_path = Path(run_dir) / RESIZE_FILE
        self.reason: str | None = None
        """The reason the last call returned."""
        self.save_every_s = save_every_s
        self._save_due = time.monotonic() + save_every_s
        self.device = device
        self.preempted = preempted
        self.poll_s = poll_s
        self._next_poll = 0.0
        self._file_seen = False
        self._resize_seen = False
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self._calls = 0
        if self.world > 1:
            # Two of everything: one step's flag is in flight while the previous step's is read.
            pinned = getattr(device, "type", device) == "cuda"
            self._sent = [torch.zeros(1, dtype=torch.int32, pin_memory=pinned) for _ in range(2)]
            self._reduced = [torch.zeros(1, dtype=torch.int32, device=device) for _ in range(2)]
            self._received = [torch.zeros(1, dtype=torch.int32, pin_memory=pinned) for _ in range(2)]
            self._arrived = [None, None]  # CUDA events: the received copy is on the host

    def _local_flag(self) -> int:
        if self.rank == 0 and not self._file_seen and time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self.poll_s  # a stat per second, not per step, on shared storage
            self._file_seen = os.path.exists(self.path)
            self._resize_seen = os.path.exists(self.resize_path)
        if self._file_seen:
            return 3
        if self.preempted():
            return 4
        if self.rank != 0:
            return 0
        if self._resize_seen:
            return 2
        return 1 if self.save_every_s and time.monotonic() >= self._save_due else 0

    def saved(self) -> None:
        """A checkpoint was saved: the next by time is due an interval from now."""
        self._save_due = time.monotonic() + self.save_every_s

    def __call__(self) -> str | None:
        self.reason = self._reason()
        return self.reason

    def _reason(self) -> str | None:
        flag = self._local_flag()
        if self.world == 1:
            return self.REASONS[flag] or None
        import torch
        import torch.distributed as dist

        now, before = self._calls % 2, (self._calls + 1) % 2
        self._calls += 1
        # This buffer's last transfer was two calls ago, and the previous call waited for it.
        self._sent[now][0] = flag
        self._reduced[now].copy_(self._sent[now], non_blocking=True)
        dist.all_reduce(self._reduced[now], op=dist.ReduceOp.MAX)  # NCCL: queued on the GPU, the host goes on
        self._received[now].copy_(self._reduced[now], non_blocking=True)
        if self._reduced[now].is_cuda:
            self._arrived[now] = torch.cuda.Event()
            self._arrived[now].record()
        if self._calls == 1:
            return None  # nothing was reduced before the first step
        if self._arrived[before] is not None:
            self._arrived[before].synchronize()  # the previous step's: long done unless the host is a step ahead
        return self.REASONS[int(self._received[before][0])] or None
