"""The plan: every decision of a run made once, with its reason; how the decisions couple; what the driver, the CLI
and ``--print-config`` show of it."""

import json
import os
import socket
import subprocess
import sys

import pytest

from ftcluster import config as C
from ftcluster import plan as P
from ftcluster.hardware import Hardware
from tests import tiny

GPU = Hardware(device="cuda", device_source="test", gpu_memory_gib=79.1, liger_installed=True, varlen_kernel=True)
CPU = Hardware(device="cpu", device_source="test")


def planned(*overrides, hw=GPU):
    return P.make(C.load(None, list(overrides)), hw, read_data=False)


def test_every_decision_has_a_reason_and_the_plan_round_trips_through_plan_json(tmp_path):
    plan = planned("method=qlora", "model.gradient_checkpointing=true")
    names = [name for name, _, _ in plan.decisions()]
    assert {"backend", "device", "zero_stage", "frozen_base", "compile", "liger_layers", "loss", "attention",
            "checkpointed_layers", "keep_recomputed_weights", "masters", "streaming", "global_batch",
            "memory_gib"} <= set(names)
    assert all(reason for _, _, reason in plan.decisions())
    plan.save(tmp_path)
    assert P.Plan.from_json(json.loads((tmp_path / "plan.json").read_text())) == plan
    assert plan.describe().count("\n") == len(names)  # a header, then one line per decision


def test_lora_bias_on_one_gpu_under_zero3_changes_five_decisions_and_says_why():
    """QLoRA, ZeRO-3 and checkpointing on one GPU: with lora.bias=all the base has trained parameters, which
    layer shards cannot hold, so DeepSpeed's ZeRO-3 partitions everything, and that rules out the compiled layers,
    the fused loss (and so Liger stays in the layers) and keeping the recomputed weights."""
    z3 = ["method=qlora", "deepspeed.zero_stage=3", "model.gradient_checkpointing=true"]
    before, after = planned(*z3), planned(*z3, "lora.bias=all")
    assert (before.zero_stage, before.frozen_base, before.compile, before.loss, before.keep_recomputed_weights) == \
        (2, "whole", True, "liger-fused", True)
    assert not before.liger_layers  # the compiled layers fuse their own norms
    changed = {line.split(":")[0]: line for line in P.changes(before, after)}
    assert {"zero_stage", "frozen_base", "compile", "liger_layers", "loss", "keep_recomputed_weights"} <= set(changed)
    assert "zero_stage: 2 -> 3 (deepspeed.zero_stage=3 (layer shards cannot apply: lora.bias" in changed["zero_stage"]
    assert "compile: on -> off (model.compile=auto: ZeRO-3 gathers and releases" in changed["compile"]
    assert "loss: liger-fused -> chunked" in changed["loss"] and "ZeRO-3 partition" in changed["loss"]
    assert "liger_layers: off -> on" in changed["liger_layers"]
    assert "keep_recomputed_weights: on -> off (auto: off where ZeRO-3 partitions" in \
        changed["keep_recomputed_weights"]


def test_the_plan_command_prints_the_plan_and_the_changed_decisions(capsys):
    from ftcluster import cli

    z3 = ["method=qlora", "deepspeed.zero_stage=3", "model.gradient_checkpointing=true"]
    assert cli.plan_main([*z3, "--device", "cuda", "--diff", "lora.bias=all"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("with lora.bias=all:") and "zero_stage: 2 -> 3" in out and "compile: on -> off" in out
    assert cli.plan_main([*z3, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan:") and "compile                 off" in out and "the device is cpu" in out
    assert cli.plan_main(["model.compile=on", "--device", "cpu"]) == 2
    assert "model.compile=on: the device is cpu" in capsys.readouterr().err


def test_planning_for_the_varlen_kernel_finds_it_without_importing_torchdynamo():
    """The driver's checks and ``ftcluster plan`` ask whether torch has its varlen kernel; importing the module to
    find out imported TorchDynamo, which only the process that trains needs."""
    code = ("import sys\nfrom ftcluster import cli\nassert cli.plan_main(['--device', 'cuda']) == 0\n"
            "assert 'torch._dynamo' not in sys.modules, 'the plan imported TorchDynamo'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "attention               varlen" in proc.stdout


def test_print_config_shows_what_every_auto_resolved_to():
    from ftcluster.train import main

    cfg = C.load(None, ["method=qlora", "deepspeed.zero_stage=3", "model.gradient_checkpointing=true"])
    resolved = P.resolved_config(cfg, P.make(cfg, GPU, read_data=False))
    assert (resolved["model"]["compile"], resolved["model"]["liger_kernel"], resolved["model"]["attn_implementation"],
            resolved["quantization"]["quant_storage"], resolved["quantization"]["keep_recomputed_weights"],
            resolved["deepspeed"]["zero3_frozen"], resolved["data"]["streaming"]) == \
        ("on", "on", "varlen", "bfloat16", "on", "layers", "off")
    assert resolved["ray"]["local_mode"] is True
    again = P.make(C.from_dict(resolved), GPU, read_data=False)  # the resolved config plans the same run
    assert [(n, v) for n, v, _ in again.decisions()] == [(n, v) for n, v, _ in P.make(cfg, GPU, read_data=False)
                                                          .decisions()]
    out = subprocess.run([sys.executable, "-m", "ftcluster.train", "--print-config", "scaling.use_gpu=false"],
                         capture_output=True, text=True, check=True).stdout
    shown = json.loads(out[out.index("{"):])
    assert shown["model"]["compile"] == "off" and shown["model"]["attn_implementation"] == "sdpa"
    assert "auto" not in (shown["model"]["liger_kernel"], shown["data"]["streaming"], shown["ray"]["local_mode"])
    assert main  # the command's own entry point


def test_qlora_zero3_stores_4bit_weights_in_the_compute_dtype_by_default():
    assert planned("method=qlora", "deepspeed.zero_stage=3").quant_storage == "bfloat16"
    assert planned("method=qlora", "deepspeed.zero_stage=2").quant_storage == "uint8"
    assert planned("method=lora").quant_storage is None


def test_zero3_partitions_a_frozen_base_by_layers_where_it_can_and_says_why_not():
    z3 = ["deepspeed.zero_stage=3", "model.gradient_checkpointing=true", "scaling.num_workers=2"]
    assert planned(*z3).frozen_base == "layer-shards" and planned(*z3, "method=qlora").frozen_base == "layer-shards"
    # auto falls back to DeepSpeed's ZeRO-3 where layer shards do not apply, and says which setting is in the way.
    for clash, named in [("deepspeed.offload_param=cpu", "offload_param=cpu"),
                         ("model.gradient_checkpointing=false", "gradient_checkpointing=false"),
                         ("model.checkpointed_layers=2", "checkpointed_layers"),
                         ("lora.modules_to_save=[lm_head]", "modules_to_save"),
                         ("deepspeed.zero3_frozen=deepspeed", "zero3_frozen=deepspeed")]:
        plan = planned(*z3, clash)
        assert plan.frozen_base == "deepspeed" and plan.zero_stage == 3 and plan.partitions_parameters, clash
        assert named in plan.reasons["frozen_base"], clash
        if "zero3_frozen" not in clash:
            with pytest.raises(C.ConfigError, match=rf"zero3_frozen=layers with .*{named}.*Set deepspeed.zero3_frozen"):
                C.load(None, [*z3, clash, "deepspeed.zero3_frozen=layers"])
    assert planned(*z3, "method=full").frozen_base is None
    assert planned("deepspeed.zero_stage=2", "model.gradient_checkpointing=true").frozen_base == "whole"


def test_zero3_for_adapters_on_one_worker_is_zero2_with_the_base_whole_and_keeps_what_zero2_allows():
    """One worker has no other rank to hold a shard: DeepSpeed runs ZeRO-2 over the adapters, nothing is
    partitioned, so the fused loss and compiled layers apply as under ZeRO-2."""
    one = planned("deepspeed.zero_stage=3", "model.gradient_checkpointing=true", "method=lora")
    assert (one.frozen_base, one.zero_stage, one.partitions_parameters) == ("whole", 2, False)
    assert one.compile and one.loss == "liger-fused"
    two = planned("deepspeed.zero_stage=3", "model.gradient_checkpointing=true", "method=lora", "scaling.num_workers=2")
    assert (two.frozen_base, two.zero_stage, two.partitions_parameters) == ("layer-shards", 2, True)
    assert not two.compile and two.loss == "chunked"
    # DeepSpeed's own ZeRO-3, asked for, stays ZeRO-3 on one worker too (and so does full fine-tuning).
    for other in (["deepspeed.zero3_frozen=deepspeed"], ["method=full"]):
        plan = planned("deepspeed.zero_stage=3", "model.gradient_checkpointing=true", *other)
        assert plan.zero_stage == 3 and plan.partitions_parameters


def test_masters_and_clipping_follow_the_stage_and_the_dtype():
    assert (planned("method=full", "deepspeed.zero_stage=0").masters,
            planned("method=full", "deepspeed.zero_stage=0").clips_gradients) == ("optimizer", "ftcluster")
    assert planned("method=full", "deepspeed.zero_stage=1").masters == "deepspeed"
    assert planned("method=full", "optimizer.master_weights=bf16").masters == "none"
    assert planned("method=full", "model.dtype=float32", "deepspeed.zero_stage=0").masters == "none"
    assert planned("method=full", "deepspeed.zero_stage=2").clips_gradients == "deepspeed"


def test_the_global_batch_counts_every_worker():
    plan = planned("training.micro_batch_size=2", "training.gradient_accumulation_steps=8", "scaling.num_workers=4")
    assert (plan.micro_batch, plan.accumulation, plan.global_batch) == (2, 8, 64)


def test_memory_is_estimated_for_gpus_and_judged_against_their_memory():
    assert planned(hw=CPU).memory_gib is None and "CPU" in planned(hw=CPU).reasons["memory_gib"]
    plan = planned("method=qlora")
    assert 0 < plan.memory_gib < 79.1 and plan.reasons["memory_gib"].endswith("of 79.1 GiB (given): fits")
    big = P.make(C.load(None, ["model.name_or_path=meta-llama/Meta-Llama-3-70B", "method=full"]), GPU,
                 read_data=False)
    assert big.reasons["memory_gib"].endswith("does NOT fit")


def test_the_in_process_backend_runs_one_worker_unless_there_is_a_cluster_to_join(tmp_path):
    """Decided by the driver before anything starts; a live cluster recorded on this host is joined, a stale record
    (nothing answers at its address) is no cluster. In a fresh process: the test session's own Ray would count as a
    cluster to join."""
    script = ("import json, sys; from ftcluster import config as C, hardware, plan; "
              "print(json.dumps([plan.make(c := C.load(None, o), hardware.here(c), read_data=False).backend "
              "for o in json.loads(sys.argv[1])]))")
    cases = [["scaling.use_gpu=false"], ["scaling.num_workers=2"], ["ray.address=auto"], ["ray.max_failures=2"],
             ["ray.local_mode=false"], ["ray.local_mode=true"]]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(tmp_path)}
    backend = lambda cases, **extra: json.loads(subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True, check=True,
        env=env | extra).stdout)
    assert backend(cases) == ["in-process", "ray", "ray", "ray", "ray", "in-process"]
    record = tmp_path / "ray" / "ray_current_cluster"
    record.parent.mkdir()
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        record.write_text(f"127.0.0.1:{listening.getsockname()[1]}\n")
        assert backend([["scaling.use_gpu=false"]]) == ["ray"]  # a live cluster recorded on this host: joined
    assert backend([["scaling.use_gpu=false"]]) == ["in-process"]  # closed now: the record of a cluster that died
    assert backend([["scaling.use_gpu=false"]], RAY_ADDRESS="10.0.0.1:6379") == ["ray"]


def test_a_run_resumes_under_either_backend_and_speed_knobs_are_not_its_identity():
    """Both backends keep checkpoints in the run directory the same way (ftcluster.checkpoint)."""
    assert C.load(None, ["ray.local_mode=true"]).fingerprint() == C.load(None, ["ray.local_mode=false"]).fingerprint()
    assert C.load(None, ["ray.max_failures=3"]).fingerprint() == C.load(None, []).fingerprint()
    assert C.load(None, ["model.fused_loss_chunk_scale=8"]).fingerprint() == C.load(None, []).fingerprint()
    assert C.load(None, ["optimizer.master_weights=bf16"]).fingerprint() != C.load(None, []).fingerprint()


def test_the_estimator_estimates_the_planned_run():
    """``estimator_run`` reads the plan's decisions: the ZeRO stage run, layer shards, the loss, compilation."""
    cfg = C.load(None, ["method=qlora", "deepspeed.zero_stage=3", "model.gradient_checkpointing=true",
                        "scaling.num_workers=2"])
    plan = P.make(cfg, GPU, read_data=False)
    run = P.estimator_run(cfg, plan)
    assert (run.zero, run.layer_shards, run.fused_loss, run.compiled, run.gpus) == (3, True, False, False, 2)
    one = C.load(None, ["method=qlora", "deepspeed.zero_stage=3", "model.gradient_checkpointing=true"])
    run = P.estimator_run(one, P.make(one, GPU, read_data=False))
    assert (run.zero, run.layer_shards, run.fused_loss, run.compiled) == (2, False, True, True)


def test_an_elastic_run_has_an_accumulation_for_every_worker_count_that_keeps_its_global_batch(tmp_path):
    plan = planned("scaling.num_workers=4", "scaling.min_workers=2", "ray.max_failures=-1",
                   "training.gradient_accumulation_steps=3", "training.micro_batch_size=2")
    assert plan.global_batch == 24 and plan.elastic == {2: 6, 3: 4, 4: 3}
    assert "2:6,3:4,4:3" in plan.describe() and "scaling.min_workers=2" in plan.reasons["elastic"]
    on_two = plan.for_workers(2)
    assert (on_two.workers, on_two.accumulation, on_two.global_batch) == (2, 6, 24)
    assert plan.for_workers(4) is plan
    with pytest.raises(ValueError, match="not 5"):
        plan.for_workers(5)
    plan.save(tmp_path)  # JSON keys are strings: the counts come back as ints
    assert P.Plan.from_json(json.loads((tmp_path / "plan.json").read_text())).elastic == {2: 6, 3: 4, 4: 3}
    # The memory a worker needs is the fewest workers' (a ZeRO partition is largest there).
    fewest = planned("scaling.num_workers=2", "training.gradient_accumulation_steps=2", "deepspeed.zero_stage=3",
                     "method=full")
    elastic = planned("scaling.num_workers=2", "scaling.min_workers=1", "ray.max_failures=1",
                      "training.gradient_accumulation_steps=2", "deepspeed.zero_stage=3", "method=full")
    assert elastic.memory_gib > fewest.memory_gib and "on 1 workers, the fewest" in elastic.reasons["memory_gib"]
    assert planned("scaling.num_workers=2").elastic is None


def test_an_elastic_range_with_a_count_that_cannot_keep_the_global_batch_is_refused_with_what_every_count_keeps():
    with pytest.raises(C.ConfigError) as refused:
        planned("scaling.num_workers=4", "scaling.min_workers=2", "ray.max_failures=-1")
    message = str(refused.value)
    assert "scaling.min_workers=2 to num_workers=4" in message and "3 worker(s) cannot keep" in message
    assert "global batch of 4 rows" in message and "a multiple of 12" in message


@pytest.mark.parametrize("overrides, field", [
    (["scaling.num_workers=2", "scaling.min_workers=3", "ray.max_failures=1"], "scaling.min_workers=3 is more"),
    (["scaling.num_workers=2", "scaling.min_workers=1"], "with ray.max_failures=0"),
    (["scaling.num_workers=2", "scaling.min_workers=1", "ray.max_failures=1", "ray.local_mode=true"],
     "ray.local_mode"),
])
def test_elastic_settings_that_cannot_work_are_refused_naming_the_field(overrides, field):
    with pytest.raises(Exception, match=field):
        C.load(None, overrides)


def test_rows_longer_than_the_models_positions_are_refused_unless_rope_is_scaled(tiny_model):
    from ftcluster import config as C

    cfg = C.load(None, [f"model.name_or_path={tiny_model}", "data.max_seq_len=16384"])  # the tiny model has 4096
    with pytest.raises(C.ConfigError, match=r"data.max_seq_len=16384 is beyond the model's "
                                            r"max_position_embeddings=4096.*rope_type: yarn, factor: 4.0"):
        tiny.plan_for(cfg)
    scaled = C.load(None, [f"model.name_or_path={tiny_model}", "data.max_seq_len=16384",
                           "model.config_overrides={rope_parameters: {rope_type: yarn, factor: 4.0, "
                           "original_max_position_embeddings: 4096, rope_theta: 10000.0}}"])
    assert tiny.plan_for(scaled).workers == 1
    assert tiny.plan_for(C.load(None, [f"model.name_or_path={tiny_model}", "data.max_seq_len=4096"]))


def test_padding_free_batches_are_planned_with_their_row_and_refused_where_they_cannot_apply(tmp_path):
    """data.padding_free is a decision of the plan, shown with the row it makes and what attention then costs; it
    is refused without packing, with sequence parallelism and with streamed rows, naming the field."""
    on = planned("data.padding_free=true", "training.micro_batch_size=8", "data.max_seq_len=512")
    assert on.padding_free and "one row of up to 8 x 512 tokens" in on.reasons["padding_free"]
    assert "attention costs what the examples do" in on.reasons["padding_free"]
    assert "masks the whole row" in planned("data.padding_free=true", hw=CPU).reasons["padding_free"]
    off = planned()
    assert not off.padding_free and "data.padding_free=false" in off.reasons["padding_free"]
    for overrides in (["data.packing=false"], ["scaling.num_workers=2", "scaling.sequence_parallel=2"]):
        with pytest.raises(C.ConfigError, match="data.padding_free=true"):
            planned("data.padding_free=true", *overrides)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n")
    with pytest.raises(C.ConfigError, match="data.padding_free=true with data.source=.* streamed"):
        planned("data.padding_free=true", f"data.source={corpus}", "data.streaming=on")


def test_a_padding_free_run_resumes_only_on_the_rows_it_was_batched_in(tmp_path):
    """A checkpoint's row position counts the rows it was batched in, which padding_free regroups by the micro
    batch: resuming with the setting flipped, or with another micro batch, would point it at other examples, so it
    is refused, naming the settings that resume it. (A flip alone the config's identity refuses first.)"""
    from ftcluster import run_dir as rundir

    def cfg(*overrides):
        return C.load(None, [f"output.storage_path={tmp_path}", "output.name=r", *overrides])

    on = cfg("data.padding_free=true", "training.micro_batch_size=4")
    on.run_dir.mkdir(parents=True)
    rundir.record_rows(on.run_dir, on, "k1")
    rundir.check_rows(on, "k1", resuming=True)
    for other, said in ((cfg(), "data.padding_free=false"),
                        (cfg("data.padding_free=true", "training.micro_batch_size=8"), "micro_batch_size=8")):
        with pytest.raises(C.ConfigError, match=f"{said}, but .* Set data.padding_free=true with "
                                                "training.micro_batch_size=4 to resume it"):
            rundir.check_rows(other, "k1", resuming=True)
    off = cfg("training.micro_batch_size=4")
    rundir.record_rows(off.run_dir, off, "k1")  # as every run before this setting recorded its rows
    rundir.check_rows(cfg("training.micro_batch_size=8"), "k1", resuming=True)  # rows as they are: any micro batch
    with pytest.raises(C.ConfigError, match="Set data.padding_free=false to resume it"):
        rundir.check_rows(on, "k1", resuming=True)
