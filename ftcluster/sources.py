"""Where a model comes from: the embedded SmolLM2, a local Hugging Face directory, a ``.gguf`` file or a hub id; its
tokenizer and its config. A hub id that cannot be read is one line naming the model and the cache looked in."""

from __future__ import annotations

from pathlib import Path

from ftcluster import embedded
from ftcluster.config import EMBEDDED_MODEL, ConfigError, ModelConfig


def resolve_source(model: ModelConfig) -> tuple[str, dict]:
    """Where to load from, and the extra ``from_pretrained`` keywords that location needs."""
    src = model.name_or_path
    if src == EMBEDDED_MODEL:
        return str(embedded.checkpoint_dir()), {}
    p = Path(src).expanduser()
    if p.suffix == ".gguf":
        return str(p.parent), {"gguf_file": p.name}
    return src, {}


def is_hub_id(name: str) -> bool:
    """Whether ``model.name_or_path`` names a model on the Hugging Face hub rather than something on disk."""
    return not (name.startswith(("embedded:", "/", ".", "~")) or Path(name).expanduser().exists())


def hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def unreachable(field: str, name: str, error: Exception) -> ConfigError:
    """The error for a hub id that could not be read: no network, not in the cache, gated, or misspelt."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
    return ConfigError(
        f"{field}={name}: cannot read it from the Hugging Face hub or the local cache ({hub_cache()}): {first[:200]}. "
        "Check the name; for a gated model set HF_TOKEN; offline, set HF_HOME to a cache that holds it or point "
        f"{field} at a local directory.")


def load_tokenizer(model: ModelConfig):
    from transformers import AutoTokenizer

    if model.tokenizer:
        name, src, kw, field = model.tokenizer, model.tokenizer, {}, "model.tokenizer"
    else:
        name, field = model.name_or_path, "model.name_or_path"
        src, kw = resolve_source(model)
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=model.trust_remote_code, **kw)
    except OSError as e:
        if not is_hub_id(name):
            raise
        raise unreachable(field, name, e) from None
    if tok.pad_token is None:
        # Packed batches carry no padding; unpacked ones pad with EOS and mask those labels.
        tok.pad_token = tok.eos_token
    return tok


def load_hf_config(model: ModelConfig):
    """The model's transformers config, with ``model.config_overrides`` set on it."""
    from transformers import AutoConfig

    src, kw = resolve_source(model)
    try:
        hf = AutoConfig.from_pretrained(src, trust_remote_code=model.trust_remote_code, **kw)
    except OSError as e:
        if not is_hub_id(model.name_or_path):
            raise
        raise unreachable("model.name_or_path", model.name_or_path, e) from None
    if hasattr(hf, "quantization_config") and "gguf_file" in kw:
        del hf.quantization_config  # GGUF weights are dequantized on load
    for key, value in model.config_overrides.items():
        if not hasattr(hf, key):
            raise ConfigError(f"model.config_overrides.{key}: the {hf.model_type} config has no field {key!r}")
        setattr(hf, key, value)
    return hf
