"""The memory estimator against the measured runs of benchmarks/calibration.json, and its arithmetic."""

from dataclasses import replace

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ftcluster import estimate as E

ROOT = Path(__file__).parents[2]
ROWS = json.loads((ROOT / "benchmarks" / "calibration.json").read_text())


def run_of(row) -> E.Run:
    return E.Run(**{**row["run"], "lora_targets": tuple(row["run"]["lora_targets"])})


def test_the_calibration_table_is_the_committed_reports():
    from benchmarks import calibration

    assert json.loads(json.dumps(calibration.rows())) == ROWS  # regenerated from reports/*/results.json, not edited by hand
    assert len(ROWS) >= 10 and {r["run"]["method"] for r in ROWS} == {"full", "lora", "qlora"}
    assert any(r["run"]["zero"] == 3 and r["run"]["gpus"] == 2 for r in ROWS)


KNOWN_MISSES = {
    f"reports/default/{run}/results.json" for run in
    ("2026-11-27-1xh200-before", "2026-11-27-1xh200", "2026-11-27-1xh200-full-bf16-master", "2026-11-27-1xh200-zero0",
     "2026-11-27-1xh200-zero0-flat", "2026-11-27-1xh200-zero0-ablation", "2026-11-28-1xh100-peers")}
KNOWN_MISSES |= {("reports/default/2026-12-06-1xh100/results.json", method) for method in ("full", "lora")}
"""Runs whose peak the estimator does not yet explain: SmolLM2-135M on one H200 at 4952a42, 925d9ba, 11a96d9 and
f6faaed and on one H100 at a572ffc and 80c0fa2 (full fine-tuning and LoRA; its QLoRA is within 10%), 0.4-1.7 GiB
over the estimate (11-58% of the peak; ZeRO-0 with float32 master weights too). Not the fused loss: full fine-tuning and LoRA peaked at the same bytes with Liger's loss in 64 chunks
and in 4; the 2026-11-24 H100 runs of the same model, whose training peaks were higher, are within 10%. Strict: a
fix that explains them makes these tests pass, and the entry must go."""
KNOWN_MISSES |= {f"reports/llama-1b/{run}/results.json" for run in
                 ("2026-11-28-1xh100-qlora-no-ckpt", "2026-11-28-1xh200-qlora-compile")}
"""QLoRA without checkpointing at the llama-1b shape (compiled, 7823b38): 5.01 and 5.02 GiB, estimated 6.0, as an
eager layer is (the layers peaked at 4.91 GiB eager in the same H200 run: compiled or not, they keep the same). The
term for an uncheckpointed QLoRA layer's activations counts too much; the over-estimate is the safe side of a fit
check, and no other run measures that term yet."""

KNOWN_MISSES |= {(f"reports/{suite}/{run}/results.json", method) for suite, run, method in (
    ("llama-1b", "2026-11-27-1xh100-compiled-qlora", "qlora"), ("llama-1b", "2026-11-27-1xh100-lora-compiled", "lora"),
    ("llama-1b", "2026-11-27-1xh200-lora-no-ckpt", "lora"), ("llama-1b", "2026-11-27-1xh200-unsloth", "qlora"),
    ("llama-1b", "2026-11-28-1xh100-peers", "qlora"), ("llama-7b", "2026-11-27-1xh100-compiled-qlora", "qlora"),
    ("llama-7b", "2026-11-27-1xh200-qlora-local", "qlora"), ("llama-7b", "2026-11-27-1xh200-unsloth", "qlora"),
    ("llama-7b", "2026-11-28-1xh100-peers", "qlora"), ("llama-7b", "2026-12-06-1xh100-plan", "qlora"))}
"""Compiled, checkpointed layers at 4,096 tokens a micro batch (two rows of 2,048): 11-19% over the estimate, the
safe side. The estimate counts a compiled layer's recompute-and-backward working set (estimate.COMPILED_BACKWARD_BYTES,
which the long rows fit within 2% from 16k to 64k tokens, and which tests/gpu/test_compiled.py's four-layer models
show at this length too), yet compiled and eager runs of the same shape and batch peaked alike (the llama-7b QLoRA
rows: 5.59 GiB compiled, 5.60 eager in reports/llama-7b/2026-11-27-1xh100-compile), so their peak is not where the
estimate puts it, in a layer's backward: a term of that phase counts too much at this length, and which one is not
yet traced. Without the compiled term each of them would be within 3.4% of its peak (the 7B QLoRA rows: 5.78 GiB
through the layers against 5.54-5.59 measured), so either the term's excess does not arise in a full-depth model at
this length, or the eager figure through the layers is itself high here and another phase peaks first
(benchmarks.compiled_layers at 1x16384 and 2x2048, eager and compiled, would tell). Strict: a fix that explains
them makes these tests pass."""


def _row_case(row):
    missed = row["source"] in KNOWN_MISSES or (row["source"], row["run"]["method"]) in KNOWN_MISSES
    marks = [pytest.mark.xfail(strict=True, reason="see KNOWN_MISSES")] if missed else []
    return pytest.param(row, marks=marks, id=f"{row['shape']}-{row['run']['method']}-{row['source'].split('/')[2]}")


@pytest.mark.parametrize("row", [_row_case(r) for r in ROWS])
def test_estimate_is_within_10_percent_of_each_measured_peak(row):
    e = E.estimate(E.shape_of(row["shape"]), run_of(row))
    measured = row["measured_gib"]
    assert e.allocated / E.GiB == pytest.approx(measured["allocated"], rel=0.10)
    if row["expandable_segments"]:  # the allocator setting the estimator models (see benchmarks/calibration.py)
        assert e.device / E.GiB == pytest.approx(measured["device"], rel=0.10)


def test_weight_terms_follow_the_storage_formats():
    shape = E.shape_of("llama-2-7b")
    assert shape.params == 6_738_415_616  # Llama-2-7B's published parameter count
    lora = E.terms(shape, E.Run(method="lora"))["weights"]
    qlora = E.terms(shape, E.Run(method="qlora"))["weights"]
    assert lora == 2 * shape.params
    # NF4: half a byte per linear weight + 8-bit absmax per 64 + fp32 per 256 absmax blocks; the rest in bf16.
    assert qlora == pytest.approx(shape.linear_params * 0.5 + shape.other_params * 2)
    constants = E.terms(shape, E.Run(method="qlora"))["weights' quantization constants"]
    assert constants == pytest.approx(shape.linear_params * (1 / 64 + 4 / 16384))
    # ZeRO-3 partitions the 4-bit weights but not their quantization constants (they are not parameters).
    q3 = E.terms(shape, E.Run(method="qlora", gpus=4, zero=3))
    assert q3["weights"] == pytest.approx(qlora / 4) and q3["weights' quantization constants"] == constants
    sharded = E.terms(shape, E.Run(method="full", gpus=4, zero=3))
    assert sharded["weights"] == pytest.approx(2 * shape.params / 4)
    assert E.terms(shape, E.Run(method="full", gpus=4, zero=3, offload="optimizer"))["fp32 master weights"] == 0


def test_lora_trainable_parameters_match_peft():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    small = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1000)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**small))
    peft = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    want = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    shape = E.Shape(layers=2, hidden=256, intermediate=688, heads=8, kv_heads=2, vocab=1000, tied=False)
    assert E.trainable_params(shape, E.Run(lora_r=8, lora_targets=("q_proj", "v_proj", "down_proj"))) == want


def test_a_run_that_does_not_fit_gets_the_cheapest_change_that_does():
    shape = E.shape_of("llama-3-70b")
    run = E.Run(method="lora", seq_len=1024, grad_ckpt=True)
    assert E.estimate(shape, run).device / E.GiB > 80
    fixes = E.suggestions(shape, run, budget_gib=80)
    assert fixes and all(need <= 80 for _, need, _ in fixes)
    assert fixes[0][0].startswith("QLoRA")  # on one GPU nothing short of a 4-bit base fits a 70B model


def test_a_4bit_model_from_the_hub_under_zero3_must_fit_whole_while_it_loads():
    from dataclasses import replace

    shape = E.shape_of("llama-3-70b")
    run = E.Run(method="qlora", gpus=16, zero=3, seq_len=2048, grad_ckpt=True, optimizer="paged_adamw_8bit",
                loads_whole=True)
    e = E.estimate(shape, run)
    one = E.terms(shape, replace(run, gpus=1))
    whole = one["weights"] + one["weights' quantization constants"]
    assert e.device < whole / 1.5 and e.need == e.loading > whole  # 19 GiB per GPU in training, 40 while loading
    assert E.estimate(shape, replace(run, loads_whole=False)).need == e.device  # read module by module
    assert E.estimate(shape, replace(run, method="lora")).loading == 0  # 16-bit models load partitioned
    out = E.explain("llama-3-70b", shape, run, budget_gib=37.3)
    assert "does not fit" in out and "while it loads" in out and "more GPUs" not in out


def test_cli_prints_every_term_and_the_verdict(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                                   num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)))
    out = subprocess.run([sys.executable, "-m", "ftcluster", "estimate", "--model", str(tmp_path), "--method", "qlora",
                          "--grad-ckpt", "--gpu-memory", "rtx4090"], capture_output=True, text=True, check=True).stdout
    for term in ("weights", "fp32 master weights", "optimizer states (paged", "activations (checkpoints)",
                 "logits and loss", "CUDA context", "peak device memory"):
        assert term in out
    assert "fits a 22.4 GiB GPU" in out
    bad = subprocess.run([sys.executable, "-m", "ftcluster", "estimate", "--model", "llama-9b"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--model llama-9b" in bad.stderr and "llama-2-7b" in bad.stderr


def test_sizes_table_marks_measured_cells_with_their_runs():
    from benchmarks import sizes_table

    table = sizes_table.cells()
    assert len(table) == 12
    measured = [c for c in table if c["measured_gib"] is not None]
    assert measured, "the llama-7b and sizes-13b reports measured this setting"
    for c in measured:
        row = next(r for r in ROWS if r["source"] in c["measured_on"] and r["shape"] == c["shape"]
                   and r["run"]["method"] == c["method"])
        assert c["measured_gib"] == row["measured_gib"]["device"]
    assert sizes_table.render(table).count("| 70B |") == 1


def test_offloaded_checkpoints_leave_the_device_and_are_offered_as_a_fix():
    from dataclasses import replace

    shape = E.shape_of("llama-3-70b")
    run = E.Run(method="qlora", gpus=2, zero=3, seq_len=2048, micro_batch=2, grad_ckpt=True, lora_r=8,
                optimizer="paged_adamw_8bit")
    kept = E.terms(shape, run)["activations (checkpoints)"]
    assert kept == shape.layers * 2 * shape.hidden * 4096  # 5 GiB: every layer's input
    off = replace(run, activation_offload=True)
    assert E.terms(shape, off)["activations (checkpoints)"] == 2 * 2 * shape.hidden * 4096
    assert E.estimate(shape, run).allocated - E.estimate(shape, off).allocated == pytest.approx(kept * 78 / 80)
    budget = E.estimate(shape, off).need / E.GiB + 0.1
    fixes = E.suggestions(shape, run, budget_gib=budget)
    assert fixes[0][2] == off and "--activation-offloading" in fixes[0][0]
    assert E.config_overrides(run, fixes[0][2]) == ["model.activation_offloading=true"]


def test_host_checkpoints_are_suggested_as_uncompiled_layers_as_the_plan_would_run_them():
    # A compiled 128k QLoRA row of the Llama-3-8B shape does not fit an 80 GB GPU; with its checkpoints in host
    # memory the layers run eager, without a compiled layer's recompute-and-backward working set.
    shape = E.shape_of("llama-3-8b")
    run = E.Run(method="qlora", seq_len=131072, micro_batch=1, compiled=True, fused_loss=True,
                optimizer="paged_adamw_8bit")
    assert E.estimate(shape, run).need / E.GiB > 79.2
    offloaded = replace(run, activation_offload=True, compiled=False)
    assert "activations (a compiled layer's backward)" not in E.terms(shape, offloaded)
    fixes = E.suggestions(shape, run, budget_gib=79.2)
    assert fixes[0][2] == offloaded and fixes[0][1] == pytest.approx(E.estimate(shape, offloaded).need / E.GiB)
    assert E.config_overrides(run, fixes[0][2]) == ["model.activation_offloading=true"]


def test_a_commit_git_cannot_place_is_rendered_as_recent_code():
    from benchmarks import calibration

    assert not calibration.since(calibration.CHUNKED_LOSS_SINCE, "c02c3ca")  # measured before the change
    assert calibration.since(calibration.CHUNKED_LOSS_SINCE, "HEAD")
    # A report rendered on the GPU host, which has no git history, is estimated as the code that made it.
    assert calibration.since(calibration.CHUNKED_LOSS_SINCE, "0123456789abcdef0123456789abcdef01234567")


def test_layer_shards_hold_two_layers_and_leave_the_adapters_gradients_to_zero2():
    from ftcluster import config as C
    from ftcluster import plan
    from ftcluster.hardware import Hardware

    shape = E.shape_of("llama-2-7b")
    recipe = ["method=lora", "deepspeed.zero_stage=3", "scaling.num_workers=2", "model.gradient_checkpointing=true",
              "lora.target_modules=[q_proj, v_proj]", "lora.r=8"]
    def run_of(overrides):
        cfg = C.load(None, overrides)
        return plan.estimator_run(cfg, plan.make(cfg, Hardware.gpu(liger_installed=False), read_data=False))

    shards = run_of(recipe)
    assert shards.layer_shards  # what the config runs by default
    deepspeed = run_of([*recipe, "deepspeed.zero3_frozen=deepspeed"])
    assert not deepspeed.layer_shards
    a, b = E.terms(shape, shards), E.terms(shape, deepspeed)
    layer = 2 * sum(x * y for x, y in shape.linear_shapes().values())
    assert a["ZeRO-3 gathered parameters"] == b["ZeRO-3 gathered parameters"] - layer  # two layers, not three
    assert a["gradients (bf16)"] > 0 == b["gradients (bf16)"]  # ZeRO-2 keeps this GPU's bf16 gradient partition
    assert a["weights"] == b["weights"]  # the base is partitioned either way



def test_layers_left_out_of_checkpointing_keep_their_activations_and_the_estimate_says_how_many_fit():
    from dataclasses import replace

    shape = E.shape_of("llama-3.2-1b")
    run = E.Run(method="lora", seq_len=2048, micro_batch=2, grad_ckpt=True, lora_r=8, lora_targets=("q_proj", "v_proj"))
    every, some = E.terms(shape, run), E.terms(shape, replace(run, ckpt_layers=12))
    per_layer = some["activations (layers not checkpointed)"] / 4
    assert every["activations (layers not checkpointed)"] == 0 and per_layer > 0
    assert every["activations (checkpoints)"] - some["activations (checkpoints)"] == 4 * 2 * shape.hidden * 4096
    none = E.terms(shape, replace(run, ckpt_layers=0))
    assert none["activations (layers not checkpointed)"] == 16 * per_layer and none["activations (one recomputed layer)"] == 0
    # The fewest checkpointed layers that fit a budget: all of them for a budget that fits only that, fewer for more.
    tight = E.estimate(shape, run).need / E.GiB
    assert E.checkpointed_layers_that_fit(shape, run, tight) == 16
    assert E.checkpointed_layers_that_fit(shape, run, tight + 4.2 * per_layer / E.GiB) == 12
    assert E.checkpointed_layers_that_fit(shape, run, tight - 0.5) is None
    assert "model.checkpointed_layers=12" in E.explain("llama-3.2-1b", shape, run, tight + 4.2 * per_layer / E.GiB)


def test_a_recorded_runs_shape_does_not_depend_on_a_same_named_directory_here(tmp_path):
    """Calibration rows name the GPU host's shape directories; one of the same name written on this machine (by
    benchmarks.shapes, config.json included) must not turn the row into a custom model without a shape."""
    from benchmarks import calibration

    here = tmp_path / "llama-2-7b"
    here.mkdir()
    (here / "config.json").write_text("{}")
    assert calibration.recorded_shape(str(here)) == "llama-2-7b"
    assert calibration.recorded_shape("embedded:smollm2-135m-instruct") == "smollm2-135m"


def test_larger_fused_loss_chunks_hold_their_logits():
    """Liger's chunk at the 1B shape's 4096 tokens: 128 rows at scale 1, 512 at 8; 6 bytes a logit for each."""
    shape = E.shape_of("llama-3.2-1b")
    run = E.Run(method="full", seq_len=2048, micro_batch=2, fused_loss=True)
    one = E.terms(shape, run)["logits and loss"]
    eight = E.terms(shape, replace(run, fused_loss_chunk_scale=8))["logits and loss"]
    assert eight - one == 6 * shape.vocab * (512 - 128)


def test_a_compiled_layer_keeps_less_except_a_qlora_one_outside_a_checkpoint():
    """Inductor recomputes a compiled layer's norms and SwiGLU products rather than saving them; a QLoRA layer outside
    a checkpoint runs under activations.recompute_only, and measured the same peak compiled as eager (llama-1b
    shape on one H200: 5.02 GiB and 4.91)."""
    from dataclasses import replace

    shape = E.shape_of("llama-3.2-1b")
    for method in ("full", "lora", "qlora"):
        run = E.Run(method=method, seq_len=2048, micro_batch=2, grad_ckpt=False, lora_r=8,
                    lora_targets=("q_proj", "v_proj"))
        eager, compiled = E.terms(shape, run)["activations"], E.terms(shape, replace(run, compiled=True))["activations"]
        if method == "qlora":
            assert compiled == eager
        else:
            assert eager - compiled == 16 * (4 * shape.hidden + 4 * shape.intermediate) * 4096


def test_every_long_row_that_ran_out_of_memory_is_estimated_not_to_fit_its_gpu():
    """The long-context suite's tries that ran out of memory, each with the memory savers it ran with, are estimated
    over the share of the GPU the plan fills: today's plan would not run them so, and would choose the savers or
    refuse the length."""
    from benchmarks import calibration
    from ftcluster import plan

    misses = []
    for results in sorted(ROOT.glob("reports/long-context/*/results.json")):
        doc = json.loads(results.read_text())
        commit, gpu = doc["provenance"]["git_commit"], doc["provenance"]["gpus"][0]
        if not calibration.since("2cf14b5", commit):
            continue  # evaluation computed a long row's logits whole before it: out of memory outside training
        for t in doc["tries"]:
            if t["status"] == "out of memory":
                cfg = calibration.config_of(t["command"], commit)
                savers = {"activation_offloading": "host memory" in t["savers"], "tiled_mlp": "tiled MLP" in t["savers"]}
                cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={
                    k: "on" if on else "off" for k, on in savers.items()})})  # as the try ran, not as planned today
                run = calibration.run_of(cfg, commit, gpu_memory_gib=gpu["memory_gib"])
                need = E.estimate(E.shape_of(calibration.recorded_shape(cfg.model.name_or_path)), run).need / E.GiB
                misses.append((results.parent.name, t["method"], t["length"], round(need, 1), gpu["memory_gib"]))
    assert misses  # the 128k QLoRA try that the compiled layers' estimate once said would fit
    assert [m for m in misses if m[3] <= plan.FIT_SHARE * m[4]] == []
