"""PEFT's fp32 upcast must survive DeepSpeed's engine: its bf16 mode casts every parameter to bf16."""

import pytest
import torch

from ftcluster import config as C
from ftcluster import deepspeed_setup, models
from tests import tiny


@pytest.mark.parametrize("upcast", [False, True])
def test_qlora_norms_keep_the_dtype_chosen_for_them_inside_deepspeed(tiny_model, process_group, upcast):
    cfg = C.load(None, [f"model.name_or_path={tiny_model}", "method=qlora", "deepspeed.zero_stage=2",
                        f"quantization.upcast_non_quantized={upcast}", "training.micro_batch_size=2"])
    model = models.build_model(cfg, tiny.plan_for(cfg), "cpu")
    ds_config = deepspeed_setup.deepspeed_config(cfg, tiny.plan_for(cfg), 1)
    ds, _, _ = deepspeed_setup.initialize(cfg, tiny.plan_for(cfg), model, torch.device("cpu"), ds_config, total_steps=5)
    norm = ds.module.base_model.model.model.norm.weight
    assert norm.dtype == (torch.float32 if upcast else torch.bfloat16)
    losses = tiny.engine_losses(ds, 4)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_zero2_buckets_hold_the_adapters_not_half_a_billion_elements(tiny_model, process_group):
    cfg = C.load(None, [f"model.name_or_path={tiny_model}", "method=lora", "deepspeed.zero_stage=2",
                        "training.micro_batch_size=2"])
    model = models.build_model(cfg, tiny.plan_for(cfg), "cpu")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ds, _, final = deepspeed_setup.initialize(cfg, tiny.plan_for(cfg), model, torch.device("cpu"), deepspeed_setup.deepspeed_config(cfg, tiny.plan_for(cfg), 1),
                                              total_steps=5)
    assert final["zero_optimization"]["reduce_bucket_size"] == trainable < deepspeed_setup.DEFAULT_BUCKET
    assert ds.optimizer.reduce_bucket_size == trainable  # what the engine allocates its two buckets with
    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    ds.backward(ds(input_ids=ids, labels=ids).loss)
    ds.step()


def test_zero3_sizes_its_reduce_bucket_keeps_adapters_whole_and_torchs_linear_under_checkpointing(tiny_model, process_group):
    linear = torch.nn.functional.linear
    # r=8: every LoRA matrix of the tiny model is smaller than its smallest base matrix (k_proj, 2048 elements).
    cfg = C.load(None, [f"model.name_or_path={tiny_model}", "method=lora", "deepspeed.zero_stage=3", "lora.r=8",
                        "deepspeed.zero3_frozen=deepspeed",
                        "model.gradient_checkpointing=true", "training.micro_batch_size=2"])
    ds_config = deepspeed_setup.deepspeed_config(cfg, tiny.plan_for(cfg), 1)
    model = models.build_model(cfg, tiny.plan_for(cfg), "cpu", deepspeed_setup.zero3_partition(tiny.plan_for(cfg), ds_config))
    # zero.Init would have replaced torch.nn.functional.linear, process-wide, with DeepSpeed's Python function.
    assert torch.nn.functional.linear is linear
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    ds, _, final = deepspeed_setup.initialize(cfg, tiny.plan_for(cfg), model, torch.device("cpu"), ds_config, total_steps=5)
    assert final["zero_optimization"]["reduce_bucket_size"] == trainable < deepspeed_setup.DEFAULT_BUCKET
    assert [b.buffer.numel() for b in ds.optimizer.ipg_buckets.values()] == [trainable]  # what it allocated
    # LoRA's matrices stay whole on every rank (no gather or release each layer), the base's are partitioned.
    persistent = {n for n, p in model.named_parameters() if p.ds_persist and p.ds_numel > model.config.hidden_size}
    assert persistent and persistent == {n for n, p in model.named_parameters() if p.requires_grad}
    import deepspeed.utils.nvtx
    assert deepspeed.utils.nvtx.enable_nvtx is False  # no NVTX range around every gather without a profiler
    losses = tiny.engine_losses(ds, 3)
    assert losses[-1] < losses[0]


def test_an_adapter_checkpoint_of_a_model_with_tied_embeddings_holds_no_frozen_weight(tiny_model, process_group,
                                                                                   tmp_path):
    """The output layer tied to the frozen embedding is frozen too, and stays out of the checkpoint (DeepSpeed's
    exclude_frozen_parameters missed it: patches.checkpoints_without_tied_frozen_weights); the resumed run still
    has it, from the base."""
    from ftcluster import checkpoint
    from ftcluster.records import CheckpointKind, Progress

    cfg = C.load(None, [f"model.name_or_path={tiny_model}", "method=lora", "deepspeed.zero_stage=2",
                        "model.random_init=true", "model.config_overrides={tie_word_embeddings: true}",
                        "training.micro_batch_size=2", "output.save_final_model=false"])
    plan = tiny.plan_for(cfg)
    torch.manual_seed(0)
    model = models.build_model(cfg, plan, "cpu")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ds, _, _ = deepspeed_setup.initialize(cfg, plan, model, torch.device("cpu"),
                                          deepspeed_setup.deepspeed_config(cfg, plan, 1), total_steps=5)
    tiny.engine_losses(ds, 2)
    checkpoint.save(ds, cfg, Progress(step=2), tmp_path, CheckpointKind.RESUME)
    saved = torch.load(tmp_path / "deepspeed" / "state" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert saved and all("lora_" in name for name in saved), [n for n in saved if "lora_" not in n]
    torch.manual_seed(0)  # the same random base
    again = models.build_model(cfg, plan, "cpu")
    with torch.no_grad():
        for p in again.parameters():
            if p.requires_grad:
                p.fill_(0.5)  # the checkpoint must bring the trained adapters back
    ds2, _, _ = deepspeed_setup.initialize(cfg, plan, again, torch.device("cpu"),
                                           deepspeed_setup.deepspeed_config(cfg, plan, 1), total_steps=5)
    checkpoint.restore(ds2, cfg, tmp_path)
    for (name, a), b in zip(ds.module.named_parameters(), ds2.module.parameters()):
        assert torch.equal(a, b), name
    assert ds2.module.get_output_embeddings().weight is ds2.module.get_input_embeddings().weight
