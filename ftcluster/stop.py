"""Stopping a run early without losing it: the driver asks, every worker agrees at the same step, the run saves
a checkpoint and ends resumable.

Two things ask:

* the driver, on SIGTERM or SIGINT (``sbatch``'s ``--signal``, ``scancel``, ``ray job stop``, Ctrl-C), by writing
  ``<run_dir>/STOP``. The run directory is on storage every node sees (Ray Train needs that for checkpoints), and
  only rank 0 reads it;
* Ray, when a node that holds a worker is draining: a cloud reclaiming a spot node, or ``ray start`` given SIGTERM
  (it drains its node for ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S`` first). Ray Train's preemption watcher marks
  the workers on that node; every worker reads its own mark.

Every optimizer step the workers all-reduce one flag, so they stop at the same step whoever asked.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

STOP_FILE = "STOP"
EXIT_STOPPED = 75
"""The driver's exit code for a run that stopped early with a checkpoint (EX_TEMPFAIL: run it again to resume)."""
EXIT_DIVERGED = 3
"""The driver's exit code for a run stopped because training diverged: its last good checkpoint is kept and no
final model is written; running it again unchanged would diverge again."""
DIVERGED = "diverged"
"""How a record's ``stopped`` reason starts when the divergence guard stopped the run."""


def request(run_dir: Path, reason: str) -> None:
    (Path(run_dir) / STOP_FILE).write_text(reason + "\n")


def clear(run_dir: Path) -> None:
    """A new attempt must not obey the request that stopped the previous one."""
    (Path(run_dir) / STOP_FILE).unlink(missing_ok=True)


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


def _preempted() -> bool:
    """Whether Ray Train's preemption watcher has marked this worker. The public
    ``ray.train.get_preemption_info()`` answers the same question but through a Ray collective (a round trip
    through the object store, every worker in lockstep) on each call, too slow for every step; this reads the
    worker's own mark, which that function reads too (ray 2.60, train/v2/_internal/execution/train_fn_utils.py)."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context.preemption_info is not None
    except Exception:  # noqa: BLE001 - outside Ray Train, or another Ray: no preemption signal, not an error
        return False


class StopCheck:
    """Called once per optimizer step on every worker; returns the reason to stop, the same on every worker."""

    REASONS = ("", "stop requested", "node preempted")

    def __init__(self, run_dir: Path, device, poll_s: float = 1.0):
        import torch

        self.path = Path(run_dir) / STOP_FILE
        self.device = device
        self.poll_s = poll_s
        self._next_poll = 0.0
        self._file_seen = False
        self.rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    def __call__(self) -> str | None:
        import torch

        flag = 0
        if self.rank == 0 and not self._file_seen and time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self.poll_s  # a stat per second, not per step, on shared storage
            self._file_seen = os.path.exists(self.path)
        if self._file_seen:
            flag = 1
        elif _preempted():
            flag = 2
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            t = torch.tensor([flag], dtype=torch.int32, device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = int(t.item())
        return self.REASONS[flag] or None
