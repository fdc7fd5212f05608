"""Checkpoints: what one holds, how the workers write one into the run directory and keep the latest few, and how
a worker restores from the latest. One implementation for both backends (in-process and Ray): the run directory is
on storage every node sees, and every worker writes its own files into the checkpoint's directory.

Layout of one checkpoint directory, ``<run_dir>/checkpoint_step<7 digits>``::

    deepspeed/state/...        DeepSpeed engine state: trainable weights (frozen base excluded for adapters),
                               optimizer shards per rank, LR schedule
    progress.json              step, epoch, batch within the epoch, tokens seen (rank 0)
    rng/rank{r}.safetensors    torch (and CUDA) RNG state per rank; rng/rank{r}.json, python's
    hf/                        (final checkpoints) the adapter or model in Hugging Face format + run.yaml
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from ftcluster import patches, sources
from ftcluster.config import RunConfig, save_resolved
from ftcluster.plan import Resume
from ftcluster.records import CheckpointKind, Progress

TAG = "state"
BASE_RECORD = "base.json"
"""Beside an adapter in Hugging Face format: the base weights it was trained on (``sources.base_identity``)."""


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


PATTERN = re.compile(r"checkpoint_step(\d{7})")


def name(step: int) -> str:
    return f"checkpoint_step{step:07d}"


def saved(run_dir: Path) -> list[Path]:
    """The run directory's checkpoints, oldest step first."""
    found = [(int(m.group(1)), d) for d in Path(run_dir).iterdir() if d.is_dir() and (m := PATTERN.fullmatch(d.name))]
    return [d for _, d in sorted(found)]


MANIFEST = "manifest.json"
PARTIAL = ".partial"
"""The suffix of a checkpoint being written (``.<name>.partial``), renamed to its name once whole."""


def _files(directory: Path) -> dict[str, int]:
    """Every regular file under ``directory`` (links not followed), by relative path, with its size."""
    return {str(f.relative_to(directory)): f.stat().st_size for f in sorted(Path(directory).rglob("*"))
            if f.is_file() and not f.is_symlink()}


def problem(directory: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a file missing or not the size it was saved with, its progress
    unreadable), or None. A checkpoint holds the manifest of its files (:func:`keep`); one of an earlier version,
    without a manifest, is checked for its progress and DeepSpeed state only."""
    directory = Path(directory)
    try:
        progress_of(directory)
    except (OSError, ValueError) as e:
        return f"its progress.json cannot be read ({type(e).__name__}: {e})"
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return None if (directory / "deepspeed").is_dir() else "it holds no deepspeed/ state"
    try:
        expected = json.loads(manifest.read_text())
    except ValueError as e:
        return f"its {MANIFEST} cannot be read ({e})"
    for rel, size in expected.items():
        f = directory / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} is {f.stat().st_size:,} bytes, {size:,} when saved"
    return None


def latest(run_dir: Path) -> Path | None:
    """The latest step's checkpoint in the run directory that can be resumed from (what a resumed run restores),
    or None."""
    found = saved(run_dir) if Path(run_dir).is_dir() else []
    return next((d for d in reversed(found) if problem(d) is None), None)


def set_aside_unusable(run_dir: Path) -> list[str]:
    """Rename every checkpoint newer than the latest usable one, and unusable (:func:`problem`), to
    ``<name>.unusable``, where neither a resume nor the keeping of the latest checkpoints counts it, and nothing of
    it is deleted. Returns a line for each, saying why and what the run resumes from."""
    found = saved(run_dir) if Path(run_dir).is_dir() else []
    usable = latest(run_dir)
    lines = []
    for d in found:
        if usable is not None and d.name <= usable.name:
            continue
        why = problem(d)
        aside = d.with_name(f"{d.name}.unusable")
        shutil.rmtree(aside, ignore_errors=True)
        d.rename(aside)
        lines.append(f"checkpoint {d.name} cannot be resumed from: {why}. Set aside as {aside.name}; the run "
                     f"resumes from {usable.name if usable else 'step 0 (no earlier checkpoint)'}.")
    return lines


def progress_of(directory: Path) -> dict:
    """A checkpoint's progress.json, as written."""
    return json.loads((Path(directory) / "progress.json").read_text())


def resume_of(run_dir: Path) -> Resume | None:
    """The run directory's latest checkpoint, as the plan of a resumed run takes it, or None."""
    found = latest(run_dir)
    if found is None:
        return None
    p = progress_of(found)
    return Resume(checkpoint=str(found), step=p.get("step", 0), workers=p.get("workers") or None,
                  global_batch=p.get("global_batch") or None)


UNIVERSAL = "universal"


def to_universal(directory: Path, optimizer: str = "adamw") -> Path:
    """The checkpoint's DeepSpeed state as a universal checkpoint (``deepspeed.checkpoint.ds_to_universal``): every
    parameter's weights and optimizer state whole, from which any number of workers takes its own partitions. Made
    once, beside the checkpoint's own state, under a temporary name renamed into place. ``optimizer``: the run's
    ``optimizer.name``; a bitsandbytes optimizer's states are handed to the converter as the AdamW moments they
    stand for (``patches.bnb_state_as_adam``), since 8-bit blocks cut at one worker count's partitions do not
    fit another's. Returns the directory to load from."""
    import argparse
    import os

    from deepspeed.checkpoint import ds_to_universal

    out = Path(directory) / UNIVERSAL
    if (out / "latest_universal").is_file():
        return out
    partial = Path(directory) / f".{UNIVERSAL}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    source = Path(directory) / "deepspeed" / TAG
    try:
        if optimizer != "adamw":
            source = _as_adam(source, partial / "adam")
        args = argparse.Namespace(input_folder=str(source), output_folder=str(partial / TAG),
                                  num_extract_workers=max(1, min(4, os.cpu_count() or 1)), num_merge_workers=1,
                                  keep_temp_folder=False, strict=True,
                                  # A model that names no tensor-parallel layout (every Hugging Face one here) says
                                  # nothing of it: the converter records that it has none.
                                  inject_missing_state=True)
        ds_to_universal.main(args)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(partial / "adam", ignore_errors=True)
    (partial / "latest_universal").write_text(TAG)
    partial.rename(out)
    return out


def _as_adam(source: Path, into: Path) -> Path:
    """A copy of DeepSpeed's state in ``source`` whose optimizer files hold AdamW moments
    (``patches.bnb_state_as_adam``); the model files are linked, not copied."""
    into.mkdir(parents=True)
    for f in source.iterdir():
        if not f.name.endswith("optim_states.pt"):
            (into / f.name).symlink_to(f.resolve())
            continue
        sd = torch.load(f, map_location="cpu", weights_only=False)
        outer = sd["optimizer_state_dict"]
        base = outer.get("base_optimizer_state") or outer["optimizer_state_dict"]  # ZeRO-1/2, ZeRO-3
        base["state"] = {k: patches.bnb_state_as_adam(v) for k, v in base["state"].items()}
        torch.save(sd, into / f.name)
    return into


def universal_for(directory: Path, optimizer: str = "adamw") -> None:
    """:func:`to_universal` made by the first worker while the others wait (all call it)."""
    if _rank() == 0:
        to_universal(directory, optimizer)
    _barrier()


def keep(run_dir: Path, step: int, write: Callable[[Path], None], keep_last: int) -> Path:
    """Write a checkpoint of ``step`` into the run directory; every worker calls it, and ``write(directory)`` writes
    this worker's part. The directory is filled under a temporary name and renamed into place once every worker
    has written, so a directory of the checkpoint's name is always whole; then only the ``keep_last`` latest are
    kept. Returns the checkpoint's directory."""
    run_dir = Path(run_dir)
    final = run_dir / name(step)
    partial = run_dir / f".{final.name}{PARTIAL}"
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)  # a partial one a failed attempt left
        partial.mkdir(parents=True)
    _barrier()
    try:
        write(partial)
    except BaseException as e:
        full = isinstance(e, Exception) and disk_full(run_dir, e)
        if _rank() == 0:  # a half-written checkpoint is never left for a resume to find, nor to fill the disk
            shutil.rmtree(partial, ignore_errors=True)
        if full:
            intact = latest(run_dir)
            raise OSError(errno.ENOSPC, f"No space left on the disk of {run_dir} while writing the checkpoint of "
                          f"step {step}; its partial files were removed, and "
                          + (f"the latest intact checkpoint is {intact}" if intact else "no earlier checkpoint was "
                             "saved") + ". Free space there, or set output.storage_path to a larger disk (or "
                          "output.keep_checkpoints lower), then run the same command again to resume.") from e
        raise
    _barrier()
    if _rank() == 0:
        (partial / MANIFEST).write_text(json.dumps(_files(partial), indent=1) + "\n")
        if final.exists():  # a step saved again (a stop checkpoint at the step a periodic one took)
            shutil.rmtree(final)
        partial.rename(final)
        for old in saved(run_dir)[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def remove_partial(run_dir: Path) -> None:
    """Remove what a failed save left of a checkpoint (its workers are gone): a worker still writing when another
    had failed and removed it can leave one behind."""
    for d in Path(run_dir).glob(f".{name(0)[:-7]}*{PARTIAL}"):
        shutil.rmtree(d, ignore_errors=True)


def disk_full(directory: Path, error: Exception) -> bool:
    """Whether ``error``, raised while writing under ``directory``, came from a full disk (or quota): an ENOSPC or
    EDQUOT in its chain, or, since torch's writer reports a short write only as "unexpected pos", no room left
    there for one more MiB."""
    e: BaseException | None = error
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    probe = Path(directory) / f".space-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(bytes(2**20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    finally:
        probe.unlink(missing_ok=True)
    return False


def save_hf(engine, cfg: RunConfig, out: Path, tokenizer=None) -> None:
    """The trained adapter or model in Hugging Face format. Under ZeRO-3 only the trainable parameters are
    gathered for an adapter (a few MB), never the whole model (peft#453); full models are gathered one module at
    a time by DeepSpeed."""
    model = engine.module
    rank = _rank()
    if cfg.trains_adapter:
        if engine.zero_optimization_partition_weights():
            import deepspeed

            trainable = [p for p in model.parameters() if p.requires_grad]
            with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
                if rank == 0:
                    model.save_pretrained(out)
        elif rank == 0:
            model.save_pretrained(out)
    else:
        state = patches.zero3_full_state_dict(engine) if engine.zero_optimization_partition_weights() else None
        if rank == 0:
            model.save_pretrained(out, state_dict=state)
    if rank == 0:
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        save_resolved(cfg, out / "run.yaml")
        if cfg.trains_adapter and not cfg.model.random_init:  # what merge checks it merges the adapter into
            (out / BASE_RECORD).write_text(json.dumps(sources.base_identity(cfg.model), indent=2) + "\n")


def export(engine, cfg: RunConfig, step: int, tokenizer=None) -> Path:
    """The model at ``step`` in Hugging Face format, without optimizer state (``training.export_every``), in
    ``<run_dir>/exports/step<7 digits>/``: written aside and renamed into place, so a reader never sees half of
    one. Every worker calls it (under ZeRO-3 the weights are gathered)."""
    out = cfg.run_dir / "exports" / f"step{step:07d}"
    tmp = out.with_name(out.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    save_hf(engine, cfg, tmp, tokenizer)
    _barrier()
    if _rank() == 0:
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def _save_rng(stem: Path) -> None:
    """This rank's RNG states in files that hold data only (safetensors and JSON): restoring never runs code
    from the run directory, as unpickling would."""
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    version, state, gauss = random.getstate()
    stem.with_suffix(".json").write_text(json.dumps({"python": [version, list(state), gauss]}))


def _restore_rng(stem: Path) -> None:
    from safetensors.torch import load_file

    if stem.with_suffix(".safetensors").exists():
        tensors = load_file(str(stem.with_suffix(".safetensors")))
        version, state, gauss = json.loads(stem.with_suffix(".json").read_text())["python"]
        python, cuda = (version, tuple(state), gauss), [tensors[f"cuda{i}"] for i in range(len(tensors) - 1)]
        torch_state = tensors["torch"]
    elif stem.with_suffix(".pt").exists():  # checkpoints of earlier versions: tensors, tuples and ints only
        old = torch.load(stem.with_suffix(".pt"), weights_only=True)
        python, torch_state, cuda = old["python"], old["torch"], old["cuda"] or []
    else:
        return
    random.setstate(python)
    torch.set_rng_state(torch_state)
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save(engine, cfg: RunConfig, progress: Progress, directory: Path, kind: CheckpointKind, tokenizer=None) -> None:
    """Write this worker's part of a checkpoint into ``directory`` (all workers call it)."""
    directory = Path(directory)
    engine.save_checkpoint(str(directory / "deepspeed"), tag=TAG, exclude_frozen_parameters=cfg.trains_adapter)
    rank = _rank()
    (directory / "rng").mkdir(exist_ok=True)
    _save_rng(directory / "rng" / f"rank{rank}")
    if rank == 0:
        (directory / "progress.json").write_text(json.dumps(asdict(progress)))
    if kind is CheckpointKind.FINAL and cfg.output.save_final_model:
        save_hf(engine, cfg, directory / "hf", tokenizer)


def restore(engine, cfg: RunConfig, directory: Path, universal: bool = False) -> Progress:
    """Load engine state, RNG and progress from a checkpoint directory; training continues at the saved step.
    ``universal``: from its universal form (:func:`to_universal`), which the engine was configured to load."""
    directory = Path(directory)
    # Adapters were saved without the frozen base, so the module state is loaded non-strictly; the base is
    # already in place from the model builder (peft#746).
    _, client = engine.load_checkpoint(str(directory / (UNIVERSAL if universal else "deepspeed")), tag=TAG,
                                       load_module_strict=not cfg.trains_adapter)
    if client is None:
        raise RuntimeError(f"checkpoint {directory} holds no DeepSpeed state for this run (different ZeRO layout?)")
    if universal and cfg.optimizer.name != "adamw":
        patches.bnb_state_from_adam(engine.optimizer.optimizer)
    _restore_rng(directory / "rng" / f"rank{_rank()}")
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return Progress.from_json(json.loads((directory / "progress.json").read_text()), cfg.training.micro_batch_size,
                              world)
