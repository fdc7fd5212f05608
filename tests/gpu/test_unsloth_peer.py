"""Unsloth, the peer timed beside ftcluster on one GPU (``--baseline unsloth``), trains the same model from the
same weights on the same rows as the HF recipe: its losses are the HF recipe's."""

import importlib.util
import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="unsloth is not installed")]

# The tiny test model widened to head_dim 128 (what Unsloth's kernels are tuned for), random weights.
SHAPE = "{hidden_size: 512, intermediate_size: 1536, num_attention_heads: 4, num_key_value_heads: 4, head_dim: 128}"


def peer(recipe: str, method: str, model, out) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.hf_baseline", "--config", "configs/bench/tiny.yaml", "--recipe", recipe,
           "--steps", "3", "--warmup", "1", "--out", str(out), f"model.name_or_path={model}", "model.random_init=true",
           "model.dtype=bfloat16", "quantization.compute_dtype=bfloat16", f"model.config_overrides={SHAPE}",
           f"method={method}", "lora.target_modules=[q_proj,v_proj]", "lora.dropout=0.0", "data.max_seq_len=512",
           "optimizer.lr=1.0e-3", "model.gradient_checkpointing=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("method, hf_recipe", [("full", "hf"), ("lora", "hf"), ("qlora", "hf-tuned")])
def test_unsloth_trains_the_hf_recipes_model_from_its_loss(method, hf_recipe, tiny_model, tmp_path):
    hf = peer(hf_recipe, method, tiny_model, tmp_path / "hf.json")
    unsloth = peer("unsloth", method, tiny_model, tmp_path / "unsloth.json")
    assert unsloth["recipe"] == "unsloth" and unsloth["trainable_params"] == hf["trainable_params"]
    # Before any update both run the same (NF4-quantized) weights on the same rows; bf16 kernels differ.
    assert unsloth["first_loss"] == pytest.approx(hf["first_loss"], rel=0.02)
    # The same optimizer over the same rows after that (LoRA's A matrices are drawn from different streams).
    assert unsloth["final_loss"] == pytest.approx(hf["final_loss"], rel=0.05)
