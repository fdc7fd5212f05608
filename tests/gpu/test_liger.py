"""Liger kernels on the GPU: the same first losses as transformers' own modules, and the logits never held whole
(Llama-3.2-1B shape cut to 4 layers, random init, seq 2048, micro batch 2: 1 GiB of bf16 logits per step)."""

import gc

import pytest
import torch

from ftcluster import config as C
from ftcluster import hardware, models
from ftcluster.presets import PRESETS
from tests import tiny

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not hardware.liger_here(), reason="liger-kernel not installed")]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_liger_matches_the_plain_modules_and_never_holds_the_logits(tmp_path, tiny_model, method):
    from transformers import LlamaConfig

    LlamaConfig(**{**PRESETS["llama-3.2-1b"], "num_hidden_layers": 4}).save_pretrained(tmp_path)
    device = torch.device("cuda")
    ids = torch.randint(0, 128000, (2, 2048), device=device, generator=torch.Generator(device).manual_seed(0))
    losses, peaks, evals = {}, {}, {}
    for mode in ("off", "on"):
        # Eager layers: compiled ones take only Liger's fused loss (Plan.liger_layers).
        cfg = C.load(None, [f"model.name_or_path={tmp_path}", f"model.tokenizer={tiny_model}", f"method={method}",
                            "model.random_init=true", "model.attn_implementation=sdpa", "lora.r=8", "model.compile=off",
                            "model.gradient_checkpointing=true", f"model.liger_kernel={mode}", "scaling.use_gpu=true"])
        torch.manual_seed(0)
        model = models.build_model(cfg, tiny.plan_here(cfg), device)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        losses[mode] = []
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[mode].append(loss.item())
        peaks[mode] = torch.cuda.max_memory_allocated(device) - base
        model.eval()  # evaluation (engine.evaluate) fuses the loss too: the logits are never held there either
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids)
        evals[mode] = (out.loss.item(), torch.cuda.max_memory_allocated(device) - before, out.logits is None)
        del model, opt, loss, out
        gc.collect()
        torch.cuda.empty_cache()
    print(f"GPU-RESULT liger {method}: losses off {losses['off']} on {losses['on']}; peak above the weights "
          f"{peaks['off'] / 2**30:.3f} -> {peaks['on'] / 2**30:.3f} GiB")
    assert losses["on"] == pytest.approx(losses["off"], rel=2e-2)  # bf16 kernels, three optimizer steps
    logits = ids.numel() * PRESETS["llama-3.2-1b"]["vocab_size"] * 2
    assert peaks["off"] - peaks["on"] > 0.5 * logits  # the fused loss never materializes them
    print(f"GPU-RESULT liger {method} evaluation: loss, peak, no logits: off {evals['off']} on {evals['on']}")
    assert evals["on"][0] == pytest.approx(evals["off"][0], rel=2e-2) and evals["on"][2]
    assert evals["off"][1] - evals["on"][1] > 0.5 * logits


def test_a_model_built_after_a_liger_one_gets_its_own_plan_only(tmp_path, tiny_model):
    """Liger's apply function also replaces transformers' norm and MLP classes and its RoPE function module-wide. A
    model built after one with all of Liger's kernels, compiled (whose plan is the fused loss only), has
    transformers' own norms, MLPs and RoPE; the first keeps Liger's."""
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama

    def transformers_own(obj) -> bool:  # not Liger's, whatever earlier tests in this process applied
        return obj.__module__.startswith("transformers.")
    LlamaConfig(**{**PRESETS["llama-3.2-1b"], "num_hidden_layers": 2}).save_pretrained(tmp_path)
    built = {}
    for compile_ in ("off", "on"):
        cfg = C.load(None, [f"model.name_or_path={tmp_path}", f"model.tokenizer={tiny_model}", "method=lora",
                            "model.random_init=true", "model.gradient_checkpointing=true", "model.liger_kernel=auto",
                            f"model.compile={compile_}", "scaling.use_gpu=true"])
        built[compile_] = models.build_model(cfg, tiny.plan_here(cfg), torch.device("cuda")).get_base_model()
        if compile_ == "off":
            assert built["off"].model.norm.forward.__func__ is LigerRMSNorm.forward  # the instance is patched
            assert not transformers_own(modeling_llama.apply_rotary_pos_emb)  # Liger's RoPE is module-wide
            assert transformers_own(modeling_llama.LlamaRMSNorm) and transformers_own(modeling_llama.LlamaMLP)
    layer = built["on"].model.layers[0]
    assert transformers_own(type(layer.input_layernorm)) and transformers_own(type(layer.mlp))
    assert "forward" not in vars(layer.input_layernorm) and "forward" not in vars(layer.mlp)
    assert transformers_own(modeling_llama.apply_rotary_pos_emb)


def test_larger_fused_loss_chunks_give_the_same_loss_and_output_layer_gradient(tmp_path, tiny_model):
    """model.fused_loss_chunk_scale reaches Liger's loss: 8 gives the 1B shape's 4096-token batch 8 chunks instead of
    32 (fewer passes over the trained output layer's gradient), the same loss and gradient, and its chunk's logits
    take their share of memory."""
    from transformers import LlamaConfig

    LlamaConfig(**{**PRESETS["llama-3.2-1b"], "num_hidden_layers": 2}).save_pretrained(tmp_path)
    device = torch.device("cuda")
    ids = torch.randint(0, 128000, (2, 2048), device=device, generator=torch.Generator(device).manual_seed(0))
    out = {}
    for scale in (1, 8):
        cfg = C.load(None, [f"model.name_or_path={tmp_path}", f"model.tokenizer={tiny_model}", "method=full",
                            "model.random_init=true", "model.compile=off", f"model.fused_loss_chunk_scale={scale}",
                            "scaling.use_gpu=true"])
        torch.manual_seed(0)
        model = models.build_model(cfg, tiny.plan_here(cfg), device)
        model.train()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        passes = sum(e.count for e in prof.key_averages() if e.key == "aten::addmm")
        out[scale] = (loss.item(), model.lm_head.weight.grad.float().clone(), passes,
                      torch.cuda.max_memory_allocated(device) - base)
        del model, loss
        gc.collect()
        torch.cuda.empty_cache()
    print(f"GPU-RESULT fused loss chunks: addmm passes {out[1][2]} -> {out[8][2]}, peak above the weights "
          f"{out[1][3] / 2**30:.3f} -> {out[8][3] / 2**30:.3f} GiB")
    assert out[8][0] == pytest.approx(out[1][0], rel=1e-3)
    assert torch.nn.functional.cosine_similarity(out[8][1].flatten(), out[1][1].flatten(), dim=0) > 0.999
    assert out[1][2] == 32 and out[8][2] == 8
