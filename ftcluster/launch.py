"""The driver: plans the run, checks it before anything heavy starts, brings up its backend (in this process, or
Ray Train workers on a cluster), and leaves the run directory complete: config.yaml, plan.json, metrics.jsonl,
checkpoints, final/ and summary.json."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from ftcluster import backends, checkpoint, hardware, preflight, records, run_dir as rundir, sources, stop
from ftcluster import plan as P
from ftcluster.config import RunConfig
from ftcluster.progress import ProgressLog


def run(cfg: RunConfig, force: bool = False, command_started: float | None = None) -> dict:
    """Train; return the summary (also written to ``<run_dir>/summary.json``). ``force`` starts a run the memory
    estimator says will not fit its GPUs. ``command_started``: when the command began, before its imports (the
    time to the first step is counted from there); by default, now."""
    started = time.time()
    command_started = command_started or started
    # Before the run directory exists and before Ray: a refused run leaves no run directory and takes no GPU (the
    # data check leaves its prepared rows under the storage path, for the next try).
    rundir.check(cfg)
    done = rundir.finished(cfg)
    if done is not None:
        print(f"already finished: {cfg.run_dir} trained to step {done.get('final_step')} "
              f"(final model: {done.get('final_model')}); nothing was changed. To train again, choose another "
              "output.name.", flush=True)
        return done
    hw = hardware.here(cfg)
    resume = checkpoint.resume_of(cfg.run_dir)
    plan = P.make(cfg, hw, resume=resume)
    inputs = preflight.check_inputs(cfg, plan)
    rundir.check_rows(cfg, inputs.rows_key, resuming=resume is not None)
    print(inputs.line, flush=True)
    fit = preflight.check_fit(cfg, plan, hw, force)  # GPUs known already: refused before any cluster starts
    host = preflight.check_host_memory(cfg, plan, hw, force)
    preflight.check_device(cfg, plan)
    preflight.check_resume_split(cfg, plan)
    checked = time.time()
    print(f"checks: {checked - started:.1f} s", flush=True)
    # Only once every check has passed: a refused run leaves the run directory as it found it.
    for line in checkpoint.set_aside_unusable(cfg.run_dir):
        print(line, flush=True)
    if plan.model_download:  # once, here, before any worker starts; they all read the snapshot
        sources.download(cfg.model)
    preflight.check_weights(cfg)
    downloaded = time.time()
    backend = backends.of(plan)
    started_on = backend.start(cfg, hw)
    if started_on != hw:  # a Ray cluster's GPUs: the same decisions, made with the hardware the workers have
        hw, plan = started_on, P.make(cfg, started_on, resume=resume)
        fit = preflight.check_fit(cfg, plan, hw, force)
        host = preflight.check_host_memory(cfg, plan, hw, force)
    print(plan.describe(), flush=True)
    print(fit, flush=True)
    if host:
        print(host, flush=True)
    for note in preflight.notes(cfg, plan, hw):
        print(note, flush=True)
    backend.check(cfg, plan)
    ready = time.time()
    run_dir = rundir.prepare(cfg)
    plan.save(run_dir)
    rundir.record_rows(run_dir, cfg, inputs.rows_key)
    try:
        return _train(cfg, plan, backend, run_dir, command_started, inputs,
                      {"imports": started - command_started, "checks": checked - started,
                       "download": downloaded - checked, "cluster": ready - downloaded,
                       "ready_unix": ready})
    finally:
        rundir.release(run_dir)


def _train(cfg: RunConfig, plan: P.Plan, backend: backends.Backend, run_dir: Path, started: float, inputs,
           driver_phases: dict) -> dict:
    """The workers, then the run directory's final/ and summary.json. The first SIGTERM or SIGINT asks them for a
    checkpoint and a resumable stop."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
    if in_main:
        stop.on_signals(run_dir)
    try:
        backend.run(cfg, plan, ProgressLog(run_dir, started), inputs)
    except backends.WorkerFailed:
        # The workers are gone: a checkpoint that one of them was still writing is removed, never resumed from.
        checkpoint.remove_partial(run_dir)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    lines = records.read_lines(run_dir)
    # The records are the source (Ray's controller, which writes them, runs in a process of its own).
    saved = next((line.checkpoint for line in reversed(lines) if line.checkpoint), None)
    final = rundir.publish_final(run_dir, saved)
    summary = records.Summary.of_lines(
        lines, run_dir, cfg.method, time.time() - started, started, driver_phases,
        checkpoint=saved,
        final_model=str(final) if final else None, final_model_bytes=rundir.dir_bytes(final) if final else None,
        checkpoint_bytes=rundir.dir_bytes(Path(saved)) if saved else None)
    summary.write(run_dir)
    return summary.to_json()
