"""The run's progress log as Ray Train's callback, for runs on Ray. A module of its own: a local-mode run, which
runs without Ray, never imports Ray Train (1.0-1.3 s of a start on an H100 host, with the pandas and Ray Data it
imports; reports/ttfs/2026-11-28-1xh100-collector.md)."""

from __future__ import annotations

from ray.train import UserCallback

from ftcluster.launch import ProgressLog


class RayProgressLog(ProgressLog, UserCallback):
    """:class:`ProgressLog`, called by Ray Train's controller on every report, in its process on the head node
    (where the run directory is)."""

    def after_report(self, run_context, metrics, checkpoint):
        self.log(metrics, checkpoint.path if checkpoint is not None else None)
