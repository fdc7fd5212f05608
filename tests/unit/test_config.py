from pathlib import Path

import pytest
import yaml

from ftcluster import config as C
from ftcluster.run_dir import prepare as prepare_run_dir

RECIPES = sorted((Path(__file__).parents[2] / "configs").rglob("*.yaml"))


def test_defaults_are_a_valid_lora_run_on_the_embedded_model():
    cfg = C.load(None)
    assert cfg.method == "lora" and cfg.model.name_or_path == C.EMBEDDED_MODEL


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe):
    raw = yaml.safe_load(recipe.read_text())
    C.from_dict(raw, str(recipe))


def test_dotted_overrides_parse_yaml_values():
    cfg = C.load(None, ["training.max_steps=7", "optimizer.lr=1e-4", "lora.target_modules=[q_proj,v_proj]",
                        "model.gradient_checkpointing=true", "training.eval_batches=null"])
    assert cfg.training.max_steps == 7 and cfg.optimizer.lr == 1e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.model.gradient_checkpointing is True


def test_unknown_key_is_named_with_its_section():
    with pytest.raises(C.ConfigError, match=r"training\.max_stepz: unknown key"):
        C.load(None, ["training.max_stepz=3"])


def test_wrong_type_names_the_field():
    with pytest.raises(C.ConfigError, match=r"training\.micro_batch_size"):
        C.load(None, ["training.micro_batch_size=two"])


def test_unknown_method_lists_the_choices():
    with pytest.raises(C.ConfigError, match=r"method: .*'full', 'lora' or 'qlora'"):
        C.load(None, ["method=dora"])


def test_override_without_equals_sign_is_refused():
    with pytest.raises(C.ConfigError, match="key=value"):
        C.load(None, ["training.max_steps"])


def test_paged_optimizer_with_cpu_offload_is_refused_with_the_fix():
    with pytest.raises(C.ConfigError, match=r"paged_adamw_8bit cannot run with deepspeed.offload_optimizer=cpu.*Use optimizer.name=adamw"):
        C.load(None, ["optimizer.name=paged_adamw_8bit", "deepspeed.offload_optimizer=cpu"])


def test_qlora_zero3_with_uint8_storage_is_refused_with_the_fix():
    with pytest.raises(C.ConfigError, match=r"quant_storage=bfloat16"):
        C.load(None, ["method=qlora", "deepspeed.zero_stage=3", "quantization.quant_storage=uint8"])


def test_param_offload_needs_zero3():
    with pytest.raises(C.ConfigError, match=r"offload_param=cpu needs deepspeed.zero_stage=3"):
        C.load(None, ["deepspeed.offload_param=cpu", "deepspeed.zero_stage=2"])


def test_a_zero_stage_set_inside_the_deepspeed_json_must_be_deepspeed_zero_stage(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 3}}')
    with pytest.raises(C.ConfigError, match=r"config_file .*ds.json.* sets zero_optimization.stage=3 but "
                                            r"deepspeed.zero_stage=2: set the stage with deepspeed.zero_stage=3"):
        C.load(None, [f"deepspeed.config_file={ds}"])
    with pytest.raises(C.ConfigError, match=r"deepspeed.overrides sets zero_optimization.stage=1"):
        C.load(None, ["deepspeed.overrides={zero_optimization: {stage: 1}}"])
    assert C.load(None, [f"deepspeed.config_file={ds}", "deepspeed.zero_stage=3"]).deepspeed.zero_stage == 3


def test_missing_files_are_named_before_anything_starts(tmp_path):
    with pytest.raises(C.ConfigError, match="config file .*nope.yaml does not exist"):
        C.load(tmp_path / "nope.yaml")
    with pytest.raises(C.ConfigError, match=r"model.name_or_path: ./no/such/model does not exist"):
        C.load(None, ["model.name_or_path=./no/such/model"])
    with pytest.raises(C.ConfigError, match=r"data.source: /no/data.jsonl does not exist"):
        C.load(None, ["data.source=/no/data.jsonl"])
    with pytest.raises(C.ConfigError, match=r"deepspeed.config_file"):
        C.load(None, [f"deepspeed.config_file={tmp_path}/ds.json"])
    (tmp_path / "m").mkdir()
    with pytest.raises(C.ConfigError, match="has no config.json"):
        C.load(None, [f"model.name_or_path={tmp_path}/m"])


def test_invalid_yaml_is_reported_with_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(C.ConfigError, match="bad.yaml is not valid YAML"):
        C.load(bad)


def test_a_run_directory_holding_another_run_is_never_reused(tmp_path):
    cfg = C.load(None, [f"output.storage_path={tmp_path}", "output.name=r"])
    prepare_run_dir(cfg)
    prepare_run_dir(cfg)  # same config: resumable
    other = C.load(None, [f"output.storage_path={tmp_path}", "output.name=r", "optimizer.lr=1e-5"])
    with pytest.raises(C.ConfigError, match="already holds a run with a different config"):
        prepare_run_dir(other)
    # ... and the first run's record is untouched.
    assert C.load(tmp_path / "r" / "config.yaml").optimizer.lr == cfg.optimizer.lr


@pytest.mark.parametrize("change, named", [
    (["model.name_or_path=HuggingFaceTB/SmolLM2-360M"], r"model.name_or_path: 'HuggingFaceTB/SmolLM2-360M'"),
    (["method=qlora"], r"method: 'qlora' \(the run's: 'lora'\)"),
    (["lora.r=64"], r"lora.r: 64 \(the run's: 16\)"),
])
def test_resuming_with_a_changed_model_method_or_lora_shape_is_refused_naming_the_field(tmp_path, change, named):
    base = [f"output.storage_path={tmp_path}", "output.name=r", "method=lora", "lora.r=16"]
    prepare_run_dir(C.load(None, base))
    with pytest.raises(C.ConfigError, match=named + r".*To resume that run, set these back"):
        prepare_run_dir(C.load(None, [*base, *change]))


def test_a_resumed_run_may_change_its_workers_and_how_a_step_is_split():
    """Worker count, micro batch and accumulation are the plan's to reconcile with the checkpoint's global batch."""
    a = C.load(None, ["scaling.num_workers=2", "training.micro_batch_size=4", "training.gradient_accumulation_steps=2"])
    b = C.load(None, ["scaling.num_workers=1", "training.micro_batch_size=2", "training.gradient_accumulation_steps=8"])
    assert a.differences(b) == [] and a.fingerprint() == b.fingerprint()
    # Nor how often it checkpoints, logs or evaluates: a run resumed to save more often is the same run.
    c = C.load(None, ["training.save_every=5", "training.save_every_minutes=10", "training.log_every=1",
                      "training.eval_every=50"])
    assert c.differences(C.load(None, [])) == []
    # Nor how it reaches Ray (an exported RAY_ADDRESS settles ray.local_mode otherwise than before).
    d = C.load(None, ["ray.local_mode=false", "ray.address=10.0.0.1:6379"])
    assert d.differences(C.load(None, ["ray.local_mode=auto"])) == []


def test_resolved_config_round_trips(tmp_path):
    cfg = C.load(None, ["method=qlora", "lora.r=4"])
    C.save_resolved(cfg, tmp_path / "c.yaml")
    assert C.load(tmp_path / "c.yaml") == cfg


def test_qlora_in_float32_needs_float32_compute_too():
    with pytest.raises(C.ConfigError, match="quantization.compute_dtype=bfloat16"):
        C.load(None, ["method=qlora", "model.dtype=float32"])
    cfg = C.load(None, ["method=qlora", "model.dtype=float32", "quantization.compute_dtype=float32"])
    assert cfg.quantization.compute_dtype == "float32"


def test_a_run_directory_is_claimed_by_one_driver(tmp_path, capsys):
    import json
    import os
    import socket

    from ftcluster import run_dir

    cfg = C.load(None, [f"output.storage_path={tmp_path}", "output.name=claimed"])
    lock = cfg.run_dir / run_dir.LOCK
    prepare_run_dir(cfg)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    prepare_run_dir(cfg)  # the same driver again: still its own
    lock.write_text(json.dumps({"pid": 1, "host": "node-7", "started": "2026-11-26 10:00:00"}))
    with pytest.raises(C.ConfigError, match=r"in use by the run PID 1 started on node-7.*delete .*LOCK"):
        prepare_run_dir(cfg)
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    lock.write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "earlier"}))
    prepare_run_dir(cfg)  # left by a driver that died on this host: taken over
    assert "taking it over" in capsys.readouterr().out and json.loads(lock.read_text())["pid"] == os.getpid()
    run_dir.release(cfg.run_dir)
    assert not lock.exists()


def test_the_advice_after_a_worker_failure_offers_resuming_only_where_it_can_help(tmp_path):
    from ftcluster.train import after_failure

    assert "saved no checkpoint: running the same command again starts" in after_failure("RayActorError: died",
                                                                                          tmp_path)
    good = tmp_path / "checkpoint_step0000010"
    (good / "deepspeed").mkdir(parents=True)
    (good / "progress.json").write_text('{"step": 10}')
    (tmp_path / "checkpoint_step0000020").mkdir()  # unusable: no progress, no state
    advice = after_failure("RayActorError: node died", tmp_path)
    assert f"latest intact: {good})" in advice and "Run the same command again to resume" in advice
    full = after_failure("OSError: [Errno 28] No space left on device", tmp_path)
    assert "disk of the run directory is full" in full and str(good) in full and "Free space there" in full
    deterministic = after_failure("ValueError: data.source row 3 ...", tmp_path)
    assert "fails the same way" in deterministic and "resume" not in deterministic
    corrupt = after_failure("SafetensorError: Error while deserializing header: incomplete metadata", tmp_path)
    assert "fails the same way" in corrupt  # a node's own copy of the weights, cut short
    oom = after_failure("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate", tmp_path)
    assert "ran out of memory" in oom and "ftcluster estimate" in oom


def test_bf16_master_weights_need_a_bf16_model_without_the_qlora_upcast():
    assert C.load(None, ["optimizer.master_weights=bf16"]).optimizer.master_weights == "bf16"
    with pytest.raises(C.ConfigError, match="optimizer.master_weights=bf16 with model.dtype=float32"):
        C.load(None, ["optimizer.master_weights=bf16", "model.dtype=float32"])
    with pytest.raises(C.ConfigError, match="upcast_non_quantized"):
        C.load(None, ["optimizer.master_weights=bf16", "method=qlora", "quantization.upcast_non_quantized=true"])




def test_a_split_named_for_a_local_file_is_refused_rather_than_evaluating_on_training_rows(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    with pytest.raises(C.ConfigError, match=r"data.eval_split=validation .* evaluation would be on the training"):
        C.load(None, [f"data.source={data}", "data.eval_split=validation"])
    with pytest.raises(C.ConfigError, match=r"data.split=test .* a file has no splits"):
        C.load(None, [f"data.source={data}", "data.split=test"])
    assert C.load(None, [f"data.source={data}", "data.eval_fraction=0.1"]).data.eval_split is None
    # A hub dataset or directory keeps its splits.
    assert C.load(None, ["data.source=yahma/alpaca-cleaned", "data.eval_split=test"]).data.eval_split == "test"
    # With a file, data.eval_split names another file: there, not the source itself.
    with pytest.raises(C.ConfigError, match=r"data.eval_split: .*held.jsonl does not exist"):
        C.load(None, [f"data.source={data}", f"data.eval_split={tmp_path / 'held.jsonl'}"])
    with pytest.raises(C.ConfigError, match=r"data.eval_split=.*rows.jsonl is data.source itself"):
        C.load(None, [f"data.source={data}", f"data.eval_split={data}"])
    (tmp_path / "held.jsonl").write_text('{"instruction": "c", "output": "d"}\n')
    assert C.load(None, [f"data.source={data}", f"data.eval_split={tmp_path / 'held.jsonl'}"]).data.eval_split


def test_a_data_field_the_source_or_format_would_ignore_is_refused():
    for field, value in (("split", "test"), ("eval_split", "test"), ("format", "chat")):
        with pytest.raises(C.ConfigError, match=rf"data.{field}={value} with data.source=builtin:pydoc: .*Unset "
                                                rf"data.{field}"):
            C.load(None, [f"data.{field}={value}"])
    with pytest.raises(C.ConfigError, match="data.text_field=body with data.format=alpaca: only format=text"):
        C.load(None, ["data.source=org/rows", "data.text_field=body"])
    with pytest.raises(C.ConfigError, match="data.messages_field=turns with data.format=text: only format=chat"):
        C.load(None, ["data.source=org/rows", "data.format=text", "data.messages_field=turns"])
    assert C.load(None, ["data.source=org/rows", "data.format=chat", "data.messages_field=turns"])
    with pytest.raises(C.ConfigError, match="data.shuffle_buffer=100 with data.streaming=off: only a streamed"):
        C.load(None, ["data.source=org/rows", "data.streaming=off", "data.shuffle_buffer=100"])
    with pytest.raises(C.ConfigError, match=r"data.num_proc=4 with data.source=builtin:pydoc \(made in memory\)"):
        C.load(None, ["data.num_proc=4"])
    assert C.load(None, ["data.source=org/rows", "data.shuffle_buffer=100"]).data.shuffle_buffer == 100  # auto


def test_names_warmups_and_target_modules_that_would_go_wrong_are_refused_naming_the_fix():
    for name in ("../../x", ".", "team/run1", "/abs/run"):
        with pytest.raises(C.ConfigError, match=r"output.name=.*one name without '/', '.' or '..'"):
            C.load(None, [f"output.name={name}"])
    assert C.load(None, ["output.name=team-run1"]).output.name == "team-run1"
    with pytest.raises(C.ConfigError, match=r"scheduler.warmup_steps=50 with training.max_steps=20: the warm-up"):
        C.load(None, ["scheduler.warmup_steps=50", "training.max_steps=20"])
    with pytest.raises(C.ConfigError, match=r"scheduler.warmup_steps=5 and scheduler.warmup_ratio=0.1 are both set"):
        C.load(None, ["scheduler.warmup_steps=5", "scheduler.warmup_ratio=0.1"])
    with pytest.raises(C.ConfigError, match=r"lora.target_modules=q_proj: a list of module names, written \[q_proj\]"):
        C.load(None, ["lora.target_modules=q_proj"])
    assert C.load(None, ["lora.target_modules=all-linear"]).lora.target_modules == "all-linear"


def test_a_model_directory_of_pickled_weights_only_is_refused_before_anything_starts(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"a pickle")
    with pytest.raises(C.ConfigError, match=r"holds only pickled weights \(\*\.bin\).*convert them to safetensors"):
        C.load(None, [f"model.name_or_path={tmp_path}"])
    C.load(None, [f"model.name_or_path={tmp_path}", "model.random_init=true"])  # its weights are not read
    (tmp_path / "model.safetensors").write_bytes(b"")
    C.load(None, [f"model.name_or_path={tmp_path}"])


def test_a_model_that_needs_its_own_code_names_trust_remote_code(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mymodel",
                                                      "auto_map": {"AutoConfig": "configuration_my.MyConfig"}}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(C.ConfigError, match=r"model.name_or_path=.*code of its own.*model.trust_remote_code=true"):
        C.load(None, [f"model.name_or_path={tmp_path}"])
    C.load(None, [f"model.name_or_path={tmp_path}", "model.trust_remote_code=true"])
    # A built-in architecture whose config also carries a map: transformers loads its own code.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoConfig": "x.Y"}}))
    C.load(None, [f"model.name_or_path={tmp_path}"])
