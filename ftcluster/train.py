"""``python -m ftcluster.train --config configs/<recipe>.yaml [dotted.key=value ...]``"""

from __future__ import annotations

import time

COMMAND_STARTED = time.time()
"""Before the imports: the time to the first step counts them (torch, transformers and Ray take seconds)."""

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

INTERRUPTED = 130
"""The exit code of a command stopped by Ctrl-C (128 + SIGINT) where no checkpoint could be taken."""


def _leave_while_starting(signum, frame) -> None:
    """SIGINT while the command imports torch, transformers and Ray: leave at once. A KeyboardInterrupt raised
    inside an import can be caught by the library being imported, which then fails in odd ways (a half-imported
    numpy recursing until a RecursionError); and torch interrupted halfway through its import aborts in the
    interpreter's clean-up. So none is raised, and nothing is cleaned up: nothing was written yet."""
    os.write(2, b"\ninterrupted (Ctrl-C) while starting: nothing was written\n")
    os._exit(INTERRUPTED)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _leave_while_starting)

try:
    from ftcluster import collector, config as C, patches, stop  # noqa: E402
except ModuleNotFoundError as missing:  # the command run with a Python that lacks ftcluster's dependencies
    sys.exit(f"error: {missing.name} is not installed in this Python ({sys.executable}). Run `make install`, then "
             "either `.venv/bin/python -m ftcluster.train ...` or `source .venv/bin/activate` first.")


def leave(code: int) -> None:
    """Exit the command with ``code``. For ``INTERRUPTED`` the interpreter's own exit is bypassed: started with
    ``-m``, CPython ends a process by SIGINT instead of its exit code whenever a KeyboardInterrupt passed through an
    ``exec`` of a string at any time, even one caught since (``dataclasses`` and ``namedtuple`` build their methods
    so, at import; CPython's ``run_eval_code_obj`` marks the interrupt unhandled, ``Py_RunMain`` reads the mark at
    exit). Which exit a Ctrl-C gave then depended on the bytecode it landed on. So the exit handlers (Ray's shutdown
    among them) run here and the process leaves with the code itself."""
    if code != INTERRUPTED:
        sys.exit(code)
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ftcluster.train", description="Fine-tune a causal LM on Ray + DeepSpeed.")
    p.add_argument("--config", help="a YAML recipe (see configs/); the defaults train the embedded model with LoRA")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.max_steps=20 method=qlora")
    p.add_argument("--print-config", action="store_true",
                   help="print the config with every auto resolved for this host, and exit")
    p.add_argument("--force", action="store_true",
                   help="start even if the memory estimator says the run will not fit its GPUs")
    return p


def headline(error: str) -> str:
    """A worker's error as the user needs it: the line that says the disk is full, where that was the cause (the
    traceback above it is the writer's); otherwise the whole error."""
    full = [line for line in error.splitlines() if stop.DISK_FULL in line]
    return full[-1] if full else error


def after_failure(error: str, run_dir: Path) -> str:
    """What to do after a worker failed: resume only where a checkpoint exists and the error could pass."""
    from ftcluster import checkpoint

    saved = checkpoint.latest(run_dir)
    kept = f"Its checkpoints are kept (latest intact: {saved})." if saved else "It saved no checkpoint."
    if asked := stop.requested_by(run_dir):
        return (f"The run stopped as asked ({asked}) after a failure, with no restart. {kept} "
                + ("Run the same command again to resume from the latest one." if saved else
                   "Running the same command again starts from step 1."))
    if stop.DISK_FULL in error:
        return (f"The disk of the run directory is full. {kept} Free space there, or set output.storage_path to a "
                "larger disk, then run the same command again to resume.")
    if "OutOfMemoryError" in error or "out of memory" in error:
        return (f"A GPU ran out of memory. {kept} `python -m ftcluster estimate --config <recipe> [overrides]` "
                "shows what each term needs; lower training.micro_batch_size or data.max_seq_len, turn on "
                "model.gradient_checkpointing, or use more GPUs with deepspeed.zero_stage=3.")
    if stop.deterministic(error):
        return (f"The error comes from the run's data, config or code, so running it again fails the same way; "
                f"fix it first. {kept}")
    if saved:
        return f"{kept} Run the same command again to resume from the latest one."
    return "It saved no checkpoint: running the same command again starts from step 1."


def bytecode_note() -> str | None:
    """A line to print where Python writes no bytecode cache (PYTHONDONTWRITEBYTECODE, which many container images
    set): then every process compiles each module it imports from source again, seconds of every start."""
    if not sys.flags.dont_write_bytecode:
        return None
    return ("note: PYTHONDONTWRITEBYTECODE is set, so this process and every worker compile torch, transformers and "
            "Ray from source at each start (7-20 s more before the first step); unset it to let Python cache bytecode")


def main(argv: list[str] | None = None) -> int:
    collector.hold()  # until the first step, or until Ray's workers start: see ftcluster/collector.py
    patches.quiet_library_notices()
    loaded: list = []
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _leave_while_starting) if in_main else None  # until the imports end
    try:
        return _main(argv, loaded, in_main)
    except KeyboardInterrupt:
        # A first Ctrl-C during training asks the workers for a checkpoint (ftcluster/stop.py); this is one before
        # training started, or a second one.
        print(f"\ninterrupted (Ctrl-C): {interrupted_state(loaded[0].run_dir if loaded else None)}", file=sys.stderr)
        return INTERRUPTED
    finally:
        collector.release()
        if in_main:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def interrupted_state(run_dir: Path | None) -> str:
    """What an interrupted command leaves, for the user: the checkpoint to resume from, or nothing."""
    from ftcluster import checkpoint

    latest = checkpoint.latest(run_dir) if run_dir is not None else None
    if latest is not None:
        return f"the latest complete checkpoint is {latest}; run the same command again to resume from it"
    return "no checkpoint was saved; running the same command again starts from step 1"


def _main(argv: list[str] | None, loaded: list, in_main: bool) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = C.load(args.config, args.overrides)
        loaded.append(cfg)
        if args.print_config:
            from ftcluster import checkpoint, hardware, plan

            planned = plan.make(cfg, hardware.here(cfg), resume=checkpoint.resume_of(cfg.run_dir))
            print(json.dumps(plan.resolved_config(cfg, planned), indent=2))
            return 0
        if note := bytecode_note():
            print(note, flush=True)
        try:
            from ftcluster import backends, launch
        except ModuleNotFoundError as e:
            print(f"error: {e.name} is not installed in this Python ({sys.executable}). Run `make install`, then "
                  "either `.venv/bin/python -m ftcluster.train ...` or `source .venv/bin/activate` first.",
                  file=sys.stderr)
            return 2
        if in_main:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # imported: Ctrl-C interrupts as usual now
        try:
            summary = launch.run(cfg, force=args.force, command_started=COMMAND_STARTED)
        except backends.WorkerFailed as e:
            print(f"error: training failed: {headline(str(e))}\n{after_failure(str(e), cfg.run_dir)}",
                  file=sys.stderr)
            return 1
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    if (summary.get("stopped") or "").startswith(stop.DIVERGED):
        kept = f"its last good checkpoint is {summary['checkpoint']}" if summary["checkpoint"] else \
            "it had saved no checkpoint yet"
        print(f"error: training {summary['stopped']}. No final model was written; {kept}. Lower optimizer.lr (or "
              "loosen training.divergence_*) and start under a new output.name.", file=sys.stderr)
        return stop.EXIT_DIVERGED
    if summary.get("stopped"):
        print(f"stopped early at step {summary['final_step']} ({summary['stopped']}); checkpoint: "
              f"{summary['checkpoint']}. Run the same command again to resume.", file=sys.stderr)
        return stop.EXIT_STOPPED
    return 0


if __name__ == "__main__":
    leave(main())
