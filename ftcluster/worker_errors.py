"""Where a failed worker's traceback goes, and how the failure reads to the user.

A worker's whole traceback is kept in ``<run_dir>/worker_errors/rank<r>.txt`` (one block per failure, with its
time; a run restarted after a failure appends), and the terminal gets one line per distinct error with the ranks
that raised it. Ray Train logs each worker's traceback to the driver's terminal and puts them all in the error it
raises: with several workers the user read the same traceback several times above the one line that said what to
do (patches.ray_train_error_to_file keeps Ray Train's record to its last line)."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

DIRECTORY = "worker_errors"


def keep(run_dir: Path, rank: int, traceback_text: str) -> Path | None:
    """Append a worker's traceback to its file; None where it cannot be written (a full disk: the caller shows it
    whole instead)."""
    path = Path(run_dir) / DIRECTORY / f"rank{rank}.txt"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n{traceback_text.rstrip()}\n")
    except OSError:
        return None
    return path


def summary(failures: dict[int, BaseException], run_dir: Path) -> str:
    """One line per distinct error, ``TypeName: message (ranks 0, 1)``, and where the tracebacks are when the workers
    kept any."""
    ranks = defaultdict(list)
    for rank, error in sorted(failures.items()):
        ranks[f"{type(error).__name__}: {error}"].append(rank)
    lines = [f"{text} (rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))})" for text, r in ranks.items()]
    kept = Path(run_dir) / DIRECTORY
    if kept.is_dir():
        lines.append(f"the workers' tracebacks: {kept}/")
    return "\n".join(lines)
