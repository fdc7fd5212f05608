"""What a run records, as types: where training is (``Progress``), what each worker reports (``WorkerRecord``), one
line of ``metrics.jsonl`` (``Line``: rank 0's record with every worker's figures beside it) and ``summary.json``
(``Summary``). The files are their JSON; everything that writes or reads them goes through here, and the progress
line is a rendering of a ``Line``. A new metric is one field."""

from __future__ import annotations

import enum
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class Progress:
    """Where training is: enough to resume exactly (with the data order, which is a function of seed and epoch),
    on any number of workers."""
    step: int = 0
    epoch: int = 0
    rows_in_epoch: int = 0
    """Rows of the epoch's order already trained on, by all workers together (data.packing.ShardedBatches)."""
    tokens_seen: int = 0
    workers: int = 0
    """How many workers trained up to here (set when a checkpoint is saved)."""
    global_batch: int = 0
    """Rows per optimizer step over all workers (set when a checkpoint is saved): a resumed run keeps it."""

    @classmethod
    def from_json(cls, d: dict, micro_batch: int, workers: int) -> "Progress":
        """A checkpoint's progress.json; one written before ``rows_in_epoch`` counted micro batches per worker
        (``batch_in_epoch``), on as many workers as resume it."""
        d = dict(d)
        if "batch_in_epoch" in d:
            d["rows_in_epoch"] = d.pop("batch_in_epoch") * micro_batch * workers
        return _of_json(cls, d)


class CheckpointKind(enum.Enum):
    RESUME = "resume"
    """Engine state to continue from (periodic, or when the run is asked to stop)."""
    FINAL = "final"
    """The end of the run: engine state, plus the model or adapter in Hugging Face format."""


def _json(obj) -> dict:
    return {k: v for k, v in asdict(obj).items() if v is not None}


def _of_json(cls, d: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class WorkerRecord:
    """What one worker reports at a step where it logs, evaluates, checkpoints or stops. The first block is the
    same at every step; the window fields are set at logging steps, the eval fields at evaluation steps."""
    rank: int = 0
    world_size: int = 1
    trainable_params: int = 0
    total_params: int = 0
    total_steps: int = 0
    device: str = "cpu"
    pid: int = 0
    node_id: str | None = None
    peak_matmul_tflops: float | None = None
    datasheet_tflops: float | None = None
    """The GPU's dense bf16 datasheet peak (metrics.DATASHEET_TFLOPS), or None."""
    compute_dtype: str | None = None
    flops_per_token: float | None = None
    setup_started_unix: float | None = None
    """Wall clock when this worker began its setup (after Ray started it)."""
    setup_s: dict | None = None
    """Seconds each setup phase took on this worker: data, model, engine."""

    step: int = 0
    epoch: int = 0
    first_step_unix: float | None = None
    """Wall clock at the end of this process's first optimizer step (the harness's time to first step)."""
    stopped: str | None = None
    checkpoint: str | None = None
    """The checkpoint this step saved (its directory), or None."""

    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    step_time_s: float | None = None
    tokens_per_s: float | None = None
    tokens_per_s_total: float | None = None
    tokens_seen: int | None = None
    mfu: float | None = None
    """Model FLOPs over the matmul rate measured on the device (metrics.FLOP_FORMULA)."""
    mfu_datasheet: float | None = None
    """Model FLOPs over the GPU's datasheet peak: the figure comparable with other tools'."""
    peak_allocated_gib: float | None = None
    peak_reserved_gib: float | None = None
    peak_device_used_gib: float | None = None
    peak_rss_gib: float | None = None

    eval_loss: float | None = None
    eval_perplexity: float | None = None

    def to_json(self) -> dict:
        return _json(self)

    @classmethod
    def from_json(cls, d: dict) -> "WorkerRecord":
        return _of_json(cls, d)

    @property
    def logged(self) -> bool:
        return self.loss is not None


PER_WORKER = ("peak_allocated_gib", "peak_reserved_gib", "peak_device_used_gib", "peak_rss_gib", "tokens_per_s",
              "pid", "node_id")
"""Figures that differ between workers: a ``Line`` keeps every worker's, as ``<name>_per_worker``."""


@dataclass
class Line(WorkerRecord):
    """One line of metrics.jsonl: rank 0's record, every worker's ``PER_WORKER`` figures, and when the driver wrote
    it."""
    time: float = 0.0
    peak_allocated_gib_per_worker: list | None = None
    peak_reserved_gib_per_worker: list | None = None
    peak_device_used_gib_per_worker: list | None = None
    peak_rss_gib_per_worker: list | None = None
    tokens_per_s_per_worker: list | None = None
    pid_per_worker: list | None = None
    node_id_per_worker: list | None = None

    @classmethod
    def of_workers(cls, records: list[WorkerRecord]) -> "Line":
        first = min(records, key=lambda r: r.rank)
        per_worker = {f"{k}_per_worker": [getattr(r, k) for r in sorted(records, key=lambda r: r.rank)]
                      for k in PER_WORKER if getattr(first, k) is not None}
        return cls(**asdict(first), **per_worker, time=time.time())

    def largest(self, key: str) -> float | None:
        """The largest figure over workers (the one that must fit on every device)."""
        values = [v for v in getattr(self, f"{key}_per_worker") or [getattr(self, key)] if v is not None]
        return max(values, default=None)


SUPERSEDED = "metrics.superseded.jsonl"
"""The lines of steps that a resumed attempt trained again, moved out of metrics.jsonl (in the order written)."""


def append_line(run_dir: Path, line: Line, last_step: int | None = None) -> None:
    """Append ``line`` to metrics.jsonl. ``last_step``: the step of the file's last line, when the caller knows it;
    where ``line`` goes back to or before it (an attempt resumed from an earlier checkpoint trains those steps
    again), the earlier attempt's lines from ``line``'s step on move to metrics.superseded.jsonl first, so that
    metrics.jsonl holds each step once: the one the run went on from."""
    path = Path(run_dir) / "metrics.jsonl"
    if last_step is not None and line.step <= last_step:
        texts = [t for t in path.read_text().splitlines() if t.strip()]
        redone = lambda t: json.loads(t).get("step", 0) >= line.step
        with open(Path(run_dir) / SUPERSEDED, "a") as fh:
            fh.writelines(t + "\n" for t in texts if redone(t))
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(t + "\n" for t in texts if not redone(t)))
        os.replace(tmp, path)
    with open(path, "a") as fh:
        fh.write(json.dumps(line.to_json()) + "\n")


def read_lines(run_dir: Path, superseded: bool = False) -> list[Line]:
    """Every line of the run's metrics.jsonl, across its attempts (a resumed run appends), a step once; with
    ``superseded``, the lines of steps trained again too (metrics.superseded.jsonl), all in the order written."""
    names = [SUPERSEDED, "metrics.jsonl"] if superseded else ["metrics.jsonl"]
    out = [Line.from_json(json.loads(text)) for name in names if (Path(run_dir) / name).exists()
           for text in (Path(run_dir) / name).read_text().splitlines() if text.strip()]
    return sorted(out, key=lambda line: line.time) if superseded else out


def progress_line(line: Line) -> str:
    """What the driver prints for a line: a bar, loss, lr, grad norm, tokens/s, MFU, eval and how it stopped."""
    step, total = line.step, line.total_steps or 1
    filled = int(30 * step / total)
    parts = [f"[{'#' * filled}{'.' * (30 - filled)}] step {step}/{total}"]
    if line.logged:
        grad = f"  grad norm {line.grad_norm:.3g}" if line.grad_norm is not None else ""
        parts.append(f"loss {line.loss:.4f}  lr {line.lr:.2e}{grad}  {line.tokens_per_s_total:,.0f} tok/s")
        if line.mfu_datasheet and line.mfu:
            parts.append(f"MFU {100 * line.mfu_datasheet:.1f}% of the datasheet peak ({100 * line.mfu:.1f}% of the "
                         "measured matmul rate)")
        elif line.mfu:
            parts.append(f"MFU {100 * line.mfu:.1f}% of the measured matmul rate")
    if line.eval_loss is not None:
        parts.append(f"eval_loss {line.eval_loss:.4f}  ppl {line.eval_perplexity:.2f}")
    if line.stopped == "resize":
        parts.append("checkpoint saved: Ray Train restarts the run on more workers from it")
    elif line.stopped:
        parts.append(f"stopped early ({line.stopped})" + (", checkpoint saved" if line.checkpoint else ""))
    return "  ".join(parts)


def _phases(driver: dict, first: WorkerRecord) -> dict | None:
    if not first.setup_started_unix or not first.setup_s:
        return None
    setup_end = first.setup_started_unix + sum(first.setup_s.values())
    out = {"imports": driver["imports"], "checks": driver["checks"],
           **({"download": driver["download"]} if driver.get("download") else {}), "cluster": driver["cluster"],
           "workers start": first.setup_started_unix - driver["ready_unix"], **first.setup_s,
           "first step": first.first_step_unix - setup_end}
    return {k: round(v, 1) for k, v in out.items()}


def _median(values: list[float]) -> float | None:
    """The median; of an even count, the mean of the middle two (the upper one alone made a 12-step run's
    tokens/s the better of its two steady windows and its step time the worse)."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


@dataclass
class Summary:
    """summary.json: how the run went, from its metrics.jsonl and Ray's result. The benchmark harness's plain
    Hugging Face baseline reports its figures under the same names."""
    run_dir: str | None = None
    method: str | None = None
    wall_time_s: float | None = None
    time_to_first_step_s: float | None = None
    first_step_phases_s: dict | None = None
    """Where the time to the first step went, in order: the command's imports, the driver's checks and its cluster,
    Ray starting the workers, rank 0's data, model and engine setup, and the first optimizer step itself."""
    final_step: int | None = None
    stopped: str | None = None
    """This attempt's last record says how it ended: a reason when asked to stop early, None when it finished."""
    world_size: int | None = None
    device: str | None = None
    first_loss: float | None = None
    final_loss: float | None = None
    losses: list = field(default_factory=list)
    eval_loss: float | None = None
    eval_perplexity: float | None = None
    step_time_s: float | None = None
    """Medians over the logging windows after the first (the first carries compilation, allocator growth and
    warm-up): step time, tokens/s and MFU."""
    tokens_per_s_total: float | None = None
    mfu: float | None = None
    mfu_datasheet: float | None = None
    peak_matmul_tflops: float | None = None
    datasheet_tflops: float | None = None
    compute_dtype: str | None = None
    flops_per_token: float | None = None
    peak_allocated_gib: float | None = None
    """Peaks: the largest over workers and over the run, the figure that must fit on every device."""
    peak_reserved_gib: float | None = None
    peak_device_used_gib: float | None = None
    peak_rss_gib: float | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    checkpoint: str | None = None
    final_model: str | None = None
    final_model_bytes: int | None = None
    checkpoint_bytes: int | None = None

    @classmethod
    def of_lines(cls, lines: list[Line], run_dir: Path, method: str, wall_s: float, started_unix: float,
                 driver_phases: dict | None = None, **paths) -> "Summary":
        """``driver_phases``: the driver's own phases, ``{"checks": s, "download": s, "cluster": s, "ready_unix":
        t}`` (when the cluster was ready); with them the time to first step is split into phases."""
        logged = [r for r in lines if r.logged]
        steady = logged[1:] or logged
        last = logged[-1] if logged else WorkerRecord()
        # A resumed run's metrics.jsonl holds the earlier attempts' lines too: the first step is this attempt's.
        this_attempt = [r for r in lines if r.first_step_unix and r.first_step_unix >= started_unix]
        first_step = min((r.first_step_unix for r in this_attempt), default=None)
        evaluated = [r for r in lines if r.eval_loss is not None]
        peak = lambda key: max((v for r in logged if (v := r.largest(key)) is not None), default=None)
        return cls(
            run_dir=str(run_dir), method=method, wall_time_s=round(wall_s, 1),
            time_to_first_step_s=round(first_step - started_unix, 1) if first_step else None,
            first_step_phases_s=_phases(driver_phases, this_attempt[0]) if driver_phases and this_attempt else None,
            final_step=max((r.step for r in lines), default=None),
            stopped=lines[-1].stopped if lines else None,
            world_size=last.world_size if logged else None, device=last.device if logged else None,
            first_loss=logged[0].loss if logged else None, final_loss=last.loss,
            losses=[[r.step, r.loss] for r in logged],
            eval_loss=evaluated[-1].eval_loss if evaluated else None,
            eval_perplexity=evaluated[-1].eval_perplexity if evaluated else None,
            step_time_s=_median([r.step_time_s for r in steady]),
            tokens_per_s_total=_median([r.tokens_per_s_total for r in steady]),
            mfu=_median([r.mfu for r in steady if r.mfu is not None]),
            mfu_datasheet=_median([r.mfu_datasheet for r in steady if r.mfu_datasheet is not None]),
            peak_matmul_tflops=last.peak_matmul_tflops, datasheet_tflops=last.datasheet_tflops,
            compute_dtype=last.compute_dtype,
            flops_per_token=last.flops_per_token,
            peak_allocated_gib=peak("peak_allocated_gib"), peak_reserved_gib=peak("peak_reserved_gib"),
            peak_device_used_gib=peak("peak_device_used_gib"), peak_rss_gib=peak("peak_rss_gib"),
            trainable_params=last.trainable_params if logged else None,
            total_params=last.total_params if logged else None, **paths)

    def to_json(self) -> dict:
        return asdict(self)  # every key, None included: readers see the same fields in every summary

    @classmethod
    def from_json(cls, d: dict) -> "Summary":
        return _of_json(cls, d)

    def write(self, run_dir: Path) -> None:
        (Path(run_dir) / "summary.json").write_text(json.dumps(self.to_json(), indent=2))

    @classmethod
    def read(cls, run_dir: Path) -> "Summary":
        return cls.from_json(json.loads((Path(run_dir) / "summary.json").read_text()))
