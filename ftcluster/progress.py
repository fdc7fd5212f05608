"""The driver's view of a running run: every report of the workers becomes one line of metrics.jsonl and one
printed progress line. The same for both backends: the in-process worker calls it directly, Ray Train's controller
through ``ray_progress.RayProgressLog``."""

from __future__ import annotations

from pathlib import Path

from ftcluster import records


class ProgressLog:
    """On every report: append the workers' records as one line of metrics.jsonl and print its progress line. On
    Ray it runs in Ray Train's controller, a process of its own: what it leaves is the file."""

    def __init__(self, run_dir: str | Path, started_unix: float):
        self.run_dir, self.started_unix, self.first_step_said = Path(run_dir), started_unix, False
        self.last_step: int | None = None
        """The step of metrics.jsonl's last line: read once (an earlier attempt's), then kept."""

    def log(self, metrics: list[dict]) -> None:
        """``metrics``: each worker's ``WorkerRecord`` as JSON, for one step."""
        line = records.Line.of_workers([records.WorkerRecord.from_json(m) for m in metrics])
        if self.last_step is None:
            self.last_step = max((earlier.step for earlier in records.read_lines(self.run_dir)), default=0)
        records.append_line(self.run_dir, line, self.last_step)
        self.last_step = line.step
        if line.first_step_unix and line.first_step_unix >= self.started_unix and not self.first_step_said:
            print(f"first step: done {line.first_step_unix - self.started_unix:.1f} s after the command started "
                  "(summary.json splits it by phase)", flush=True)
            self.first_step_said = True
        print(records.progress_line(line), flush=True)
