"""A run saved on N workers resumes on M != N (2 -> 1 and 1 -> 2 gloo ranks on CPU), through the worker's own
path (worker.run): full fine-tuning under ZeRO-0, ZeRO-2 and ZeRO-3, LoRA and QLoRA under ZeRO-2, QLoRA with its
base in layer shards and QLoRA with bitsandbytes' 8-bit paged AdamW; all but ZeRO-0 partition the optimizer state
by worker. The resumed run converts the checkpoint to DeepSpeed's universal checkpoint, keeps the
global batch (accumulation recomputed), continues the schedule and the data order, and its losses follow the
uninterrupted run's; every parameter's optimizer state after the conversion is the one saved, tensor for tensor."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ftcluster import checkpoint, patches, plan as P, worker
from ftcluster import config as C
from ftcluster.cluster import free_port
from ftcluster.hardware import Hardware

pytestmark = pytest.mark.slow
SAVE_AT, STEPS = 3, 6
CASES = {
    "full-zero0": ["method=full", "deepspeed.zero_stage=0"],
    "full-zero2": ["method=full", "deepspeed.zero_stage=2"],
    "full-zero3": ["method=full", "deepspeed.zero_stage=3"],
    "lora": ["method=lora", "deepspeed.zero_stage=2"],
    "qlora": ["method=qlora", "deepspeed.zero_stage=2", "quantization.compute_dtype=float32"],
    # The base in layer shards on 2 workers, whole on 1; the adapters under ZeRO-2 on both.
    "qlora-layer-shards": ["method=qlora", "deepspeed.zero_stage=3", "quantization.compute_dtype=float32"],
    # The recipes' QLoRA optimizer: moments in 8-bit blocks, which another worker count's partitions cut elsewhere.
    "qlora-8bit": ["method=qlora", "deepspeed.zero_stage=2", "quantization.compute_dtype=float32",
                   "optimizer.name=paged_adamw_8bit"],
}
EIGHT_BIT = {"qlora-8bit"}


def _cfg(tiny_model, storage: str, case: str, workers: int, name: str, accumulation: int) -> C.RunConfig:
    """Micro batches of one row: a step's rows are split into the same micro batches on any worker count, so the
    resumed run computes what the uninterrupted one did, up to the order of float32 sums."""
    return C.load(None, [f"model.name_or_path={tiny_model}", "model.dtype=float32", *CASES[case],
                         "data.max_examples=64", "data.max_seq_len=64", "data.eval_fraction=0",
                         "training.micro_batch_size=1", f"training.gradient_accumulation_steps={accumulation}",
                         f"training.max_steps={STEPS}", "training.log_every=1", f"training.save_every={SAVE_AT}",
                         "optimizer.lr=3e-3", "scheduler.name=cosine", "scheduler.warmup_steps=0",
                         "output.checkpoint_at_end=false", "output.keep_checkpoints=5",
                         f"scaling.num_workers={workers}", "scaling.use_gpu=false",
                         f"output.storage_path={storage}", f"output.name={name}"])


def _full_states(engine) -> dict:
    """Every trained parameter's float32 master and Adam moments, whole (collectives under ZeRO-3)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if engine.zero_optimization_stage() == 0:  # the optimizer steps the float32 model itself, whole on every worker
        state = engine.optimizer.state
        return {name: [p.detach().clone(), state[p]["exp_avg"].clone(), state[p]["exp_avg_sq"].clone()]
                for name, p in engine.module.named_parameters() if p.requires_grad}

    zero = engine.optimizer
    if hasattr(zero, "_hp_optimizer_states_linked"):
        # ZeRO-1/2 link each parameter to its moments once, after the first param group's step, before the later
        # groups have any: link them again, now that every group has stepped.
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    if not isinstance(zero.optimizer, torch.optim.AdamW):  # bitsandbytes: its moments dequantized, as AdamW's
        for group, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
            adam = patches.bnb_state_as_adam(zero.optimizer.state[flat])
            for p in group:
                if p._hp_mapping is not None:
                    at = p._hp_mapping.hp_fragment_address
                    p._hp_mapping.optim_fragment = {k: adam[k].narrow(0, at.start, at.numel)
                                                    for k in ("exp_avg", "exp_avg_sq")}
    return {name: [safe_get_full_fp32_param(p).clone()] + [safe_get_full_optimizer_state(p, key).clone()
                                                            for key in ("exp_avg", "exp_avg_sq")]
            for name, p in engine.module.named_parameters() if p.requires_grad}


class Reporter:
    node_id = None

    def __init__(self):
        self.lines = []

    def report(self, record):
        self.lines.append(record)

    def preempted(self):
        return False


def _rank_main(rank: int, world: int, port: int, jobs: list, out: dict) -> None:
    """Each job: (tiny_model, storage, case, name, resume_from or None, the saved run's workers), run by worker.run
    on ``world`` ranks. A resumed run's command is the saved run's with only scaling.num_workers changed."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    real_save, real_restore = checkpoint.save, checkpoint.restore
    for tiny_model, storage, case, name, resume_from, saved_on in jobs:
        cfg = _cfg(tiny_model, storage, case, world, name, accumulation=2 // saved_on)
        if resume_from and rank == 0:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(resume_from, cfg.run_dir / Path(resume_from).name)
        dist.barrier()
        resume = checkpoint.resume_of(cfg.run_dir)
        plan = P.make(cfg, Hardware(device="cpu", device_source="the test"), read_data=False, resume=resume)
        states = {}

        def save(engine, cfg_, progress, directory, kind, tokenizer=None):  # records what is saved, then saves it
            states["saved"] = _full_states(engine)
            return real_save(engine, cfg_, progress, directory, kind, tokenizer)

        def restore(engine, cfg_, directory, universal=False):
            progress = real_restore(engine, cfg_, directory, universal)
            states["restored"] = _full_states(engine)
            states["universal"] = universal
            return progress

        checkpoint.save, checkpoint.restore = save, restore
        try:
            reporter = Reporter()
            worker.run(cfg, plan, rank, world, torch.device("cpu"), reporter)
        finally:
            checkpoint.save, checkpoint.restore = real_save, real_restore
        if rank == 0:
            out[name] = {"losses": {r.step: r.loss for r in reporter.lines if r.loss is not None},
                         "lrs": {r.step: r.lr for r in reporter.lines if r.lr is not None},
                         "accumulation": plan.accumulation, "global_batch": plan.global_batch,
                         "universal": states.get("universal"),
                         "saved": states.get("saved"), "restored": states.get("restored")}
    import deepspeed.comm

    deepspeed.comm.destroy_process_group() if deepspeed.comm.is_initialized() else dist.destroy_process_group()


def _spawn(world: int, jobs: list) -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_main, args=(world, free_port(), jobs, out), nprocs=world)
        return dict(out)


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict:
    """Uninterrupted runs on 2 and on 1 worker (each saving at step 3), then each case resumed from the other
    worker count's checkpoint."""
    storage = str(tmp_path_factory.mktemp("runs"))
    ckpt = lambda name: str(Path(storage) / name / f"checkpoint_step{SAVE_AT:07d}")
    out = _spawn(2, [(tiny_model, storage, c, f"{c}-on2", None, 2) for c in CASES])
    out |= _spawn(1, [(tiny_model, storage, c, f"{c}-on1", None, 1) for c in CASES]
                  + [(tiny_model, storage, c, f"{c}-2to1", ckpt(f"{c}-on2"), 2) for c in CASES])
    out |= _spawn(2, [(tiny_model, storage, c, f"{c}-1to2", ckpt(f"{c}-on1"), 1) for c in CASES])
    return out


@pytest.mark.parametrize("direction", ["2to1", "1to2"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_checkpoint_saved_on_n_workers_resumes_on_m(runs, case, direction):
    saved_on = 2 if direction == "2to1" else 1
    whole, resumed = runs[f"{case}-on{saved_on}"], runs[f"{case}-{direction}"]
    # ZeRO-0 keeps the whole optimizer state on every worker: it loads as saved. The others convert.
    assert resumed["universal"] is (case != "full-zero0")
    # The same command with only scaling.num_workers changed: the plan keeps the saved global batch of 2 rows.
    assert resumed["global_batch"] == whole["global_batch"] == 2 and resumed["accumulation"] == saved_on
    # The optimizer state the resumed workers hold is the one saved, parameter by parameter, tensor for tensor;
    # 8-bit moments, quantized again in blocks of the new partitions, to within the widest step of bitsandbytes'
    # dynamic map (its signed one for the first moment, unsigned for the second) times the block's largest value.
    assert resumed["restored"].keys() == whole["saved"].keys() and whole["saved"]
    for name, (master, *moments) in whole["saved"].items():
        restored_master, *restored_moments = resumed["restored"][name]
        assert torch.equal(master, restored_master), name
        for signed, saved, restored in zip((True, False), moments, restored_moments):
            if case in EIGHT_BIT:
                from bitsandbytes.functional import create_dynamic_map

                widest = create_dynamic_map(signed=signed).sort().values.diff().max()
                assert (saved - restored).abs().max() <= widest * saved.abs().max(), name
            else:
                assert torch.equal(saved, restored), name
    # It goes on from step 4 with the schedule and the rows the uninterrupted run took: the same losses up to the
    # order of float32 sums over two workers or one (1e-4 of the loss here; a row out of place moved it 1e-2). The
    # 8-bit moments' rounding in new blocks stays inside it (1e-5 by step 6).
    steps = range(SAVE_AT + 1, STEPS + 1)
    assert sorted(resumed["losses"]) == list(steps)
    for step in steps:
        assert resumed["losses"][step] == pytest.approx(whole["losses"][step], rel=1e-4), step
        assert resumed["lrs"][step] == pytest.approx(whole["lrs"][step], rel=1e-6), step


def test_the_uninterrupted_runs_agree_across_worker_counts(runs):
    """What the tolerance above stands on: on 2 workers or 1, the same global batch gives the same losses."""
    for case in CASES:
        for step in range(1, STEPS + 1):
            assert runs[f"{case}-on2"]["losses"][step] == pytest.approx(runs[f"{case}-on1"]["losses"][step],
                                                                        rel=1e-4), (case, step)


def test_a_worker_count_that_cannot_keep_the_global_batch_is_refused_with_the_fix(tiny_model, tmp_path):
    cfg = _cfg(tiny_model, str(tmp_path), "lora", 3, "three", accumulation=1)
    resume = P.Resume(checkpoint="x", step=3, workers=2, global_batch=4)
    with pytest.raises(C.ConfigError, match=r"scaling.num_workers=3 .* cannot keep the run's global batch of 4 rows"
                                            r".*scaling.num_workers in \[1, 2, 4\]"):
        P.make(cfg, Hardware(device="cpu", device_source="test"), read_data=False, resume=resume)
    kept = P.make(_cfg(tiny_model, str(tmp_path), "lora", 1, "one", accumulation=1),
                  Hardware(device="cpu", device_source="test"), read_data=False, resume=resume)
    assert (kept.global_batch, kept.accumulation) == (4, 4) and "kept" in kept.reasons["global_batch"]
    assert "converted once to DeepSpeed's universal checkpoint for 1" in kept.reasons["resume_from"]
    assert json.dumps(kept.to_json())
