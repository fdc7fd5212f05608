"""Every shipped recipe, shrunk to the tiny model on CPU: the worker builds what the run's plan says. What was built
is read back from the engine and the model (ftcluster.built), not from the plan, and a recipe of several workers
runs on two gloo ranks. tests/gpu/test_recipes.py does the same on a GPU, where compiled layers and Liger apply."""

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ftcluster import built, layer_shards, worker
from ftcluster import config as C
from ftcluster.cluster import free_port
from tests import tiny

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(str(p.relative_to(REPO)) for p in [*REPO.glob("configs/*.yaml"), *REPO.glob("configs/bench/*.yaml")])
CHECKED = ("zero_stage", "frozen_base", "compile", "liger_layers", "loss", "attention", "checkpointed_layers",
           "recompute_only", "keep_recomputed_weights", "quant_storage")


def shrunk(recipe: str, tiny_model, storage, workers: int | None = None) -> C.RunConfig:
    """The recipe on the tiny model and the builtin data, on CPU: its method, ZeRO stage, checkpointing, LoRA,
    quantization and optimizer settings kept; its workers capped at two."""
    cfg = C.load(REPO / recipe)
    overrides = [f"model.name_or_path={tiny_model}", "model.config_overrides={}", "model.random_init=false",
                 "data.source=builtin:pydoc", "data.max_examples=48", "data.max_seq_len=64", "data.streaming=auto",
                 "training.micro_batch_size=1", "training.gradient_accumulation_steps=1",
                 f"scaling.num_workers={workers or min(cfg.scaling.num_workers, 2)}", "scaling.use_gpu=false",
                 f"output.storage_path={storage}", f"output.name={Path(recipe).stem}"]
    return C.load(REPO / recipe, overrides)


def _rank_main(rank: int, world: int, tiny_model, storage: str, recipes: list[str], port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    layer_shards.MIN_OUTSIDE_BYTES = 4096  # the tiny model's embedding would otherwise stay whole
    for recipe in recipes:
        cfg = shrunk(recipe, tiny_model, storage, world)
        plan = tiny.plan_for(cfg)
        try:
            loop, _ = worker.setup(cfg, plan, rank, world, torch.device("cpu"))  # checks what it built
        except RuntimeError as e:
            out[(recipe, rank)] = {"error": str(e)}
            continue
        observed = built.observe(loop.engine.module, loop.engine)
        out[(recipe, rank)] = {"observed": observed, "planned": {k: getattr(plan, k) for k in CHECKED}}
        del loop
    import deepspeed.comm

    deepspeed.comm.destroy_process_group() if deepspeed.comm.is_initialized() else dist.destroy_process_group()


def test_every_recipe_builds_what_its_plan_says(tiny_model, tmp_path):
    groups: dict[int, list[str]] = {}
    for recipe in RECIPES:
        groups.setdefault(min(C.load(REPO / recipe).scaling.num_workers, 2), []).append(recipe)
    results = {}
    for world, recipes in sorted(groups.items()):
        with mp.Manager() as manager:
            out = manager.dict()
            mp.spawn(_rank_main, args=(world, tiny_model, str(tmp_path), recipes, free_port(), out), nprocs=world)
            results.update(dict(out))
    assert {recipe for recipe, _ in results} == set(RECIPES)
    for (recipe, rank), r in sorted(results.items()):
        assert "error" not in r, (recipe, rank, r.get("error"))
        assert r["observed"] == r["planned"], (recipe, rank)
    planned = [r["planned"] for r in results.values()]
    # The recipes cover the decisions that matter on CPU: every frozen-base placement, both ZeRO stages DeepSpeed
    # runs for them, checkpointing on and off, 4-bit storage in bytes and in the compute dtype.
    assert {p["frozen_base"] for p in planned} >= {None, "whole", "layer-shards"}
    assert {p["zero_stage"] for p in planned} >= {2, 3}
    assert {p["checkpointed_layers"] for p in planned} >= {0, 2}
    assert {p["quant_storage"] for p in planned} >= {None, "uint8", "bfloat16"}


def test_a_builder_that_departs_from_the_plan_is_caught(tiny_model, tmp_path, process_group):
    """The check compares the built objects with the plan: a plan that says compiled layers, over a model built
    without them, is refused before any step."""
    cfg = shrunk("configs/smollm2_135m_lora.yaml", tiny_model, tmp_path, workers=1)
    plan = tiny.plan_for(cfg)
    loop, _ = worker.setup(cfg, plan, 0, 1, torch.device("cpu"))
    with pytest.raises(RuntimeError, match=r"compile: built False, planned True"):
        built.check(replace(plan, compile=True), loop.engine.module, loop.engine)
    with pytest.raises(RuntimeError, match=r"zero_stage: built 2, planned 3"):
        built.check(replace(plan, zero_stage=3), loop.engine.module, loop.engine)
