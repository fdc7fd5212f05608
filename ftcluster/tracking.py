"""Experiment tracking: every record rank 0 reports goes to TensorBoard (event files under the run directory, on by
default), MLflow and Weights & Biases (when configured), through the libraries themselves. The resolved config is
logged once as hyperparameters. A resumed run continues the same tracked run: the MLflow and W&B run ids are kept
in ``<run_dir>/tracking.json``. A tracker that is missing or down never stops training: it warns once and is
dropped."""

from __future__ import annotations

import json
import os
import time
import uuid
import warnings
from pathlib import Path

from ftcluster.config import RunConfig
from ftcluster.records import WorkerRecord

FIGURES = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "step_time_s": "perf/step_time_s",
           "tokens_per_s_total": "perf/tokens_per_s", "mfu_datasheet": "perf/mfu", "mfu": "perf/mfu_measured_matmul",
           "peak_allocated_gib": "memory/peak_allocated_gib",
           "peak_device_used_gib": "memory/peak_device_used_gib", "peak_rss_gib": "memory/peak_rss_gib",
           "eval_loss": "eval/loss", "eval_perplexity": "eval/perplexity"}
"""Record field -> the name it is tracked under."""


def figures(record: WorkerRecord) -> dict[str, float]:
    return {name: float(v) for key, name in FIGURES.items() if (v := getattr(record, key)) is not None}


def hyperparameters(cfg: RunConfig) -> dict[str, str | int | float | bool]:
    """The resolved config, flattened to ``section.key`` (lists and dicts as JSON)."""
    out = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (str, int, float, bool)) or value is None:
            out[prefix] = "None" if value is None else value
        else:
            out[prefix] = json.dumps(value)

    walk("", cfg.model_dump(mode="json"))
    return out


class _TensorBoard:
    name = "TensorBoard"

    def __init__(self, cfg: RunConfig, run_dir: Path, ids: dict):
        from torch.utils.tensorboard import SummaryWriter

        # One directory per run: a resumed run appends to it, and TensorBoard shows one curve.
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if not ids.get("tensorboard_config_logged"):
            self.writer.add_text("config", "```\n" + json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n```")
            ids["tensorboard_config_logged"] = True

    def log(self, step: int, values: dict) -> None:
        for name, v in values.items():
            self.writer.add_scalar(name, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


PROBE_S = 5.0


def probe(uri: str, timeout_s: float = PROBE_S) -> None:
    """Raise ``ConnectionError`` unless the server of ``uri`` takes a connection within ``timeout_s``, saying so while
    it waits."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    print(f"tracking: reaching {uri} (up to {timeout_s:g} s)", flush=True)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            return
    except OSError as e:
        raise ConnectionError(f"{uri} did not answer within {timeout_s:g} s ({e})") from None


class _MLflow:
    name = "MLflow"

    def __init__(self, cfg: RunConfig, run_dir: Path, ids: dict):
        import mlflow

        t = cfg.tracking.mlflow
        if t.tracking_uri and t.tracking_uri.startswith(("http://", "https://")):
            probe(t.tracking_uri)
            # MLflow's own client retries a server that does not answer for minutes, in silence.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        self.client = mlflow.tracking.MlflowClient(tracking_uri=t.tracking_uri)
        run_id = ids.get("mlflow_run_id")
        if run_id is None:
            exp = self.client.get_experiment_by_name(t.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(t.experiment)
            run = self.client.create_run(exp_id, run_name=cfg.tracking.run_name or cfg.run_name,
                                         tags={tag: "true" for tag in cfg.tracking.tags})
            run_id = ids["mlflow_run_id"] = run.info.run_id
            for key, value in hyperparameters(cfg).items():
                self.client.log_param(run_id, key, str(value)[:6000])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log(self, step: int, values: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k.replace("/", "."), v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _WandB:
    name = "Weights & Biases"

    def __init__(self, cfg: RunConfig, run_dir: Path, ids: dict):
        import wandb

        t = cfg.tracking.wandb
        run_id = ids.setdefault("wandb_run_id", uuid.uuid4().hex[:12])
        self.run = wandb.init(project=t.project, entity=t.entity, id=run_id, resume="allow",
                              name=cfg.tracking.run_name or cfg.run_name, tags=list(cfg.tracking.tags),
                              config=hyperparameters(cfg), dir=str(run_dir), mode=t.mode)

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        # finish() returns before W&B's service process has written everything (the last history row of an offline
        # run went missing in CI); teardown waits for it. W&B's own teardown runs at interpreter exit, which a
        # Ray worker killed at the end of a run may never reach.
        wandb.teardown()


class Trackers:
    """The run's trackers on rank 0; on other ranks, and for trackers that fail, nothing."""

    def __init__(self, cfg: RunConfig, rank: int):
        self.active: list = []
        self.run_dir = cfg.run_dir
        if rank != 0:
            return
        self.ids_file = Path(cfg.run_dir) / "tracking.json"
        ids = json.loads(self.ids_file.read_text()) if self.ids_file.exists() else {}
        t = cfg.tracking
        wanted = [(_TensorBoard, t.tensorboard), (_MLflow, t.mlflow.enabled), (_WandB, t.wandb.enabled)]
        for cls, on in wanted:
            if on:
                self._guard(cls.name, lambda cls=cls: self.active.append(cls(cfg, Path(cfg.run_dir), ids)))
        self.ids_file.write_text(json.dumps(ids, indent=2))

    def _guard(self, name: str, fn) -> bool:
        try:
            fn()
            return True
        except Exception as e:  # noqa: BLE001 - no tracker failure may stop training
            warnings.warn(f"tracking: {name} failed ({type(e).__name__}: {e}); training goes on without it",
                          RuntimeWarning, stacklevel=2)
            print(f"tracking: {name} failed ({type(e).__name__}: {e}); training goes on without it", flush=True)
            return False

    def log(self, record: WorkerRecord) -> None:
        values = figures(record)
        if not values:
            return
        for tracker in list(self.active):
            if not self._guard(tracker.name, lambda tracker=tracker: tracker.log(record.step, values)):
                self.active.remove(tracker)

    def close(self) -> None:
        for tracker in self.active:
            self._guard(tracker.name, tracker.close)
        self.active = []

