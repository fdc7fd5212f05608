import json

import pytest
import torch

from ftcluster import config as C
from ftcluster import deepspeed_setup, engine, metrics, optim
from tests import tiny


def ds_config(cfg, world):
    return deepspeed_setup.deepspeed_config(cfg, tiny.plan_for(cfg), world)


def test_deepspeed_config_follows_ours():
    cfg = C.load(None, ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu", "deepspeed.offload_param=cpu",
                        "training.micro_batch_size=4", "training.gradient_accumulation_steps=8",
                        "training.max_grad_norm=0.5"])
    ds = deepspeed_setup.deepspeed_config(cfg, tiny.plan_for(cfg), world_size=16)
    assert ds["train_batch_size"] == 4 * 8 * 16 and ds["gradient_clipping"] == 0.5
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["stage3_gather_16bit_weights_on_model_save"] is False
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["type"] == "AdamW"  # CPU offload steps with DeepSpeed's CPU Adam


def test_user_json_then_overrides_are_merged_over_the_generated_config(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "wall_clock_breakdown": True}))
    cfg = C.load(None, [f"deepspeed.config_file={f}", "deepspeed.zero_stage=1",
                        "deepspeed.overrides={zero_optimization: {stage: 1, overlap_comm: false}}"])
    ds = deepspeed_setup.deepspeed_config(cfg, tiny.plan_for(cfg), 1)
    z = ds["zero_optimization"]
    assert z["reduce_bucket_size"] == 1000 and z["stage"] == 1 and z["contiguous_gradients"] is True
    assert z["overlap_comm"] is False
    assert ds["wall_clock_breakdown"] is True


def test_zero2_overlaps_gradient_reduction_only_where_the_gradients_fill_several_buckets(tmp_path):
    """Adapters' gradients fit one bucket, reduced after the last one arrives: overlap_comm would only add a
    device-wide synchronize and a side stream (7B LoRA on 2 GPUs: 0.38 s a step with it, 0.31-0.33 without)."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    model[0].requires_grad_(False)  # "frozen base"; 64 * 8 + 8 = 520 trainable elements
    adapters = C.load(None, ["deepspeed.zero_stage=2"])
    z = deepspeed_setup.tuned_config(adapters, deepspeed_setup.deepspeed_config(adapters, tiny.plan_for(adapters), 2), model)["zero_optimization"]
    assert z["reduce_bucket_size"] == 520 and z["overlap_comm"] is False
    # More trainable elements than a bucket holds: several reductions, each overlapping the rest of backward.
    small = C.load(None, ["deepspeed.zero_stage=2", "deepspeed.overrides={zero_optimization: {reduce_bucket_size: 100}}"])
    z = deepspeed_setup.tuned_config(small, deepspeed_setup.deepspeed_config(small, tiny.plan_for(small), 2), model)["zero_optimization"]
    assert z["reduce_bucket_size"] == 100 and z["overlap_comm"] is True
    # The user's own setting wins.
    forced = C.load(None, ["deepspeed.zero_stage=2", "deepspeed.overrides={zero_optimization: {overlap_comm: true}}"])
    z = deepspeed_setup.tuned_config(forced, deepspeed_setup.deepspeed_config(forced, tiny.plan_for(forced), 2), model)["zero_optimization"]
    assert z["overlap_comm"] is True


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays_to_the_floor(name):
    cfg = C.load(None, [f"scheduler.name={name}", "scheduler.warmup_steps=10", "scheduler.min_lr_ratio=0.1"])
    f = optim.lr_lambda(cfg, total_steps=110)
    assert f(0) < f(5) < f(10) == 1.0
    if name == "constant":
        assert f(109) == 1.0
    else:
        assert f(60) < 1.0 and abs(f(110) - 0.1) < 1e-9


def test_total_steps_from_epochs_or_max_steps():
    cfg = C.load(None, ["training.epochs=3", "training.gradient_accumulation_steps=4"])
    assert optim.total_optimizer_steps(cfg, tiny.plan_for(cfg), batches_per_epoch=40) == 30
    cfg = C.load(None, ["training.max_steps=7"])
    assert optim.total_optimizer_steps(cfg, tiny.plan_for(cfg), batches_per_epoch=2) == 7
    cfg = C.load(None, ["training.gradient_accumulation_steps=8"])
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        optim.total_optimizer_steps(cfg, tiny.plan_for(cfg), 4)


def test_flops_per_token_full_is_6n_and_lora_about_4n_with_causal_attention():
    n, layers, d, s = 6_738_415_616, 32, 4096, 2048
    attention = 6 * layers * s * d  # half of the full s x s attention's 12·L·s·d: the causal kernels' work
    assert metrics.train_flops_per_token(n, layers, d, s, "full") == 6 * n + attention
    assert metrics.train_flops_per_token(n, layers, d, s, "lora", 4_194_304) == 4 * n + 2 * 4_194_304 + attention
    # At 64k tokens attention is most of the work: counted whole, a long-context run's MFU was two thirds too high.
    long = metrics.train_flops_per_token(n, layers, d, 65_536, "qlora", 40_000_000)
    assert (4 * n + 2 * 40_000_000 + 12 * layers * 65_536 * d) / long > 1.6


def test_mfu_is_against_the_gpus_dense_bf16_datasheet_peak():
    import torch

    peak = metrics.datasheet_peak_flops
    assert peak("NVIDIA H100 80GB HBM3") == peak("NVIDIA H200") == 989e12
    assert peak("NVIDIA H100 PCIe") == 756e12 and peak("NVIDIA H100 NVL") == 835e12
    assert peak("NVIDIA A100-SXM4-80GB") == 312e12 and peak("NVIDIA L40S") == 362e12 and peak("NVIDIA L4") == 121e12
    assert peak("NVIDIA H100 80GB HBM3", torch.float32) is None  # the table is of 16-bit tensor-core peaks
    assert peak("Some Future GPU") is None


def test_profiler_writes_an_operator_table_for_the_profiled_steps(tmp_path):
    import torch

    cfg = C.load(None, ["training.profile_steps=2", f"output.storage_path={tmp_path}", "output.name=p"])
    cfg.run_dir.mkdir(parents=True)
    prof = engine.step_profiler(cfg, torch.device("cpu"))
    x = torch.randn(64, 64)
    for _ in range(5):
        (x @ x).sum()
        prof.step()
    prof.stop()
    table = (cfg.run_dir / "profile_rank0.txt").read_text()
    assert "aten::mm" in table


def test_the_fp32_upcast_turns_off_deepspeeds_16bit_cast():
    assert ds_config(C.load(None, ["method=qlora"]), 1)["bf16"]["enabled"] is True
    ds = ds_config(C.load(None, ["method=qlora", "quantization.upcast_non_quantized=true"]), 1)
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False


def _meta_llama(**shape):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(LlamaConfig(**shape))


def test_zero3_schedule_is_derived_from_the_layer_size_and_the_users_settings_win():
    model = _meta_llama(hidden_size=256, intermediate_size=688, num_hidden_layers=3, num_attention_heads=8,
                        num_key_value_heads=2, vocab_size=1000)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    z = deepspeed_setup.zero3_schedule(model)
    assert z["leaf_module"] == {"classes": ["LlamaDecoderLayer"]}
    assert z["stage3_prefetch_bucket_size"] == z["stage3_max_reuse_distance"] == layer
    assert z["stage3_max_live_parameters"] == 3 * layer and z["stage3_param_persistence_threshold"] == 256

    cfg = C.load(None, ["deepspeed.zero_stage=3", "deepspeed.overrides={zero_optimization: "
                        "{stage3_max_live_parameters: 123, leaf_module: {classes: []}}}"])
    tuned = deepspeed_setup.tuned_config(cfg, deepspeed_setup.deepspeed_config(cfg, tiny.plan_for(cfg), 2), model)["zero_optimization"]
    assert tuned["stage3_max_live_parameters"] == 123 and tuned["leaf_module"] == {"classes": []}
    assert tuned["stage3_prefetch_bucket_size"] == layer
    cfg0 = C.load(None, ["deepspeed.zero_stage=0"])
    ds0 = deepspeed_setup.deepspeed_config(cfg0, tiny.plan_for(cfg0), 2)
    assert deepspeed_setup.tuned_config(cfg0, ds0, model) == ds0  # no partitioning, nothing to size


def test_zero_buckets_are_the_trainable_elements_when_fewer_than_deepspeeds_default():
    model = _meta_llama(hidden_size=256, intermediate_size=688, num_hidden_layers=3, num_attention_heads=8,
                        num_key_value_heads=2, vocab_size=1000)
    cfg = C.load(None, ["deepspeed.zero_stage=2"])
    ds = deepspeed_setup.deepspeed_config(cfg, tiny.plan_for(cfg), 2)
    everything = sum(p.numel() for p in model.parameters())
    assert deepspeed_setup.tuned_config(cfg, ds, model)["zero_optimization"]["reduce_bucket_size"] == everything
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)
    zero = deepspeed_setup.tuned_config(cfg, ds, model)["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 1000 * 256
    user = C.load(None, ["deepspeed.zero_stage=2", "deepspeed.overrides={zero_optimization: {reduce_bucket_size: 7}}"])
    zero = deepspeed_setup.tuned_config(user, deepspeed_setup.deepspeed_config(user, tiny.plan_for(user), 2), model)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 7 and zero["allgather_bucket_size"] == 1000 * 256
    z3 = C.load(None, ["deepspeed.zero_stage=3"])
    assert deepspeed_setup.tuned_config(z3, deepspeed_setup.deepspeed_config(z3, tiny.plan_for(z3), 2), model)["zero_optimization"][
        "reduce_bucket_size"] == 1000 * 256


def test_the_divergence_guard_stops_on_nonfinite_spikes_and_dead_gradients():
    guard = engine.DivergenceGuard(loss_factor=4.0, zero_grad_logs=2)
    assert guard.check(3.0, 1.0) is None and guard.check(2.0, 0.5) is None and guard.check(7.9, 0.5) is None
    assert "over 4x the lowest so far (2;" in guard.check(8.1, 0.5)
    # Near zero, the spread between batches of a learned task is not a divergence: 0.013 then 0.08 or 0.3.
    learned = engine.DivergenceGuard(loss_factor=4.0, zero_grad_logs=2)
    assert all(learned.check(loss, 1.0) is None for loss in (2.1, 0.4, 0.05, 0.013, 0.08, 0.31))
    assert "over 4x the lowest so far (0.013;" in learned.check(1.2, 1.0)
    assert "not finite" in engine.DivergenceGuard(4.0, 2).check(float("nan"), 1.0)
    assert "not finite" in engine.DivergenceGuard(4.0, 2).check(2.0, float("inf"))
    dead = engine.DivergenceGuard(4.0, 2)
    assert dead.check(6.2, 0.0) is None and dead.check(6.2, 0.3) is None and dead.check(6.2, 0.0) is None
    assert "gradient norm has been 0 at 2" in dead.check(6.2, 0.0)
    off = engine.DivergenceGuard(0.0, 0)
    assert off.check(1.0, 0.0) is None and off.check(100.0, 0.0) is None


def test_rng_state_round_trips_through_data_only_files(tmp_path):
    import random

    import torch

    from ftcluster import checkpoint

    random.seed(7)
    torch.manual_seed(7)
    checkpoint._save_rng(tmp_path / "rank0")
    expected = (random.random(), torch.rand(3))
    random.seed(0)
    torch.manual_seed(0)
    checkpoint._restore_rng(tmp_path / "rank0")
    assert (random.random(), torch.rand(3)).__repr__() == expected.__repr__()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.json", "rank0.safetensors"]  # no pickle


def test_a_frozen_base_in_layer_shards_leaves_deepspeed_the_adapters_under_zero2_whatever_the_json_says(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1}}))
    cfg = C.load(None, [f"deepspeed.config_file={f}", "deepspeed.zero_stage=3", "model.gradient_checkpointing=true",
                        "scaling.num_workers=2"])
    assert tiny.plan_for(cfg).frozen_base == "layer-shards"
    assert deepspeed_setup.deepspeed_config(cfg, tiny.plan_for(cfg), 2)["zero_optimization"]["stage"] == 2
    cfg = C.load(None, [f"deepspeed.config_file={f}", "deepspeed.zero_stage=3", "model.gradient_checkpointing=true",
                        "deepspeed.zero3_frozen=deepspeed", "scaling.num_workers=2"])
    assert deepspeed_setup.deepspeed_config(cfg, tiny.plan_for(cfg), 2)["zero_optimization"]["stage"] == 3


def test_zero3_keeps_deepspeeds_linear_unless_every_layer_is_checkpointed():
    # DeepSpeed's linear saves the weight parameter, not a view of its gathered data: a layer that is not
    # checkpointed would otherwise hold its gathered weights from forward to backward.
    z3 = ["deepspeed.zero_stage=3", "deepspeed.zero3_frozen=deepspeed", "model.gradient_checkpointing=true"]
    every = ds_config(C.load(None, z3), 2)["zero_optimization"]
    some = ds_config(C.load(None, [*z3, "model.checkpointed_layers=2"]), 2)["zero_optimization"]
    assert every["memory_efficient_linear"] is False and "memory_efficient_linear" not in some


def test_bf16_master_weights_turn_off_deepspeeds_fp32_copies_and_at_zero0_its_clipping():
    z0 = ds_config(C.load(None, ["method=full", "deepspeed.zero_stage=0", "optimizer.master_weights=bf16"]), 1)
    assert z0["bf16"] == {"enabled": False} and z0["gradient_clipping"] == 0.0  # the loop clips (engine.GradClip)
    z2 = ds_config(C.load(None, ["method=full", "optimizer.master_weights=bf16"]), 1)
    assert z2["bf16"] == {"enabled": True, "check_grad_overflow": False, "bf16_master_weights_and_grads": True,
                          "bf16_optimizer_states": True}
    assert z2["gradient_clipping"] == 1.0
    # float32 master weights: at ZeRO-0 the optimizer keeps them (optim.Float32Masters), at ZeRO-1-3 DeepSpeed does.
    fp32_z0 = C.load(None, ["method=full", "deepspeed.zero_stage=0"])
    assert tiny.plan_for(fp32_z0).masters == "optimizer"
    assert deepspeed_setup.deepspeed_config(fp32_z0, tiny.plan_for(fp32_z0), 1)["bf16"] == {"enabled": False}
    fp32 = ds_config(C.load(None, ["method=full", "deepspeed.zero_stage=1"]), 1)
    assert fp32["bf16"] == {"enabled": True, "check_grad_overflow": False} and fp32["gradient_clipping"] == 1.0


def test_float32_masters_refuse_an_optimizer_state_without_them():
    """A ZeRO-0 checkpoint written by DeepSpeed's own bf16 optimizer (or with bf16 master weights) holds no float32
    copies to continue from: the resume stops with what happened, rather than rebuilding them from bf16 weights."""
    from ftcluster.optim import Float32Masters

    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    masters = Float32Masters([{"params": [weight]}], lambda groups: torch.optim.AdamW(groups, lr=1e-3))
    foreign = torch.optim.AdamW([torch.nn.Parameter(torch.ones(4))], lr=1e-3).state_dict()
    with pytest.raises(ValueError, match="holds no float32 master weights.*Resume it with the settings it was saved"):
        masters.load_state_dict(foreign)


def test_sequence_parallel_groups_take_k_micro_steps_for_each_of_ours():
    """DeepSpeed counts a sequence-parallel group as one data-parallel member, whose K workers' rows are K micro
    steps: its accumulation is K times ours, and its global batch (rows a step) stays ours."""
    cfg = C.load(None, ["scaling.num_workers=6", "scaling.sequence_parallel=3", "training.micro_batch_size=2",
                        "training.gradient_accumulation_steps=4", "deepspeed.zero_stage=3"])
    ds = deepspeed_setup.deepspeed_config(cfg, tiny.plan_for(cfg, "cuda", varlen_kernel=True), world_size=6)
    assert ds["gradient_accumulation_steps"] == 4 * 3 and ds["train_batch_size"] == 2 * 4 * 6
    # = micro batch x DeepSpeed's accumulation x its data-parallel size (6 workers / 3)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
