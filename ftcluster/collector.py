"""Python's cyclic garbage collector, held off from the command's start to the first optimizer step.

Start-up builds a couple of million objects that live for the whole run: torch's, transformers', Ray's and
DeepSpeed's modules, the model, the compiled graphs. Each full collection walks every one of them, and CPython runs
one each time the long-lived objects grow by a quarter: a 2-step QLoRA run of the embedded model on this project's
2-core CPU machine made ten full collections before its first step, 1.7 s, and 0.35 s of younger ones (counted with
``gc.callbacks``). Held off, the first step ends with one collection of what start-up left, 0.7 s, outside the time
to the first step, and freezes the rest out of the collector's sight for the run (``engine``)."""

from __future__ import annotations

import gc

_held = False


def hold() -> None:
    """Turn the collector off until ``after_first_step()`` or ``release()``; a collector someone else turned off stays
    theirs."""
    global _held
    if gc.isenabled():
        gc.disable()
        _held = True


def after_first_step() -> None:
    """Collect once, freeze what is left (it lives for the run), and turn the collector back on if ``hold()`` turned
    it off."""
    global _held
    gc.collect()
    gc.freeze()
    if _held:
        gc.enable()
        _held = False


def release() -> None:
    """What ``after_first_step()`` froze is the collector's again, and the collector is on if ``hold()`` turned it
    off: after training, after a run that failed before its first step, and in a driver whose workers are Ray's."""
    global _held
    gc.unfreeze()
    if _held:
        gc.enable()
        _held = False
