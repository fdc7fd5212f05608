import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from ftcluster import config as C
from ftcluster import models, sources
from ftcluster.preflight import check_adapter_targets, check_inputs
from tests import tiny

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000)


def cfg_for(tiny_model, *overrides):
    return C.load(None, [f"model.name_or_path={tiny_model}", *overrides])


def test_llama2_7b_with_r8_on_q_and_v_reports_4194304_trainable():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA2_7B))
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert models.parameter_counts(model) == (4_194_304, 6_742_609_920)
    assert models.describe_parameters(model).startswith("trainable params: 4,194,304 || all params: 6,742,609,920")


def test_a_target_module_the_model_lacks_is_an_error_before_training(tiny_model):
    cfg = cfg_for(tiny_model, "lora.target_modules=[q_proj,query_key_value]")
    with pytest.raises(C.ConfigError, match=r"lora.target_modules: \['query_key_value'\] not found in llama.*'v_proj'"):
        check_inputs(cfg, tiny.plan_for(cfg))


def test_full_trains_everything_and_lora_only_adapters(tiny_model):
    full = tiny.model_for(cfg_for(tiny_model, "method=full"))
    assert all(p.requires_grad for p in full.parameters())
    lora = tiny.model_for(cfg_for(tiny_model, "method=lora", "lora.target_modules=[q_proj,v_proj]"))
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert all(p.dtype == torch.bfloat16 for p in lora.parameters())
    assert lora.config.use_cache is False  # or transformers ignores packed-sequence boundaries


@pytest.mark.parametrize("upcast", [False, True])
def test_qlora_is_4bit_and_trains_with_finite_loss_with_or_without_the_fp32_upcast(tiny_model, upcast):
    import bitsandbytes as bnb

    cfg = cfg_for(tiny_model, "method=qlora", f"quantization.upcast_non_quantized={upcast}",
                  "model.gradient_checkpointing=true")
    model = tiny.model_for(cfg)
    assert isinstance(model.base_model.model.model.layers[0].mlp.down_proj.base_layer, bnb.nn.Linear4bit)
    norm_dtype = model.base_model.model.model.norm.weight.dtype
    assert norm_dtype == (torch.float32 if upcast else torch.bfloat16)
    model.train()
    losses = tiny.adamw_losses(model, 5, lr=1e-2)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_random_init_qlora_quantizes_every_linear_but_lm_head(tiny_model):
    import bitsandbytes as bnb

    model = tiny.base_for(cfg_for(tiny_model, "method=qlora", "model.random_init=true"))
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in linears if m is not model.lm_head)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert len([m for m in linears if isinstance(m, bnb.nn.Linear4bit)]) == 2 * 7


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_random_init_built_module_by_module_matches_a_whole_from_config_build(tiny_model, method):
    from transformers import AutoModelForCausalLM

    cfg = cfg_for(tiny_model, f"method={method}", "model.random_init=true",
                  "model.config_overrides={tie_word_embeddings: true}")
    model = tiny.base_for(cfg)
    reference = AutoModelForCausalLM.from_config(sources.load_hf_config(cfg.model), dtype=torch.bfloat16)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again after each got memory
    rotary, want = model.model.rotary_emb, reference.model.rotary_emb
    assert torch.equal(rotary.inv_freq, want.inv_freq) and rotary.attention_scaling == want.attention_scaling
    assert all(torch.all(m.weight == 1) for n, m in model.named_modules() if "RMSNorm" in type(m).__name__)
    std = sources.load_hf_config(cfg.model).initializer_range
    weight = model.model.embed_tokens.weight.float()
    assert abs(weight.std().item() - std) < 0.1 * std and abs(weight.mean().item()) < 0.1 * std
    if method == "lora":  # same module tree, shapes and dtypes as the whole build
        assert {n: (p.shape, p.dtype) for n, p in model.named_parameters()} == \
               {n: (p.shape, p.dtype) for n, p in reference.named_parameters()}
    ids = torch.randint(0, 500, (2, 32))
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and abs(loss.item() - math.log(model.config.vocab_size)) < 1.0  # random init


def test_config_overrides_must_name_real_fields(tiny_model):
    with pytest.raises(C.ConfigError, match="model.config_overrides.num_layerz"):
        sources.load_hf_config(cfg_for(tiny_model, "model.config_overrides={num_layerz: 2}").model)


def test_a_refused_config_leaves_no_run_directory_behind(tiny_model, tmp_path):
    from ftcluster import launch

    cfg = cfg_for(tiny_model, "lora.target_modules=[nope]", f"output.storage_path={tmp_path}", "output.name=r")
    with pytest.raises(C.ConfigError, match="nope"):
        launch.run(cfg)
    assert not (tmp_path / "r").exists()


def test_data_without_the_formats_fields_is_refused_before_ray_starts(tiny_model, tmp_path):
    from ftcluster import launch

    f = tmp_path / "d.jsonl"
    f.write_text('{"question": "a", "answer": "b"}\n' * 8)
    cfg = cfg_for(tiny_model, f"data.source={f}", f"output.storage_path={tmp_path}", "output.name=r")
    with pytest.raises(C.ConfigError, match=r"data.source: .*needs fields \['instruction', 'output'\]"):
        launch.run(cfg)
    assert not (tmp_path / "r").exists()


def _qwen2_moe_with_a_dense_first_layer(tmp_path):
    from transformers import Qwen2MoeConfig

    # Layer 0 has a dense MLP, layer 1 experts with a shared-expert gate: a name the first layer lacks.
    Qwen2MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, num_experts=4,
                   num_experts_per_tok=2, mlp_only_layers=[0]).save_pretrained(tmp_path)
    return tmp_path


def test_a_target_module_only_later_layers_have_is_found(tmp_path):
    cfg = C.load(None, [f"model.name_or_path={_qwen2_moe_with_a_dense_first_layer(tmp_path)}",
                        "lora.target_modules=[q_proj,shared_expert_gate]"])
    check_adapter_targets(cfg)  # the first layer lacks shared_expert_gate; the second has it
    with pytest.raises(C.ConfigError, match=r"lora.target_modules: \['expert_gate_up'\] not found in qwen2_moe"):
        check_adapter_targets(C.load(None, [f"model.name_or_path={tmp_path}",
                                            "lora.target_modules=[q_proj,expert_gate_up]"]))
