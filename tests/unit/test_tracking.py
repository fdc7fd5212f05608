"""Tracking through the real libraries, on CPU: TensorBoard event files, an MLflow file store and a W&B offline
run are read back; a resumed run appends to the same tracked run; a tracker that fails never stops training."""

import json
import struct
from pathlib import Path

import pytest

from ftcluster import config as C
from ftcluster import tracking
from ftcluster.records import WorkerRecord


def _cfg(tmp_path, *extra):
    return C.load(None, [f"output.storage_path={tmp_path}", "output.name=tracked", *extra])


def _records(steps):
    return [WorkerRecord(step=s, loss=10.0 / s, lr=1e-4, grad_norm=0.5, tokens_per_s_total=1000.0 + s,
                         peak_allocated_gib=1.5) for s in steps] + [WorkerRecord(step=steps[-1], eval_loss=3.0)]


def _train(cfg, steps, rank=0):
    """What a worker does: open the trackers, log each record it reports, close them."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    trackers = tracking.Trackers(cfg, rank)
    for r in _records(steps):
        trackers.log(r)
    trackers.close()


def _tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = []
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            points += [(e.step, e.value) for e in acc.Scalars(tag)]
    return sorted(points)


def test_tensorboard_holds_the_loss_curve_and_a_resumed_run_continues_it(tmp_path):
    cfg = _cfg(tmp_path)
    _train(cfg, [2, 4])
    _train(cfg, [6, 8])  # the same run directory again: a resume
    loss = _tensorboard_scalars(cfg.run_dir, "train/loss")
    assert [s for s, _ in loss] == [2, 4, 6, 8] and loss[0][1] == pytest.approx(5.0)
    assert _tensorboard_scalars(cfg.run_dir, "eval/loss") == [(4, 3.0), (8, 3.0)]
    assert [s for s, _ in _tensorboard_scalars(cfg.run_dir, "perf/tokens_per_s")] == [2, 4, 6, 8]


def test_mlflow_file_store_gets_params_once_and_one_run_across_a_resume(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks file stores to opt in
    uri = f"file://{tmp_path / 'mlruns'}"
    cfg = _cfg(tmp_path, "tracking.mlflow.enabled=true", f"tracking.mlflow.tracking_uri={uri}",
               "tracking.mlflow.experiment=exp", "tracking.tags=[smoke]")
    _train(cfg, [2, 4])
    _train(cfg, [6])
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "tracked" and run.data.tags["smoke"] == "true"
    assert run.data.params["lora.r"] == "16" and run.data.params["method"] == "lora"
    history = client.get_metric_history(run.info.run_id, "train.loss")
    assert [(m.step, round(m.value, 3)) for m in history] == [(2, 5.0), (4, 2.5), (6, 1.667)]
    assert run.info.status == "FINISHED"


def _wandb_records(path: Path):
    """The records of a W&B transaction log (``run-<id>.wandb``): a 7-byte header (":W&B", magic, version), then
    LevelDB-log chunks in 32 KiB blocks, each with a 7-byte header (crc32, length, type), holding protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending, out = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left_in_block = 32768 - pos % 32768
        if left_in_block < 7:  # block trailer
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # full, last
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
            pending = b""
    return out


def test_wandb_offline_run_holds_config_and_history_and_a_resume_keeps_its_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(tmp_path, "tracking.wandb.enabled=true", "tracking.wandb.mode=offline", "tracking.wandb.project=p")
    _train(cfg, [2, 4])
    _train(cfg, [6])
    run_id = json.loads((cfg.run_dir / "tracking.json").read_text())["wandb_run_id"]
    logs = sorted(cfg.run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(logs) == 2  # both attempts are the same W&B run (wandb sync merges them)
    history, config = [], {}
    for log in logs:
        for rec in _wandb_records(log):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                if "train/loss" in items:
                    history.append((items["_step"], round(items["train/loss"], 3)))
            elif kind == "run":
                assert rec.run.run_id == run_id and rec.run.project == "p"
                config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
    assert history == [(2, 5.0), (4, 2.5), (6, 1.667)]
    assert config["lora.r"] in (16, {"value": 16})


def test_a_tracker_that_fails_warns_once_and_training_goes_on(tmp_path, capsys):
    cfg = _cfg(tmp_path, "tracking.mlflow.enabled=true", "tracking.mlflow.tracking_uri=nosuchscheme://x")
    with pytest.warns(RuntimeWarning, match="tracking: MLflow failed"):
        _train(cfg, [2, 4])
    assert capsys.readouterr().out.count("tracking: MLflow failed") == 1
    assert [s for s, _ in _tensorboard_scalars(cfg.run_dir, "train/loss")] == [2, 4]  # the others still log


def test_only_rank_0_tracks(tmp_path):
    cfg = _cfg(tmp_path)
    _train(cfg, [2], rank=1)
    assert not (cfg.run_dir / "tensorboard").exists() and not (cfg.run_dir / "tracking.json").exists()


def test_an_mlflow_server_that_does_not_answer_is_left_within_seconds_and_said_so(tmp_path, capsys):
    import time

    cfg = _cfg(tmp_path, "tracking.mlflow.enabled=true", "tracking.mlflow.tracking_uri=http://127.0.0.1:1")
    started = time.monotonic()
    with pytest.warns(RuntimeWarning, match="tracking: MLflow failed"):
        _train(cfg, [2, 4])
    assert time.monotonic() - started < tracking.PROBE_S + 10
    out = capsys.readouterr().out
    assert "tracking: reaching http://127.0.0.1:1 (up to 5 s)" in out
    assert "http://127.0.0.1:1 did not answer within 5 s" in out and "training goes on without it" in out
