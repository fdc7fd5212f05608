"""The run directory: claimed for one run's config before it starts, and completed with ``final/`` after it.

    <storage_path>/<name>/config.yaml      the resolved config (the claim)
                         metrics.jsonl     one Line per report (ftcluster.records)
                         checkpoint_step*  Ray checkpoints
                         final/            the model or adapter in Hugging Face format
                         summary.json      ftcluster.records.Summary
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import yaml

from ftcluster import stop
from ftcluster.config import ConfigError, RunConfig, from_dict, save_resolved


def _writable(directory: Path, field: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".writable-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{field}: cannot write {directory} ({e.strerror or e}); point output.storage_path at a "
                          "writable directory") from None


def check_storage(cfg: RunConfig) -> None:
    """Whether runs can be written under ``output.storage_path``: checked before anything starts."""
    _writable(cfg.run_dir.parent, f"output.storage_path={cfg.output.storage_path}")


def prepare(cfg: RunConfig) -> Path:
    """Create the run directory and record the config. A directory that already holds a different run is never
    reused: resuming it with another config would corrupt it, and overwriting would lose it."""
    run_dir = cfg.run_dir
    record = run_dir / "config.yaml"
    _writable(run_dir, f"output.storage_path={cfg.output.storage_path}")
    if record.exists():
        old = yaml.safe_load(record.read_text()) or {}
        try:
            old_fp = from_dict(old, str(record)).fingerprint()
        except ConfigError:
            old_fp = None
        if old_fp != cfg.fingerprint():
            raise ConfigError(
                f"output.name: {run_dir} already holds a run with a different config (see {record}). Choose "
                "another output.name (or output.storage_path); to resume that run, use its config unchanged."
            )
    _lock(run_dir)
    save_resolved(cfg, record)
    stop.clear(run_dir)
    return run_dir


LOCK = "LOCK"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock(run_dir: Path) -> None:
    """Claim the run directory for this driver: two runs of one name would interleave their metrics and
    checkpoints. A claim left by a driver that died on this host is taken over; one from another host can only be
    removed by hand, once that run is known to be gone."""
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = run_dir / LOCK
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
                return  # this driver already holds it
            if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", 0))):
                print(f"ftcluster: {path} was left by PID {holder.get('pid')}, which has ended; taking it over",
                      flush=True)
                path.unlink(missing_ok=True)
                continue
            raise ConfigError(
                f"output.name: {run_dir} is in use by the run PID {holder.get('pid')} started on "
                f"{holder.get('host')} at {holder.get('started')}. Wait for it or stop it (SIGTERM checkpoints it), "
                f"or choose another output.name; if that run is gone, delete {path}.") from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        return


def release(run_dir: Path) -> None:
    """Give up this driver's claim on the run directory (at the end of the run, however it ends)."""
    path = Path(run_dir) / LOCK
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def publish_final(run_dir: Path, checkpoint_path: str | None) -> Path | None:
    """Copy the last checkpoint's Hugging Face model (``hf/``) to ``final/``, replacing an earlier one only once the
    new copy is complete. None when the checkpoint holds none (a resume checkpoint, or save_final_model=false)."""
    hf_dir = Path(checkpoint_path) / "hf" if checkpoint_path else None
    if hf_dir is None or not hf_dir.is_dir():
        return None
    final, tmp = run_dir / "final", run_dir / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(hf_dir, tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
