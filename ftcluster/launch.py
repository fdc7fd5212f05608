"""The driver: checks the run before anything heavy starts, joins (or starts) a Ray cluster, runs the workers
under a ``TorchTrainer``, and leaves the run directory complete: config.yaml, metrics.jsonl, checkpoints, final/
and summary.json."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from pathlib import Path

import yaml

from ftcluster import preflight, stop
from ftcluster.config import ConfigError, RunConfig, save_resolved

from ray.train import UserCallback


class ProgressLog(UserCallback):
    """On every report: append one JSON line to metrics.jsonl and print a progress line with loss and tokens/s.
    Runs in Ray Train's controller process, on the head node (where the run directory is)."""

    def __init__(self, run_dir: str):
        self.path = Path(run_dir) / "metrics.jsonl"

    def after_report(self, run_context, metrics, checkpoint):
        m = dict(metrics[0])
        per_worker = ("peak_allocated_gib", "peak_reserved_gib", "peak_device_used_gib", "peak_rss_gib",
                      "tokens_per_s", "pid", "node_id")
        for key in per_worker:
            if key in m:
                m[f"{key}_per_worker"] = [w.get(key) for w in metrics]
        m["time"] = time.time()
        if checkpoint is not None:
            m["checkpoint"] = checkpoint.path
        with open(self.path, "a") as fh:
            fh.write(json.dumps(m) + "\n")
        print(progress_line(m), flush=True)


def progress_line(m: dict) -> str:
    step, total = m.get("step", 0), m.get("total_steps", 0) or 1
    filled = int(30 * step / total)
    parts = [f"[{'#' * filled}{'.' * (30 - filled)}] step {step}/{total}"]
    if "loss" in m:
        parts.append(f"loss {m['loss']:.4f}  lr {m['lr']:.2e}  {m['tokens_per_s_total']:,.0f} tok/s")
        if m.get("mfu"):
            parts.append(f"MFU {100 * m['mfu']:.1f}%")
    if "eval_loss" in m:
        parts.append(f"eval_loss {m['eval_loss']:.4f}  ppl {m['eval_perplexity']:.2f}")
    if "stopped" in m:
        parts.append(f"stopped early ({m['stopped']}), checkpoint saved")
    return "  ".join(parts)


def prepare_run_dir(cfg: RunConfig) -> Path:
    """Create the run directory and record the config. A directory that already holds a different run is never
    reused: resuming it with another config would corrupt it, and overwriting would lose it."""
    run_dir = cfg.run_dir
    record = run_dir / "config.yaml"
    if record.exists():
        old = yaml.safe_load(record.read_text()) or {}
        from ftcluster.config import from_dict

        try:
            old_fp = from_dict(old, str(record)).fingerprint()
        except ConfigError:
            old_fp = None
        if old_fp != cfg.fingerprint():
            raise ConfigError(
                f"output.name: {run_dir} already holds a run with a different config (see {record}). Choose "
                "another output.name (or output.storage_path); to resume that run, use its config unchanged."
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, record)
    stop.clear(run_dir)
    return run_dir


def run(cfg: RunConfig, force: bool = False) -> dict:
    """Train; return the summary (also written to ``<run_dir>/summary.json``). ``force`` starts a run the memory
    estimator says will not fit its GPUs."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ftcluster.worker import train_loop_per_worker

    # Before the run directory exists and before Ray: a refused run leaves nothing behind and takes no GPU.
    preflight.check_inputs(cfg)
    print(preflight.check_fit(cfg, force), flush=True)
    run_dir = prepare_run_dir(cfg)
    if not ray.is_initialized():
        ray.init(address=cfg.ray.address, log_to_driver=True)
    s = cfg.scaling
    use_gpu = s.use_gpu if s.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    resources = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if use_gpu:
        resources["GPU"] = s.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        # Workers run in Ray's own working directories: hand them the run directory as an absolute path.
        train_loop_config=cfg.model_copy(update={"output": cfg.output.model_copy(
            update={"storage_path": str(run_dir.parent)})}).model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=s.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RayRunConfig(
            name=cfg.run_name, storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.output.keep_checkpoints),
            callbacks=[ProgressLog(str(run_dir))],
        ),
    )
    started = time.time()
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
    if in_main:
        stop.on_signals(run_dir)
    try:
        result = trainer.fit()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return summarize(cfg, run_dir, result, time.time() - started, started)


def _median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def summarize(cfg: RunConfig, run_dir: Path, result, wall_s: float, started_unix: float) -> dict:
    final = None
    if result.checkpoint is not None:
        hf_dir = Path(result.checkpoint.path) / "hf"
        if hf_dir.is_dir():
            final = run_dir / "final"
            tmp = run_dir / "final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(hf_dir, tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").exists() else []
    logged = [r for r in records if "loss" in r]
    last = logged[-1] if logged else {}
    peak = lambda key: max((v for r in logged for v in r.get(f"{key}_per_worker") or [r.get(key)] if v is not None),
                           default=None)
    first_step = min((r["first_step_unix"] for r in records if r.get("first_step_unix")), default=None)
    summary = {
        "run_dir": str(run_dir), "method": cfg.method, "wall_time_s": round(wall_s, 1),
        "time_to_first_step_s": round(first_step - started_unix, 1) if first_step else None,
        # Ray attaches metrics to the result only with a checkpoint: the records are the source.
        "final_step": max((r["step"] for r in records if "step" in r), default=None),
        # The records span every attempt of the run: only this attempt's last one says how it ended.
        "stopped": records[-1].get("stopped") if records else None,
        "world_size": last.get("world_size"), "device": last.get("device"),
        "first_loss": logged[0]["loss"] if logged else None,
        "final_loss": last.get("loss"),
        "losses": [[r["step"], r["loss"]] for r in logged],
        "eval_loss": next((r["eval_loss"] for r in reversed(records) if "eval_loss" in r), None),
        "eval_perplexity": next((r["eval_perplexity"] for r in reversed(records) if "eval_loss" in r), None),
        # Later windows only: the first one carries compilation, allocator growth and warm-up.
        "step_time_s": _median([r["step_time_s"] for r in logged[1:] or logged]),
        "tokens_per_s_total": _median([r["tokens_per_s_total"] for r in logged[1:] or logged]),
        "mfu": _median([r["mfu"] for r in logged[1:] or logged if r.get("mfu") is not None]),
        "peak_matmul_tflops": last.get("peak_matmul_tflops"), "compute_dtype": last.get("compute_dtype"),
        "flops_per_token": last.get("flops_per_token"),
        # The largest over workers and over the run: the figure that must fit on every device.
        "peak_allocated_gib": peak("peak_allocated_gib"), "peak_reserved_gib": peak("peak_reserved_gib"),
        "peak_device_used_gib": peak("peak_device_used_gib"), "peak_rss_gib": peak("peak_rss_gib"),
        "trainable_params": last.get("trainable_params"), "total_params": last.get("total_params"),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "final_model": str(final) if final else None,
        "final_model_bytes": _dir_bytes(final) if final else None,
        "checkpoint_bytes": _dir_bytes(Path(result.checkpoint.path)) if result.checkpoint else None,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
