"""The run's progress log as Ray Train's callback, for runs on Ray. A module of its own: an in-process run, which
runs without Ray, never imports Ray Train (with the pandas and Ray Data it imports, a second of every start)."""

from __future__ import annotations

from ray.train import UserCallback

from ftcluster.progress import ProgressLog


class RayProgressLog(UserCallback):
    """Hands every report to a :class:`ProgressLog`. Ray Train's controller calls it, in its process on the head
    node (where the run directory is). The checkpoint a step saved travels in the records: the workers keep their
    checkpoints themselves (ftcluster.checkpoint), as the in-process worker does."""

    def __init__(self, log: ProgressLog):
        self.log = log

    def after_report(self, run_context, metrics, checkpoint):
        self.log.log(metrics)
