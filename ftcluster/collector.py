"""Python's full garbage collections, held off from the command's start to the first optimizer step.

Start-up builds a couple of million objects that live for the whole run: torch's, transformers', Ray's and
DeepSpeed's modules, the model, the compiled graphs. Each full collection walks every one of them, and CPython runs
one each time the long-lived objects grow by a quarter: about ten before a run's first step, seconds of its
start-up. Held, the run makes one, after its first step, and freezes what is left out of the collector's sight for
the run (``engine``). docs/design.md has the measurements."""

from __future__ import annotations

import gc

_held: tuple[int, int, int] | None = None
"""The thresholds ``hold()`` replaced, while it holds."""

NEVER = 2**30
"""A full collection's threshold no run reaches: CPython makes one when the count of younger collections since the
last exceeds it (CPython 3.11-3.13; 3.14's incremental collector ignores it)."""


def hold() -> None:
    """No full collection until ``after_first_step()`` or ``release()``. The young generations are still collected,
    so torch's own ``gc.collect(1)`` after each compiled frame walks only what is young, as before (with the
    collector off, everything made since would have stayed young, and each of those collections would walk it). A
    collector someone else turned off stays off."""
    global _held
    if gc.isenabled() and _held is None:
        _held = gc.get_threshold()
        gc.set_threshold(_held[0], _held[1], NEVER)


def after_first_step() -> None:
    """Collect once, freeze what is left (it lives for the run), and let full collections run again."""
    gc.collect()
    gc.freeze()
    _restore()


def release() -> None:
    """What ``after_first_step()`` froze is the collector's again, and full collections run: after training, after a
    run that failed before its first step, and in a driver whose workers are Ray's."""
    gc.unfreeze()
    _restore()


def _restore() -> None:
    global _held
    if _held is not None:
        gc.set_threshold(*_held)
        _held = None
