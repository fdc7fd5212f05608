"""Where a model comes from: the embedded SmolLM2, a local Hugging Face directory, a ``.gguf`` file or a hub id; its
tokenizer and its config. A hub id is downloaded once, by the driver, into ``model.hub_cache`` (huggingface_hub's
``snapshot_download``: its progress bars, its resume of a stalled connection); from then on the driver and every
worker read its snapshot there as a local directory. A hub id that cannot be read is one line naming the model and
the cache looked in."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

from ftcluster import embedded
from ftcluster.config import EMBEDDED_MODEL, ConfigError, ModelConfig, is_hub_id, remote_code

__all__ = ["is_hub_id", "resolve_source", "download", "snapshot", "load_tokenizer", "load_hf_config"]

WEIGHTS = ["*.safetensors", "*.safetensors.index.json"]
BESIDE = ["*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
"""What a snapshot holds: the safetensors weights, the configs, the tokenizer and the chat template. Not the
other weight formats a repository may also carry (``*.bin``, ``*.pth``, a Llama repository's ``original/``)."""


def _patterns(model: ModelConfig) -> tuple[list[str], list[str]]:
    return WEIGHTS + BESIDE + (["*.py"] if model.trust_remote_code else []), ["original/*"]


def snapshot(model: ModelConfig) -> Path | None:
    """The hub id's whole snapshot in ``model.hub_cache`` (no network), or None: before :func:`download`, the cache
    may hold only the config and tokenizer files read through it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    allow, ignore = _patterns(model)
    try:
        local = Path(snapshot_download(model.name_or_path, revision=model.revision, cache_dir=model.hub_cache,
                                       local_files_only=True, allow_patterns=allow, ignore_patterns=ignore))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    weights = weight_files(local)
    return local if (local / "config.json").is_file() and weights and all((local / w).is_file() for w in weights) \
        else None


def weight_files(directory: Path) -> list[str] | None:
    """The safetensors files a model directory's weights are in: those its index names, else ``model.safetensors``;
    None where it has neither."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"] if (directory / "model.safetensors").is_file() else None


def download(model: ModelConfig) -> Path:
    """Download the hub id's snapshot into ``model.hub_cache`` (files there already are kept, a stalled connection is
    resumed) and return its directory. The driver calls it once, before any worker starts. Offline
    (``HF_HUB_OFFLINE=1``) it is the snapshot the cache holds."""
    from huggingface_hub import snapshot_download

    allow, ignore = _patterns(model)
    if not hub_answers():
        local = snapshot(model)
        if local is None:
            raise unreachable("model.name_or_path", model.name_or_path, OSError("not in the cache"),
                              model.hub_cache)
        return local
    print(f"model: {model.name_or_path}{f'@{model.revision}' if model.revision else ''} from the hub into "
          f"{model.hub_cache} (model.hub_cache), once for every worker", flush=True)
    started = time.time()
    try:
        local = Path(snapshot_download(model.name_or_path, revision=model.revision, cache_dir=model.hub_cache,
                                       allow_patterns=allow, ignore_patterns=ignore))
    except Exception as e:  # noqa: BLE001 - every way a download fails (network, auth, name) is one line
        raise unreachable("model.name_or_path", model.name_or_path, e, model.hub_cache) from None
    weights = sorted(local.glob("*.safetensors"))
    if not weights:
        raise ConfigError(f"model.name_or_path={model.name_or_path}: the hub holds no safetensors weights for it "
                          f"(looked in {local}); convert them to safetensors in a local directory and point "
                          "model.name_or_path there")
    size = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
    print(f"model: {time.time() - started:.1f} s, {size / 1e9:.2f} GB in {len(weights)} safetensors file(s) at "
          f"{local}", flush=True)
    return local


def resolve_source(model: ModelConfig) -> tuple[str, dict]:
    """Where to load from, and the extra ``from_pretrained`` keywords that location needs: a hub id's snapshot in
    ``model.hub_cache`` once it is there, else the hub id itself, read through that cache."""
    src = model.name_or_path
    if src == EMBEDDED_MODEL:
        return str(embedded.checkpoint_dir()), {}
    p = Path(src).expanduser()
    if p.suffix == ".gguf":
        return str(p.parent), {"gguf_file": p.name}
    if is_hub_id(src):
        local = snapshot(model)
        if local is not None:
            return str(local), {}
        return src, {"cache_dir": model.hub_cache, **({"revision": model.revision} if model.revision else {}),
                     **({} if hub_answers() else {"local_files_only": True})}
    return src, {}


PROBE_S = 5.0


def hub_answers() -> bool:
    """Whether the hub's endpoint (``HF_ENDPOINT``) takes a connection within ``PROBE_S``; False offline
    (``HF_HUB_OFFLINE=1``). Where it does not, hub ids are read from the cache alone, at once, rather than through
    huggingface_hub's retries of each file (half a minute and more)."""
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE and _takes_connections(constants.ENDPOINT)


def hub_silent() -> str:
    """Why hub ids are read from caches alone (``hub_answers`` is False), for the user."""
    from huggingface_hub import constants

    return (f"the hub ({constants.ENDPOINT}) is offline (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else
            f"the hub ({constants.ENDPOINT}) could not be reached within {PROBE_S:.0f} s")


@functools.cache
def _takes_connections(endpoint: str) -> bool:
    """Asked once a process for each endpoint; through the proxy the environment names for it (HTTPS_PROXY, ...),
    where one does, as huggingface_hub's requests go."""
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=PROBE_S).close()
    except OSError:
        return False
    return True


def base_identity(model: ModelConfig) -> dict:
    """What identifies the base weights a run trains on, for ``merge`` to check it merges into the same: the hub
    revision of a downloaded snapshot, and the names and sizes of the weight files and config where it reads
    them (the embedded model: its converted checkpoint)."""
    src, kw = resolve_source(model)
    path = Path(src).expanduser()
    if "gguf_file" in kw:
        path = path / kw["gguf_file"]
    out = {"name_or_path": model.name_or_path}
    if not path.exists():  # a hub id read through the cache: its revision is what the hub names it
        return {**out, "revision": model.revision}
    if "snapshots" in path.parts:
        out["revision"] = path.name if path.is_dir() else path.parent.name
    files = [path] if path.is_file() else sorted(f for pattern in (*WEIGHTS, "config.json") for f in path.glob(pattern))
    return {**out, "files": {f.name: f.stat().st_size for f in files}}


def base_changes(recorded: dict, now: dict) -> list[str]:
    """How the base ``now`` differs from the ``recorded`` one, in words (empty: the same)."""
    out = []
    if recorded.get("revision") != now.get("revision"):
        out.append(f"revision {recorded.get('revision')} then, {now.get('revision')} now")
    then, files = recorded.get("files") or {}, now.get("files") or {}
    for name in sorted(then.keys() | files.keys()):
        if then.get(name) != files.get(name):
            out.append(f"{name}: " + ("missing now" if name not in files else "new" if name not in then
                                      else f"{then[name]:,} bytes then, {files[name]:,} now"))
    return out


def hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def unreachable(field: str, name: str, error: Exception, cache: str | None = None) -> ConfigError:
    """The error for a hub id that could not be read: no network, not in the cache, gated, or misspelt."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
    if not hub_answers():
        first = f"{hub_silent()}, and the cache does not hold it"
    return ConfigError(
        f"{field}={name}: cannot read it from the Hugging Face hub or the local cache ({cache or hub_cache()}): "
        f"{first[:200]}. Check the name; for a gated model set HF_TOKEN; offline, set model.hub_cache (or HF_HOME) "
        f"to a cache that holds it or point {field} at a local directory.")


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
        raise unreachable(field, name, e, model.hub_cache if field == "model.name_or_path" else None) from None
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
        raise unreachable("model.name_or_path", model.name_or_path, e, model.hub_cache) from None
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise remote_code(model.name_or_path) from None
    if hasattr(hf, "quantization_config") and "gguf_file" in kw:
        del hf.quantization_config  # GGUF weights are dequantized on load
    for key, value in model.config_overrides.items():
        if not hasattr(hf, key):
            raise ConfigError(f"model.config_overrides.{key}: the {hf.model_type} config has no field {key!r}")
        setattr(hf, key, value)
    return hf
