"""The run directory: claimed for one run's config before it starts, and completed with ``final/`` after it.

    <storage_path>/<name>/config.yaml      the resolved config (the claim)
                         metrics.jsonl     one Line per report (ftcluster.records), a step once
                         metrics.superseded.jsonl  the lines of steps a resumed attempt trained again
                         plan.json         the run's plan (ftcluster.plan)
                         checkpoint_step*  checkpoints (ftcluster.checkpoint)
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


def check(cfg: RunConfig) -> None:
    """What ``prepare`` would refuse, checked before anything starts and without writing the run directory: the
    storage is writable, the directory holds no other config's run, and no live driver holds it."""
    _writable(cfg.run_dir.parent, f"output.storage_path={cfg.output.storage_path}")
    _same_run(cfg)
    holder = _holder(cfg.run_dir / LOCK)
    if holder is not None and not _ours_or_stale(holder):
        raise _in_use(cfg.run_dir, holder)


def _same_run(cfg: RunConfig) -> None:
    """A directory that already holds a different run is never reused: resuming it with another config would
    corrupt it, and overwriting would lose it."""
    record = cfg.run_dir / "config.yaml"
    if not record.exists():
        return
    old = yaml.safe_load(record.read_text()) or {}
    try:
        differences = cfg.differences(from_dict(old, str(record)))
    except ConfigError:
        differences = ["its config.yaml no longer validates"]
    if differences:
        raise ConfigError(
            f"output.name: {cfg.run_dir} already holds a run with a different config (see {record}): "
            f"{'; '.join(differences[:6])}{'; ...' if len(differences) > 6 else ''}. To resume that run, set these "
            "back; to start another, choose another output.name (or output.storage_path)."
        )


def finished(cfg: RunConfig) -> dict | None:
    """The summary of the run this directory holds, if that run finished (its last record is its last step, and no
    stop): a second start has nothing to do. None otherwise (no run, or one to resume)."""
    from ftcluster import records

    run_dir = cfg.run_dir
    if not (run_dir / "summary.json").is_file():
        return None
    lines = records.read_lines(run_dir)
    last = lines[-1] if lines else None
    if last is None or last.stopped or not last.total_steps or last.step < last.total_steps:
        return None
    return json.loads((run_dir / "summary.json").read_text())


def prepare(cfg: RunConfig) -> Path:
    """Create the run directory, claim it for this driver and record the config (the checks of ``check`` again,
    now that nothing else stands between them and the run)."""
    run_dir = cfg.run_dir
    _writable(run_dir, f"output.storage_path={cfg.output.storage_path}")
    _same_run(cfg)
    _lock(run_dir)
    save_resolved(cfg, run_dir / "config.yaml")
    stop.clear(run_dir)
    return run_dir


ROWS = "rows.json"
"""The identity of the rows a run trains on (``preflight.Inputs.rows_key``): its checkpoints' epoch and row
position refer to them."""


def check_rows(cfg: RunConfig, key: str | None, resuming: bool) -> None:
    """Refuse to resume on other rows than the run's checkpoints were saved on: their epoch and position would then
    apply to different examples, silently (a data file changed in place, a different tokenizer at the same path)."""
    record = cfg.run_dir / ROWS
    if not resuming or key is None or not record.is_file():
        return
    saved = json.loads(record.read_text())
    was, now = saved.get("padding_free"), _grouped(cfg)
    if was != now:
        said = lambda g: (f"data.padding_free=true with training.micro_batch_size={g}" if g
                          else "data.padding_free=false")
        raise ConfigError(
            f"{said(now)}, but {cfg.run_dir} was trained with {said(was)}: padding-free rows are regrouped by the "
            "micro batch, and its checkpoints' row position counts the rows it was batched in, which would point at "
            f"other examples. Set {said(was)} to resume it, or train under another output.name")
    if saved.get("key") != key:
        raise ConfigError(
            f"data.source={cfg.data.source}: its rows differ from those {cfg.run_dir} was trained on (rows "
            f"{saved.get('key')} then, {key} now: the file's contents or the tokenizer changed), so the checkpoint's "
            "epoch and row position would point at other examples. Restore the data the run started with to resume "
            "it, or train on the new data under another output.name")


def _grouped(cfg: RunConfig) -> int | None:
    """The rows a padding-free row is made of (``training.micro_batch_size``), or None without padding_free."""
    return cfg.training.micro_batch_size if cfg.data.padding_free else None


def record_rows(run_dir: Path, cfg: RunConfig, key: str | None) -> None:
    if key is not None:
        # padding_free only where on: a record without it is of rows batched as they are.
        grouped = _grouped(cfg)
        record = {"key": key, **({"padding_free": grouped} if grouped else {})}
        (run_dir / ROWS).write_text(json.dumps(record) + "\n")


LOCK = "LOCK"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _holder(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _ours_or_stale(holder: dict) -> bool:
    me = _me()
    return holder.get("host") == me["host"] and (holder.get("pid") == me["pid"]
                                                  or not _alive(int(holder.get("pid", 0))))


def _in_use(run_dir: Path, holder: dict) -> ConfigError:
    return ConfigError(
        f"output.name: {run_dir} is in use by the run PID {holder.get('pid')} started on {holder.get('host')} at "
        f"{holder.get('started')}. Wait for it or stop it (SIGTERM checkpoints it), or choose another output.name; "
        f"if that run is gone, delete {run_dir / LOCK}.")


def _lock(run_dir: Path) -> None:
    """Claim the run directory for this driver: two runs of one name would interleave their metrics and
    checkpoints. A claim left by a driver that died on this host is taken over; one from another host can only be
    removed by hand, once that run is known to be gone."""
    path = run_dir / LOCK
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _holder(path) or {}
            if not _ours_or_stale(holder):
                raise _in_use(run_dir, holder) from None
            if holder.get("pid") == os.getpid():
                return  # this driver already holds it
            print(f"ftcluster: {path} was left by PID {holder.get('pid')}, which has ended; taking it over",
                  flush=True)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(_me(), fh)
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
    """Move the last checkpoint's Hugging Face model (``hf/``) to ``final/`` and leave ``hf`` a link to it: the model
    is on disk once. An earlier ``final/`` is replaced only once the new one is whole, and a move a crash
    interrupted is finished. None when the checkpoint holds no model (a resume checkpoint, or
    save_final_model=false)."""
    if not checkpoint_path:
        return None
    hf_dir, final, tmp = Path(checkpoint_path) / "hf", run_dir / "final", run_dir / "final.tmp"
    if hf_dir.is_symlink():
        if not final.is_dir() and tmp.is_dir():
            tmp.rename(final)
        return final if final.is_dir() else None
    if not hf_dir.is_dir():
        return None
    shutil.rmtree(tmp, ignore_errors=True)
    hf_dir.rename(tmp)
    hf_dir.symlink_to(Path("..") / final.name)  # the checkpoint still names its model
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
