"""ZeRO-3 with the frozen base partitioned by whole layers (ftcluster/layer_shards.py): two gloo ranks on CPU run
the worker's own set-up and step loop, for a 16-bit (LoRA) and a 4-bit (QLoRA) base.

- Each rank holds half of the base's bytes after the build, after every step, after evaluation and after a
  checkpoint save, with nothing left gathered; during a forward at most the layer computing, the next one and the
  output layer are gathered.
- The run computes what DeepSpeed's own ZeRO-3 computes from the same seed (the losses agree), and what ZeRO-2
  with a whole base on every rank computes.
- The adapter saved at the end is whole."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ftcluster import checkpoint, engine, layer_shards, worker
from ftcluster import config as C
from ftcluster.cluster import free_port
from ftcluster.records import CheckpointKind, Progress
from tests import tiny

WORLD = 2
LAYERS = 6


def _cfg(tiny_model, method: str, mode: str, storage: str, tied: bool, stage: int = 3, workers: int = WORLD):
    return C.load(None, [f"scaling.num_workers={workers}",
        f"model.name_or_path={tiny_model}", f"method={method}", "model.random_init=true",
        f"model.config_overrides={{num_hidden_layers: {LAYERS}, tie_word_embeddings: {str(tied).lower()}}}", "model.gradient_checkpointing=true",
        f"deepspeed.zero_stage={stage}", f"deepspeed.zero3_frozen={mode}", "data.max_examples=96",
        "data.max_seq_len=64", "data.eval_fraction=0.2", "training.micro_batch_size=2", "training.max_steps=3",
        "training.log_every=1", "training.eval_batches=2", "training.seed=7", f"output.storage_path={storage}",
        # Two micro batches a step, and an evaluation between steps that training goes on after.
        "training.gradient_accumulation_steps=2", "training.eval_every=2",
        f"output.name={method}-{mode}-{stage}", "optimizer.lr=3e-3",
        # The 70B recipe's combination: each layer's input kept in host memory while the layers are sharded.
        f"model.activation_offloading={str(method == 'qlora').lower()}"])


class GatheredDuringForward:
    """The most units gathered at once while a training forward runs (counted at each layer's start)."""

    def __init__(self, model, shards):
        self.shards, self.peak = shards, 0
        for unit in shards.layers:
            unit.module.register_forward_pre_hook(self._count)

    def _count(self, *_):
        if torch.is_grad_enabled():
            self.peak = max(self.peak, sum(u.full is not None or u._work is not None for u in self.shards.units))


def _run(cfg, rank: int) -> dict:
    loop, tokenizer = worker.setup(cfg, tiny.plan_for(cfg), rank, WORLD, torch.device("cpu"))
    shards = layer_shards.of(loop.engine.module)
    progress = Progress()
    if shards is None:
        losses = []
        engine.train(loop, progress, engine.Hooks(lambda record, kind: losses.append(record.loss)))
        return {"losses": losses}
    gathered = GatheredDuringForward(loop.engine.module, shards)

    def held() -> dict:
        return {"bytes": shards.held_bytes(), "gathered": [u.name for u in shards.units if u.full is not None],
                "nonempty": [p.full_shape for u in shards.units for p in u.params if p.data.numel()]}

    losses, states = tiny.train_recording(loop, cfg, tokenizer, progress, held)
    with tempfile.TemporaryDirectory() as d:
        checkpoint.save(loop.engine, cfg, progress, d, CheckpointKind.FINAL, tokenizer=tokenizer)
        from safetensors.torch import load_file

        adapter = load_file(os.path.join(d, "hf", "adapter_model.safetensors")) if rank == 0 else {}
    return {"losses": losses, "states": states, "full": shards.full_bytes(), "units": len(shards.units),
            "layers": len(shards.layers), "largest_unit": max(u.full_bytes for u in shards.units),
            "peak_units_gathered": gathered.peak,
            "adapter_shapes": sorted((k, tuple(v.shape), bool(v.abs().sum() > 0)) for k, v in adapter.items())}


def _adopted(cfg) -> dict:
    """A model loaded whole (as from a hub id), then partitioned: the same loss, forward and backward, from half
    the bytes."""
    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(cfg.training.seed)
    model = tiny.base_for(cfg)
    want = model(input_ids=ids, labels=ids).loss.item()
    shards = layer_shards.LayerShards()
    shards.adopt(model)
    shards.finish(model)
    model.requires_grad_(False)
    model.get_output_embeddings().weight.requires_grad_(False)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()  # the input embeddings require grad (finish): backward runs through every layer
    return {"want": want, "got": loss.item(), "held": shards.held_bytes(), "full": shards.full_bytes(),
            "gathered": [u.name for u in shards.units if u.full is not None]}


def _rank_main(rank: int, tiny_model, method: str, tied: bool, port: int, storage: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    # The tiny model's embedding and output layer are a few kB: partition them too, as a real model's are.
    layer_shards.MIN_OUTSIDE_BYTES = 4096
    runs = {"layers": _run(_cfg(tiny_model, method, "layers", storage, tied), rank),
            "deepspeed": _run(_cfg(tiny_model, method, "deepspeed", storage, tied), rank),
            "zero2": _run(_cfg(tiny_model, method, "auto", storage, tied, stage=2), rank),
            "adopted": _adopted(_cfg(tiny_model, method, "layers", storage, tied))}
    out[rank] = runs
    dist.destroy_process_group()


@pytest.mark.parametrize("method, tied", [("lora", True), ("qlora", False)])
def test_layer_shards_hold_half_the_base_and_train_as_deepspeed_zero3_does(tiny_model, tmp_path, method, tied):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_main, args=(tiny_model, method, tied, free_port(), str(tmp_path), out), nprocs=WORLD)
        results = dict(out)
    for rank, runs in results.items():
        r = runs["layers"]
        # One unit a decoder layer, and the embedding; the output layer too unless it is the embedding's weight.
        assert r["layers"] == LAYERS and r["units"] == LAYERS + (1 if tied else 2)
        assert {"build", "step 2 eval", "step 3 eval", "step 3 saved"} <= set(r["states"])
        for when, state in r["states"].items():
            # Nothing gathered between steps, and a rank holds its half (each shard padded to 256 bytes a rank).
            assert state["gathered"] == [] and state["nonempty"] == [], when
            assert r["full"] / WORLD <= state["bytes"] <= r["full"] / WORLD + 2 * 256 * WORLD * r["units"], when
        # A forward holds the layer computing and the next one queued, not the model.
        assert 1 <= r["peak_units_gathered"] <= 2
        # Same seed, same rows, same numbers as DeepSpeed's ZeRO-3 and as ZeRO-2 with the whole base everywhere.
        assert r["losses"] == pytest.approx(runs["deepspeed"]["losses"], rel=2e-3)
        assert r["losses"] == pytest.approx(runs["zero2"]["losses"], rel=2e-3)
        assert r["losses"][-1] < r["losses"][0]
        adopted = runs["adopted"]
        assert adopted["got"] == pytest.approx(adopted["want"], rel=1e-4) and adopted["gathered"] == []
        assert adopted["held"] <= adopted["full"] / WORLD + 2 * 256 * WORLD * r["units"]
        if rank == 0:
            # The adapter is whole and trained: LoRA's A and B on every targeted layer, B no longer zero.
            assert len(r["adapter_shapes"]) == 2 * LAYERS * 7
            assert all(nonzero for _, _, nonzero in r["adapter_shapes"])


def _one_worker_main(rank: int, tiny_model, port: int, storage: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    layer_shards.MIN_OUTSIDE_BYTES = 4096
    runs = {}
    for name, stage in (("zero3", 3), ("zero2", 2)):
        cfg = _cfg(tiny_model, "qlora", "auto", storage, tied=False, stage=stage, workers=1)
        plan = tiny.plan_for(cfg)
        loop, _ = worker.setup(cfg, plan, 0, 1, torch.device("cpu"))
        model = loop.engine.module
        losses = []
        engine.train(loop, Progress(), engine.Hooks(lambda record, kind: losses.append(record.loss)))
        runs[name] = {"shards": layer_shards.of(model) is not None, "stage": loop.engine.zero_optimization_stage(),
                      "empty": [n for n, p in model.named_parameters() if p.numel() == 0], "losses": losses,
                      "whole_on_one": plan.frozen_base == "whole"}
    out[0] = runs
    dist.destroy_process_group()


def test_zero3_for_adapters_on_one_worker_keeps_the_base_whole_and_runs_as_zero2(tiny_model, tmp_path):
    """With no other rank to hold a shard, ZeRO-3 for LoRA/QLoRA keeps the frozen base whole and DeepSpeed runs
    the adapters under ZeRO-2: no layer is gathered (copied) before use, and the run is ZeRO-2's."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_one_worker_main, args=(tiny_model, free_port(), str(tmp_path), out), nprocs=1)
        runs = out[0]
    z3, z2 = runs["zero3"], runs["zero2"]
    assert z3["whole_on_one"] and not z3["shards"] and z3["stage"] == 2 and z3["empty"] == []
    assert z3["losses"] == pytest.approx(z2["losses"], rel=1e-5)
