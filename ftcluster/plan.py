"""The run's plan: every decision a run makes, resolved once from its config, the model's architecture and the
hardware it will run on, each with a one-line reason.

    python -m ftcluster plan --config configs/llama2_7b_qlora.yaml [overrides] [--device cuda] [--diff key=value]

The driver makes the plan before anything starts, prints it, and saves it as ``plan.json`` in the run directory;
the backend hands it to every worker, and the builders (model, kernels, compiled layers, DeepSpeed, optimizer,
data) read its answers instead of deriving their own. The memory estimator reads it too (``estimator_run``), so
what is estimated is what runs. No rule below is stated anywhere else.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ftcluster import estimate
from ftcluster.config import ConfigError, DataConfig, RunConfig, is_hub_id, layers_clash
from ftcluster.data import reading
from ftcluster.hardware import Hardware
from ftcluster.presets import PRESETS

LIGER_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Architectures whose Liger kernels are wired (ftcluster.kernels.APPLY)."""


@dataclass(frozen=True)
class Architecture:
    """What the plan needs of the model: its type, its decoder layers, and its shape for the memory estimate (None
    where the estimator does not model it)."""
    model_type: str
    layers: int | None
    shape: estimate.Shape | None
    max_positions: int | None = None
    """``max_position_embeddings``: the positions the model was trained at (None: not given)."""
    rope_scaling: str | None = None
    """The RoPE scaling the config sets (``yarn``, ``linear``, ``llama3``...), which lets it run past them."""
    rope_theta: float | None = None


@dataclass(frozen=True)
class Resume:
    """The run directory's latest checkpoint, as a resumed run finds it."""
    checkpoint: str
    step: int
    workers: int | None
    """How many workers saved it (None: a checkpoint of an earlier version, which did not say)."""
    global_batch: int | None


@dataclass(frozen=True)
class Plan:
    """Every decision of one run. ``reasons`` holds a one-line reason for each field above it."""
    backend: str
    """``in-process`` (the one worker in the driver's process, without Ray) or ``ray`` (Ray Train workers)."""
    device: str
    """Where the workers compute: ``cuda`` or ``cpu``."""
    workers: int
    zero_stage: int
    """The ZeRO stage DeepSpeed's engine runs."""
    frozen_base: str | None
    """Adapters only: ``whole`` (every worker holds it), ``layer-shards`` (partitioned by decoder layers,
    ftcluster/layer_shards.py) or ``deepspeed`` (DeepSpeed's ZeRO-3 partitions it); None for full fine-tuning."""
    compile: bool
    """Each decoder layer compiled with torch.compile (ftcluster/compiled.py)."""
    liger_layers: bool
    """Liger's RMSNorm, SwiGLU and RoPE in the decoder layers (ftcluster/kernels.py)."""
    loss: str
    """``liger-fused`` (Liger's linear + cross-entropy, a chunk of tokens at a time) or ``chunked`` (the output
    layer's logits in bf16, the loss in float32 a chunk at a time: ftcluster/activations.py)."""
    attention: str
    checkpointed_layers: int
    """Decoder layers whose activations are recomputed in backward (from the first); 0: none."""
    activation_offloading: bool
    recompute_only: tuple[str, ...]
    """Operator namespaces every compiled layer recomputes rather than saves (bitsandbytes' dequantization)."""
    keep_recomputed_weights: bool
    """QLoRA: a checkpointed layer's recomputed dequantized weights are kept for its backward."""
    masters: str
    """Where float32 master weights live: ``deepspeed``, ``optimizer`` (optim.Float32Masters), or ``none`` (the
    16-bit weights are stepped, or the model is float32)."""
    clips_gradients: str
    """Who clips the gradients: ``deepspeed`` or ``ftcluster`` (where DeepSpeed wraps nothing around the optimizer,
    ZeRO-0 over the model's own weights)."""
    quant_storage: str | None
    """QLoRA: the dtype the packed 4-bit weights are stored in."""
    streaming: bool
    """Rows prepared in one streaming pass over the source (ftcluster/data/streaming.py)."""
    evaluation: str
    """What the evaluation examples are: ``held-out`` (a share of the train split), ``split`` (a split or file
    named for it), ``validation`` (a share of the training examples; the held-out ones unused) or ``none``."""
    micro_batch: int
    accumulation: int
    global_batch: int
    """Sequences (rows) per optimizer step, over every worker."""
    memory_gib: float | None
    """Estimated device memory per GPU (ftcluster/estimate.py); None on CPUs or for an architecture it does not
    model."""
    padding_free: bool = False
    """Each micro batch is one row of ``micro_batch`` rows' worth of tokens (``data.padding_free``,
    packing.ShardedBatches)."""
    tiled_mlp: bool = False
    """Each decoder layer's MLP runs a slice of the row at a time (ftcluster/tiled_mlp.py)."""
    sequence_parallel: int = 1
    """Workers that share each row, a 1/K slice of its tokens each (DeepSpeed's Ulysses: ftcluster/
    sequence_parallel.py); 1: every worker trains on whole rows."""
    elastic: dict[int, int] | None = None
    """With scaling.min_workers: the gradient accumulation for each worker count Ray Train may run the run on
    (``for_workers``); None: always ``workers``."""
    model_download: str | None = None
    """Where the driver downloads a hub id's snapshot, once, before any worker starts (``model.hub_cache``); None:
    the model is read where it is."""
    resume_from: str | None = None
    """The checkpoint the run continues from (the run directory's latest), or None."""
    model_type: str = ""
    layers: int | None = None
    reasons: dict = field(default_factory=dict)

    @property
    def partitions_parameters(self) -> bool:
        """Parameters are split across workers and gathered in hooks on each layer's call (DeepSpeed's ZeRO-3, or
        layer shards): a weight read outside its module's call would be a shard."""
        return self.zero_stage == 3 or self.frozen_base == "layer-shards"

    def for_workers(self, workers: int) -> "Plan":
        """The plan as it runs on ``workers`` workers: an elastic run's count is Ray Train's to choose, between
        scaling.min_workers and num_workers, and each count has its accumulation (``elastic``)."""
        if workers == self.workers:
            return self
        if not self.elastic or workers not in self.elastic:
            raise ValueError(f"the plan is for {self.workers} workers, not {workers}")
        acc = self.elastic[workers]
        return replace(self, workers=workers, accumulation=acc, global_batch=self.micro_batch * acc * workers)

    @property
    def in_process(self) -> bool:
        return self.backend == "in-process"

    @property
    def steps_model_weights(self) -> bool:
        """DeepSpeed hands the optimizer the model's own weights and gradients and wraps nothing around it."""
        return self.clips_gradients == "ftcluster"

    def to_json(self) -> dict:
        return {**asdict(self), "recompute_only": list(self.recompute_only)}

    @classmethod
    def from_json(cls, d: dict) -> "Plan":
        elastic = {int(n): acc for n, acc in d["elastic"].items()} if d.get("elastic") else None
        return cls(**{**d, "recompute_only": tuple(d.get("recompute_only", ())), "elastic": elastic})

    def save(self, run_dir: Path) -> None:
        (Path(run_dir) / "plan.json").write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def decisions(self) -> list[tuple[str, object, str]]:
        """(name, value, reason) of every decision, in order."""
        return [(f.name, getattr(self, f.name), self.reasons.get(f.name, "")) for f in fields(self)
                if f.name in self.reasons]

    def describe(self) -> str:
        """The plan as the run prints it: one line per decision, with its reason."""
        lines = ["plan:"]
        for name, value, reason in self.decisions():
            lines.append(f"  {name:<23} {_shown(value):<13} {reason}")
        return "\n".join(lines)


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(value) or "-"
    if isinstance(value, float):
        return f"{value:.1f} GiB"
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in value.items())
    return "-" if value is None else str(value)


def changes(before: Plan, after: Plan) -> list[str]:
    """The decisions that differ between two plans, each with its new reason."""
    out = []
    for (name, old, _), (_, new, reason) in zip(before.decisions(), after.decisions()):
        if old != new:
            out.append(f"{name}: {_shown(old)} -> {_shown(new)} ({reason})")
    return out


# ---------------------------------------------------------------------------------------------------------------
# The architecture

@functools.cache
def _architecture_of(model_json: str) -> Architecture:
    from ftcluster import sources
    from ftcluster.config import ModelConfig

    m = ModelConfig.model_validate_json(model_json)
    preset = estimate.preset_of(m.name_or_path)
    if preset:
        fields_ = {**PRESETS[preset], **m.config_overrides}
        model_type = "llama"
    else:
        path = Path(m.name_or_path).expanduser()
        config_json = path if path.suffix == ".json" else path / "config.json"
        if config_json.is_file():  # read as written: transformers is not needed for a local config
            try:
                fields_ = {**json.loads(config_json.read_text()), **m.config_overrides}
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
                raise ConfigError(f"model.name_or_path={m.name_or_path}: {config_json} is not a JSON object of the "
                                  f"model's config ({e}); restore the file from where the model came from") from None
        if not config_json.is_file() or "num_hidden_layers" not in fields_:  # a hub id, a GGUF file, other names
            hf = sources.load_hf_config(m)
            fields_ = {**hf.to_dict(), "num_hidden_layers": getattr(hf, "num_hidden_layers", None)}
        model_type = fields_.get("model_type", "")
    try:
        shape = estimate.shape_of_fields(fields_, m.name_or_path)
    except SystemExit:
        shape = None
    return Architecture(model_type=model_type, layers=fields_.get("num_hidden_layers"), shape=shape,
                        max_positions=fields_.get("max_position_embeddings"), rope_scaling=_rope_type(fields_),
                        rope_theta=fields_.get("rope_theta") or (fields_.get("rope_parameters") or {}).get("rope_theta"))


def _rope_type(fields_: dict) -> str | None:
    """The scaling of the config's RoPE, from ``rope_scaling`` (transformers 4) or ``rope_parameters`` (5), or None
    for plain RoPE."""
    for key in ("rope_scaling", "rope_parameters"):
        params = fields_.get(key) or {}
        kind = params.get("rope_type") or params.get("type")
        if kind and kind != "default":
            return kind
    return None


def check_length(cfg: RunConfig, arch: Architecture) -> None:
    """Refuse rows longer than the model's positions, unless its RoPE is scaled to reach them."""
    n, limit = cfg.data.max_seq_len, arch.max_positions
    if beyond_positions(n, arch):
        raise ConfigError(
            f"data.max_seq_len={n} is beyond the model's max_position_embeddings={limit}: positions past it were "
            f"never trained, and the loss there means little. Lower data.max_seq_len to {limit}, or scale RoPE to "
            f"reach {n}: {yarn_override(n, arch)}.")


def beyond_positions(length: int, arch: Architecture) -> bool:
    """Whether rows of ``length`` tokens pass the model's positions with its RoPE unscaled."""
    return bool(arch.max_positions) and length > arch.max_positions and not arch.rope_scaling


def yarn_override(length: int, arch: Architecture) -> str:
    """The override that scales the model's RoPE with YaRN to reach ``length`` tokens."""
    factor = -(-length // arch.max_positions)
    return (f"model.config_overrides={{rope_parameters: {{rope_type: yarn, factor: {factor}.0, "
            f"original_max_position_embeddings: {arch.max_positions}, rope_theta: {arch.rope_theta or 10000.0:g}}}}}")


def architecture(cfg: RunConfig) -> Architecture:
    """The model's type, layer count and shape: from its preset (a known hub id or the embedded model: no read),
    else its config.json, locally or from the hub."""
    return _architecture_of(cfg.model.model_dump_json())


# ---------------------------------------------------------------------------------------------------------------
# The decisions, one function each: (value, reason)

def _backend(cfg: RunConfig, hw: Hardware) -> tuple[str, str]:
    r = cfg.ray
    if r.local_mode is True:
        return "in-process", "ray.local_mode=true"
    if r.local_mode is False:
        return "ray", "ray.local_mode=false"
    why_ray = (f"scaling.num_workers={cfg.scaling.num_workers}" if cfg.scaling.num_workers != 1
               else f"ray.max_failures={r.max_failures}: restarts are Ray Train's" if r.max_failures
               else f"ray.address={r.address}" if r.address
               else f"there is a cluster to join: {hw.ray_cluster}" if hw.ray_cluster else None)
    if why_ray:
        return "ray", f"{why_ray} (ray.local_mode=auto)"
    return "in-process", ("one worker, no restarts and no Ray cluster to join: the worker runs in this process "
                          "without Ray (ray.local_mode=auto; false runs it on Ray)")


def _zero(cfg: RunConfig) -> tuple[int, str | None, str, str]:
    """(the stage DeepSpeed runs, the frozen base's placement, and a reason for each)."""
    stage = cfg.deepspeed.zero_stage
    if not cfg.trains_adapter:
        return stage, None, f"deepspeed.zero_stage={stage}", "full fine-tuning: nothing is frozen"
    if stage != 3:
        return (stage, "whole", f"deepspeed.zero_stage={stage}",
                f"ZeRO-{stage} partitions the adapters' gradients and optimizer state, never parameters")
    clash = layers_clash(cfg)
    if cfg.deepspeed.zero3_frozen == "deepspeed" or clash:
        why = "deepspeed.zero3_frozen=deepspeed" if not clash else f"layer shards cannot apply: {clash}"
        return 3, "deepspeed", f"deepspeed.zero_stage=3 ({why})", f"DeepSpeed's ZeRO-3 partitions it ({why})"
    if cfg.scaling.num_workers == 1:
        why = "one worker: no other rank could hold a shard (deepspeed.zero3_frozen=auto)"
        return 2, "whole", f"ZeRO-3 for adapters on {why}; the adapters run under ZeRO-2", f"kept whole on {why}"
    return (2, "layer-shards", "the frozen base is in layer shards; DeepSpeed's ZeRO-2 runs the adapters",
            "deepspeed.zero_stage=3 with deepspeed.zero3_frozen=auto: one gather per decoder layer and pass "
            "(ftcluster/layer_shards.py)")


TILED_MLP_FROM_BYTES = 2 * 2**30
"""``model.tiled_mlp=auto`` tiles where one micro batch's MLP intermediates would take at least this much a layer
(a gated MLP's gate, up and their product, bf16: 6 x intermediate bytes a token); Llama-3-8B's from 25k tokens."""


def _tiled_mlp(cfg: RunConfig, arch: Architecture) -> tuple[bool, str]:
    mode = cfg.model.tiled_mlp
    if mode == "off":
        return False, "model.tiled_mlp=off"
    if arch.shape is None:
        if mode == "on":
            raise ConfigError(f"model.tiled_mlp=on: the {arch.model_type} architecture's MLP is not known to this "
                              "tool (ftcluster/estimate.py); set model.tiled_mlp=auto or off")
        return False, f"model.tiled_mlp=auto: the {arch.model_type} MLP's size is not known here"
    tokens = cfg.training.micro_batch_size * cfg.data.max_seq_len // cfg.scaling.sequence_parallel
    held = 6 * arch.shape.intermediate * tokens
    size = f"{held / 2**30:.1f} GiB of MLP intermediates a layer for {tokens:,} tokens"
    if mode == "on":
        return True, f"model.tiled_mlp=on ({size} untiled)"
    if held >= TILED_MLP_FROM_BYTES:
        return True, (f"model.tiled_mlp=auto: {size} untiled, a slice of {arch.shape.hidden:,} tokens at a time "
                      "(the GPUs' memory not known)")
    return False, f"model.tiled_mlp=auto: {size}, under {TILED_MLP_FROM_BYTES / 2**30:g} GiB"


def _compile(cfg: RunConfig, device: str, partitions: bool, tiled: bool = False) -> tuple[bool, str]:
    mode = cfg.model.compile
    if mode == "off":
        return False, "model.compile=off"
    why_not = ("ZeRO-3 gathers and releases each layer's parameters in hooks on the layer's call" if partitions
               else "the tiled MLP (model.tiled_mlp) loops over slices in Python, which a compiled layer would not"
               if tiled
               else "model.activation_offloading's saved-tensor hooks cannot be traced"
               if cfg.model.activation_offloading == "on"
               else "Ulysses' all-to-all (scaling.sequence_parallel) inside each layer's attention is not compiled here"
               if cfg.scaling.sequence_parallel > 1
               else f"the device is {device}; compiled layers pay off on GPUs, whose kernels the host must keep fed"
               if device != "cuda" else None)
    if why_not:
        if mode == "on":
            raise ConfigError(f"model.compile=on: {why_not}; set model.compile=auto or off")
        return False, f"model.compile=auto: {why_not}"
    if mode == "auto" and cfg.scaling.num_workers != 1:
        return False, "model.compile=auto: several workers are not measured compiled yet; model.compile=on compiles"
    return True, f"model.compile={mode}: each decoder layer compiled once, reused by all of them"


def _liger(cfg: RunConfig, hw: Hardware, arch: Architecture, partitions: bool,
           compiled: bool) -> tuple[bool, str, str, str]:
    """(Liger in the layers, the loss, and a reason for each)."""
    mode = cfg.model.liger_kernel
    why_not = ("model.liger_kernel=off" if mode == "off"
               else f"the device is {hw.device}; Liger's kernels are Triton kernels for CUDA GPUs" if hw.device != "cuda"
               else "liger_kernel is not installed (pip install 'ftcluster[liger]')" if not hw.liger_installed
               else f"Liger has no kernels wired here for model_type {arch.model_type!r}"
               if arch.model_type not in LIGER_MODEL_TYPES else None)
    chunked = "chunked: the logits in bf16, the loss in float32 one chunk at a time"
    if why_not:
        if mode == "on":
            raise ConfigError(f"model.liger_kernel=on: {why_not}; set model.liger_kernel=auto or off")
        return False, "chunked", f"Liger not applied: {why_not}", f"{chunked} (Liger not applied: {why_not})"
    in_layers = not compiled
    layers_why = ("compiled layers fuse their norms, SwiGLU and RoPE themselves (Liger's autograd functions would "
                  "break the layer's graph)" if compiled else f"model.liger_kernel={mode}: RMSNorm, SwiGLU and RoPE")
    if partitions:
        # The fused loss reads the output layer's weight directly, not through the module's call: under ZeRO-3 it
        # would see an empty partition.
        return in_layers, "chunked", layers_why, f"{chunked} (the fused loss would read a ZeRO-3 partition)"
    scale = cfg.model.fused_loss_chunk_scale
    return (in_layers, "liger-fused", layers_why,
            "Liger's fused linear + cross-entropy: never holds the logits"
            + (f" (chunks {scale}x Liger's, model.fused_loss_chunk_scale)" if scale != 1 else ""))


def _attention(cfg: RunConfig, hw: Hardware) -> tuple[str, str]:
    choice = cfg.model.attn_implementation
    if choice != "auto":
        return choice, f"model.attn_implementation={choice}"
    if hw.device == "cuda" and cfg.data.packing and hw.varlen_kernel:
        return "varlen", ("auto: PyTorch's varlen flash kernel over packed rows, no mask; a micro batch whose rows "
                          "each hold one example through SDPA where it runs cuDNN attention on the GPU")
    why = ("rows are not packed" if not cfg.data.packing else "the device is not a GPU" if hw.device != "cuda"
           else "this torch has no varlen kernel")
    return "sdpa", f"auto: {why}"


def _padding_free(cfg: RunConfig, attention: str, streams: bool) -> tuple[bool, str]:
    d, b = cfg.data, cfg.training.micro_batch_size
    if not d.padding_free:
        return False, (f"data.padding_free=false: a micro batch is {b} row(s) of up to {d.max_seq_len} tokens, each "
                       "padded to it")
    if streams:
        raise ConfigError(f"data.padding_free=true with data.source={d.source} streamed: regrouping the rows as they "
                          "are batched reads every row's examples into memory. Set data.streaming=off if the rows "
                          "fit in memory, or unset data.padding_free")
    cost = ("attention costs what the examples do" if attention == "varlen" else
            f"attention={attention} masks the whole row: its work grows with the square of the row, not of each "
            "example")
    return True, (f"data.padding_free=true: a micro batch is one row of up to {b} x {d.max_seq_len} tokens, the "
                  f"packed rows' examples regrouped best fit; {cost}")


def _sequence_parallel(cfg: RunConfig, arch: Architecture, attention: str) -> tuple[int, str]:
    """Ulysses splits a row's tokens over K workers and, around attention, its heads: refused where the workers,
    heads or attention cannot be split that way."""
    k, n = cfg.scaling.sequence_parallel, cfg.scaling.num_workers
    if k == 1:
        return 1, "scaling.sequence_parallel=1: each worker trains on whole rows"
    if n % k:
        raise ConfigError(f"scaling.sequence_parallel={k} must divide scaling.num_workers={n}: each group of {k} "
                          f"workers shares its rows; use num_workers={n - n % k or k} or {n + k - n % k}")
    if cfg.scaling.min_workers is not None:
        raise ConfigError(f"scaling.sequence_parallel={k} with scaling.min_workers={cfg.scaling.min_workers}: an "
                          "elastic run may lose one worker of a sequence-parallel group, which then cannot go on; "
                          "unset scaling.min_workers (node loss then restarts from the latest checkpoint)")
    if attention == "eager":
        raise ConfigError(f"scaling.sequence_parallel={k} with model.attn_implementation=eager: Ulysses drops the "
                          "attention mask, which eager attention needs; use sdpa, varlen or flash_attention_2")
    if cfg.data.packing and attention == "sdpa":
        raise ConfigError(f"scaling.sequence_parallel={k} with data.packing=true needs an attention that keeps packed "
                          f"examples apart by their positions (model.attn_implementation=varlen or "
                          "flash_attention_2, GPUs only), not sdpa (Ulysses drops the mask it would need); or set "
                          "data.packing=false")
    if arch.shape is not None:
        heads, kv = arch.shape.heads, arch.shape.kv_heads
        if heads % k or (kv % k and k % kv):
            raise ConfigError(f"scaling.sequence_parallel={k}: {arch.model_type} has {heads} attention heads and {kv} "
                              f"key/value heads; Ulysses gives each of the {k} workers a share of the heads, so "
                              "sequence_parallel must divide the heads and divide or be a multiple of the key/value "
                              "heads")
    return k, (f"scaling.sequence_parallel={k}: each row's tokens split over {k} workers (DeepSpeed Ulysses), "
               f"{n // k} data-parallel group(s) of them")


def _checkpointing(cfg: RunConfig, arch: Architecture) -> tuple[int, str]:
    m = cfg.model
    if not m.gradient_checkpointing:
        return 0, "model.gradient_checkpointing=false: every layer keeps its activations"
    if arch.layers is not None and m.checkpointed_layers is not None and m.checkpointed_layers > arch.layers:
        raise ConfigError(f"model.checkpointed_layers={m.checkpointed_layers}: {arch.model_type} has {arch.layers} "
                          f"decoder layers; set at most {arch.layers}, or leave it unset to checkpoint all of them")
    n = m.checkpointed_layers if m.checkpointed_layers is not None else arch.layers or 0
    where = ", the checkpoints in host memory" if m.activation_offloading == "on" else ""
    if m.checkpointed_layers is None:
        return n, f"model.gradient_checkpointing=true: every decoder layer{where}"
    return n, f"model.checkpointed_layers={n} of {arch.layers}{where}; the others skip their recompute"


def _keep_recomputed(cfg: RunConfig, partitions: bool) -> tuple[bool, str]:
    mode = cfg.quantization.keep_recomputed_weights
    if cfg.method != "qlora" or not cfg.model.gradient_checkpointing:
        return False, "QLoRA's checkpointed layers only"
    if mode != "auto":
        return mode == "on", f"quantization.keep_recomputed_weights={mode}"
    if partitions:
        return False, "auto: off where ZeRO-3 partitions the parameters, which is chosen to save memory"
    return True, "auto: each 4-bit weight dequantized twice a step, not three times, for one layer's 16-bit weights"


def _masters(cfg: RunConfig, zero_stage: int) -> tuple[str, str, str, str]:
    """(where the float32 masters are, who clips, and a reason for each)."""
    dtype, masters = cfg.model.dtype, cfg.optimizer.master_weights
    if cfg.deepspeed.offload_optimizer == "cpu":
        return ("deepspeed", "deepspeed", "deepspeed.offload_optimizer=cpu: DeepSpeed's CPU Adam steps float32 "
                "copies on the host", "DeepSpeed")
    steps_model = zero_stage == 0 and dtype in ("bfloat16", "float32")
    clips = "ftcluster" if steps_model else "deepspeed"
    clip_why = ("ZeRO-0 over the model's own weights: one foreach norm and scale, at each optimizer step"
                if steps_model else f"DeepSpeed's ZeRO-{zero_stage} engine")
    if dtype == "float32":
        return "none", clips, "model.dtype=float32: the weights are float32 themselves", clip_why
    if masters == "bf16":
        return "none", clips, "optimizer.master_weights=bf16: the optimizer steps the bf16 weights", clip_why
    if steps_model and dtype == "bfloat16":
        return ("optimizer", clips, "ZeRO-0: the optimizer keeps flat float32 copies (optim.Float32Masters), "
                "stepped with foreach kernels", clip_why)
    return "deepspeed", clips, f"DeepSpeed's {dtype} mode keeps float32 copies of what trains", clip_why


def _quant_storage(cfg: RunConfig) -> tuple[str | None, str]:
    q = cfg.quantization
    if cfg.method != "qlora":
        return None, "QLoRA only"
    if q.quant_storage != "auto":
        return q.quant_storage, f"quantization.quant_storage={q.quant_storage}"
    if cfg.deepspeed.zero_stage == 3:
        return q.compute_dtype, "auto: in the compute dtype under deepspeed.zero_stage=3, so ZeRO can shard them"
    return "uint8", "auto: bitsandbytes' packed bytes"


def streaming(d: DataConfig, read_data: bool = True) -> tuple[bool, str]:
    """Whether rows are prepared in one streaming pass over the source, and why."""
    if d.source.startswith("builtin:"):
        return False, f"{d.source} is made in memory"
    if d.streaming != "auto":
        return d.streaming == "on", f"data.streaming={d.streaming}"
    path = Path(d.source).expanduser()
    if path.is_file() and path.suffix == ".json" and reading.is_json_array(path):
        return False, "auto: a JSON array is one document, read whole either way"
    if not read_data:
        return False, "auto: decided by the source's size when the run reads it (not read here)"
    try:
        size = reading.source_bytes(d)
    except (ConnectionError, OSError) as e:
        raise ConfigError(f"data.source={d.source}: cannot read it from the hub or the datasets cache to size it "
                          f"({type(e).__name__}: {str(e)[:300]}); check the name and the network (HF_TOKEN for a "
                          "gated dataset, HF_HOME for the cache), or set data.streaming=on or off to decide without "
                          "reading it") from None
    above = size > reading.STREAM_ABOVE
    return above, (f"auto: the source is {size / 2**30:.2f} GiB, " + ("over" if above else "within")
                   + f" {reading.STREAM_ABOVE / 2**30:.0f} GiB")


def evaluation(d: DataConfig) -> tuple[str, str]:
    """What the run evaluates on, and why (ftcluster/data/reading.py makes the split)."""
    if d.validation_fraction > 0:
        return "validation", (f"data.validation_fraction={d.validation_fraction}: that share of the training "
                              "examples; the held-out (test) examples are not used")
    if d.eval_split:
        return "split", f"data.eval_split={d.eval_split}"
    if d.source.startswith("builtin:"):
        return "held-out", (f"data.eval_fraction={d.eval_fraction or 0.1} of {d.source}, chosen by a hash of each "
                            "example's name")
    if d.eval_fraction > 0:
        return "held-out", f"data.eval_fraction={d.eval_fraction} of the train split, never trained on"
    return "none", "data.eval_fraction=0 and no data.eval_split"


def accumulation_for(global_batch: int, micro_batch: int, workers: int) -> int:
    """The gradient accumulation that makes ``global_batch`` rows a step from ``workers`` workers' micro batches of
    ``micro_batch`` rows; ``ConfigError``, naming the worker counts and micro batches that can, where none does."""
    per_step = micro_batch * workers
    if global_batch % per_step == 0:
        return global_batch // per_step
    can = [n for n in range(1, global_batch + 1) if global_batch % (micro_batch * n) == 0]
    micro = [m for m in range(1, global_batch + 1) if global_batch % (m * workers) == 0]
    raise ConfigError(
        f"scaling.num_workers={workers} with training.micro_batch_size={micro_batch} cannot keep the run's global "
        f"batch of {global_batch} rows a step (the resumed checkpoint's): use scaling.num_workers in "
        f"{can or '(none)'}, or training.micro_batch_size in {micro or '(none)'} with {workers} workers")


def _batch(cfg: RunConfig, resume: Resume | None) -> tuple[int, int, str, str]:
    """(global batch, accumulation, and a reason for each): the config's, or, for a resumed run, the checkpoint's
    global batch with the accumulation that keeps it on this run's workers."""
    t, n = cfg.training, cfg.scaling.num_workers
    asked = t.micro_batch_size * t.gradient_accumulation_steps * n
    split = (f"training.micro_batch_size={t.micro_batch_size} x gradient_accumulation_steps="
             f"{t.gradient_accumulation_steps} x {n} worker(s), rows of up to {cfg.data.max_seq_len} tokens")
    if resume is None or not resume.global_batch or resume.global_batch == asked:
        return asked, t.gradient_accumulation_steps, split, "training.gradient_accumulation_steps"
    acc = accumulation_for(resume.global_batch, t.micro_batch_size, n)
    return (resume.global_batch, acc, f"the resumed checkpoint's, kept (saved on {resume.workers} worker(s))",
            f"{acc} micro batches of {t.micro_batch_size} on {n} worker(s) keep the checkpoint's global batch of "
            f"{resume.global_batch} rows (training.gradient_accumulation_steps={t.gradient_accumulation_steps} would "
            f"make {asked})")


def _elastic(cfg: RunConfig, global_batch: int) -> tuple[dict[int, int] | None, str]:
    """For each worker count an elastic run may have, the accumulation that keeps ``global_batch`` rows a step.
    Ray Train may choose any count from scaling.min_workers to num_workers, so each of them must keep it:
    ``ConfigError``, naming the counts that cannot and the global batches that every count keeps, where not."""
    s, micro = cfg.scaling, cfg.training.micro_batch_size
    if s.min_workers is None or s.min_workers == s.num_workers:
        return None, f"scaling.min_workers unset: always {s.num_workers} worker(s)"
    counts = range(s.min_workers, s.num_workers + 1)
    cannot = [n for n in counts if global_batch % (micro * n)]
    if cannot:
        every = math.lcm(*counts) * micro
        raise ConfigError(
            f"scaling.min_workers={s.min_workers} to num_workers={s.num_workers}: Ray Train may run the run on any "
            f"count between, and {', '.join(map(str, cannot))} worker(s) cannot keep its global batch of "
            f"{global_batch} rows a step (training.micro_batch_size={micro}). Use a global batch every count keeps, "
            f"a multiple of {every} (training.gradient_accumulation_steps x num_workers x micro_batch_size), or a "
            "narrower range of worker counts")
    table = {n: global_batch // (micro * n) for n in counts}
    return table, (f"scaling.min_workers={s.min_workers}: after a lost node Ray Train goes on with {s.min_workers}"
                   f"-{s.num_workers} workers, each count with the accumulation (workers:accumulation) that keeps "
                   f"{global_batch} rows a step; it grows back at a checkpoint (checked every "
                   f"scaling.resize_check_s={s.resize_check_s:g} s)")


def reshards(saved_workers: int | None, workers: int, zero_stage: int) -> bool:
    """Whether a checkpoint saved on ``saved_workers`` loads on ``workers`` only through DeepSpeed's universal
    checkpoint (``checkpoint.to_universal``): ZeRO-1-3 keep each worker's partition of the optimizer state (ZeRO-3
    of the weights too), which another worker count partitions differently. ZeRO-0 keeps it whole on every worker,
    and a checkpoint of an earlier version (which did not say its workers) is taken to have been saved by as many
    as load it."""
    return zero_stage > 0 and saved_workers is not None and saved_workers != workers


def _download(cfg: RunConfig) -> tuple[str | None, str]:
    m = cfg.model
    if not is_hub_id(m.name_or_path):
        return None, "model.name_or_path is read where it is"
    if m.random_init:
        return None, "model.random_init: only the hub id's config is read"
    return m.hub_cache, (f"model.name_or_path={m.name_or_path} is a hub id: the driver downloads its safetensors "
                         "snapshot once, before any worker starts, and every worker reads it there as a local "
                         "checkpoint (partitioned as it loads under ZeRO-3); model.hub_cache must be on storage "
                         "every node sees")


def _resume(resume: Resume | None, workers: int, zero_stage: int) -> tuple[str | None, str]:
    if resume is None:
        return None, "no checkpoint in the run directory: training starts at step 1"
    how = (f"saved on {resume.workers} worker(s), converted once to DeepSpeed's universal checkpoint for {workers}"
           if reshards(resume.workers, workers, zero_stage) else f"saved on {resume.workers or workers} worker(s)")
    return resume.checkpoint, f"the run directory's latest checkpoint: step {resume.step}, {how}"


# ---------------------------------------------------------------------------------------------------------------

def make(cfg: RunConfig, hw: Hardware, arch: Architecture | None = None, read_data: bool = True,
         resume: Resume | None = None) -> Plan:
    """The plan of ``cfg`` on ``hw``. Refuses (``ConfigError``, naming the field) what cannot run there: a setting
    forced ``on`` where it cannot apply, more checkpointed layers than the model has. ``read_data=False`` leaves the
    data source unread (the memory estimate does not depend on it): ``data.streaming=auto`` is then not decided by
    its size. ``resume``: the run directory's latest checkpoint, whose global batch a resumed run keeps."""
    arch = arch or architecture(cfg)
    check_length(cfg, arch)
    chosen, reasons = memory_savers(cfg, hw, arch)
    plan = _make(chosen, hw, arch, read_data, resume)
    return replace(plan, reasons={**plan.reasons, **reasons})


SAVERS = (("off", "off"), ("on", "off"), ("off", "on"), ("on", "on"))
"""(model.activation_offloading, model.tiled_mlp) in the order ``auto`` tries them, the fastest first: each saver
leaves the layers uncompiled; offloading adds two PCIe copies of each layer's input a step, which overlap compute,
and the tiled MLP a third forward of each MLP slice."""
FIT_SHARE = 0.9
"""``auto`` takes a memory saver off only where the run's estimate without it is within this share of its GPUs'
memory: the estimator is within about 10% of the measured runs (tests/unit/test_estimate.py)."""


def memory_savers(cfg: RunConfig, hw: Hardware, arch: Architecture) -> tuple[RunConfig, dict[str, str]]:
    """``cfg`` with ``model.activation_offloading`` and ``model.tiled_mlp`` decided where they are ``auto`` and the
    GPUs' memory is known: the first of ``SAVERS`` whose estimate fits ``FIT_SHARE`` of it, else every saver the
    settings allow (the fit check then refuses the run, naming what fits). With the memory not known, offloading
    stays off and the tiled MLP goes by its size alone. Returns the config and the reasons of what ``auto`` chose."""
    m = cfg.model
    auto = [k for k in ("activation_offloading", "tiled_mlp") if getattr(m, k) == "auto"]
    offload_allowed = m.gradient_checkpointing
    budget = hw.gpu_memory_gib * min(1.0, cfg.scaling.gpus_per_worker) if hw.gpu_memory_gib else None
    if not auto or hw.device != "cuda" or arch.shape is None or budget is None:
        why = ("no GPU" if hw.device != "cuda" else "the estimator does not model this architecture"
               if arch.shape is None else "the GPUs' memory is not known (resources.gpu_memory_gib)")
        chosen = _with(cfg, offload="off" if m.activation_offloading == "auto" else None)
        return chosen, ({"activation_offloading": f"model.activation_offloading=auto: off ({why})"}
                        if m.activation_offloading == "auto" else {})

    def fixed(value, key):
        return value if getattr(m, key) == "auto" else getattr(m, key)

    tried = []
    for offload, tiled in SAVERS:
        offload, tiled = fixed(offload, "activation_offloading"), fixed(tiled, "tiled_mlp")
        if offload == "on" and not offload_allowed:
            continue
        if (offload, tiled) in [t[:2] for t in tried]:
            continue
        need = _make(_with(cfg, offload, tiled), hw, arch, read_data=False).memory_gib
        tried.append((offload, tiled, need))
        if need <= FIT_SHARE * budget:
            break
    offload, tiled, need = tried[-1] if tried[-1][2] <= FIT_SHARE * budget else max(
        tried, key=lambda t: (t[0] == "on") + (t[1] == "on"))
    fastest = tried[0][2]
    said = f"{FIT_SHARE:.0%} of the GPU's {budget:.1f} GiB"
    reasons = {}
    for key, value, name in (("activation_offloading", offload, "checkpoints in host memory"),
                             ("tiled_mlp", tiled, "the MLP a slice at a time")):
        if key not in auto:
            continue
        if value == "off":
            reasons[key] = (f"model.{key}=auto: off, the run fits without it ({fastest:.1f} GiB estimated, within "
                            f"{said})" if (offload, tiled) == tried[0][:2]
                            else f"model.{key}=auto: off, not needed ({need:.1f} GiB estimated with the other saver, "
                                 f"within {said})")
        else:
            reasons[key] = (f"model.{key}=auto: on ({name}): the run needs {fastest:.1f} GiB estimated without the "
                            f"memory savers, over {said}; {need:.1f} with them")
    return _with(cfg, offload, tiled), reasons


def _with(cfg: RunConfig, offload: str | None = None, tiled: str | None = None) -> RunConfig:
    """``cfg`` with these memory savers set (None: as it is)."""
    update = {k: v for k, v in (("activation_offloading", offload), ("tiled_mlp", tiled)) if v is not None}
    return cfg.model_copy(update={"model": cfg.model.model_copy(update=update)}) if update else cfg


def _make(cfg: RunConfig, hw: Hardware, arch: Architecture, read_data: bool = True,
          resume: Resume | None = None) -> Plan:
    """The plan of ``cfg`` with its memory savers decided (``memory_savers``)."""
    backend, backend_why = _backend(cfg, hw)
    stage, frozen, stage_why, frozen_why = _zero(cfg)
    partitions = stage == 3 or frozen == "layer-shards"
    tiled, tiled_why = _tiled_mlp(cfg, arch)
    compiled, compile_why = _compile(cfg, hw.device, partitions, tiled)
    liger_layers, loss, liger_why, loss_why = _liger(cfg, hw, arch, partitions, compiled)
    attention, attention_why = _attention(cfg, hw)
    sp, sp_why = _sequence_parallel(cfg, arch, attention)
    ckpt, ckpt_why = _checkpointing(cfg, arch)
    recompute = ("bitsandbytes",) if cfg.method == "qlora" and compiled else ()
    keep, keep_why = _keep_recomputed(cfg, partitions)
    masters, clips, masters_why, clips_why = _masters(cfg, stage)
    storage, storage_why = _quant_storage(cfg)
    streams, streams_why = streaming(cfg.data, read_data)
    evaluates, evaluates_why = evaluation(cfg.data)
    padding_free, padding_free_why = _padding_free(cfg, attention, streams)
    global_batch, accumulation, batch_why, accumulation_why = _batch(cfg, resume)
    elastic, elastic_why = _elastic(cfg, global_batch)
    download, download_why = _download(cfg)
    resume_from, resume_why = _resume(resume, cfg.scaling.num_workers, stage)
    t = cfg.training
    plan = Plan(
        backend=backend, device=hw.device, workers=cfg.scaling.num_workers, zero_stage=stage, frozen_base=frozen,
        compile=compiled, liger_layers=liger_layers, loss=loss, attention=attention, checkpointed_layers=ckpt,
        activation_offloading=cfg.model.activation_offloading == "on", recompute_only=recompute,
        keep_recomputed_weights=keep, masters=masters, clips_gradients=clips, quant_storage=storage,
        streaming=streams, evaluation=evaluates, micro_batch=t.micro_batch_size, accumulation=accumulation,
        global_batch=global_batch, padding_free=padding_free, tiled_mlp=tiled, sequence_parallel=sp, elastic=elastic,
        memory_gib=None,
        model_download=download,
        resume_from=resume_from, model_type=arch.model_type,
        layers=arch.layers,
        reasons={
            "backend": backend_why, "device": hw.device_source, "workers": "scaling.num_workers",
            "zero_stage": stage_why, "frozen_base": frozen_why, "compile": compile_why, "liger_layers": liger_why,
            "loss": loss_why, "attention": attention_why, "tiled_mlp": tiled_why, "sequence_parallel": sp_why,
            "checkpointed_layers": ckpt_why,
            "activation_offloading": ("model.activation_offloading=on: each checkpoint waits for backward in "
                                      "pinned host memory" if cfg.model.activation_offloading == "on"
                                      else "model.activation_offloading=off"),
            "recompute_only": ("compiled QLoRA layers: Inductor would otherwise save every dequantized weight"
                               if recompute else "nothing compiled holds a 4-bit weight"),
            "keep_recomputed_weights": keep_why, "masters": masters_why, "clips_gradients": clips_why,
            "quant_storage": storage_why, "streaming": streams_why, "evaluation": evaluates_why,
            "micro_batch": "training.micro_batch_size", "padding_free": padding_free_why,
            "accumulation": accumulation_why, "global_batch": batch_why, "elastic": elastic_why, "model_download": download_why,
            "resume_from": resume_why,
        })
    memory, memory_why = _memory(cfg, plan, arch, hw)
    return replace(plan, memory_gib=memory, reasons={**plan.reasons, "memory_gib": memory_why})


# ---------------------------------------------------------------------------------------------------------------
# The memory estimate of the plan

def estimator_run(cfg: RunConfig, plan: Plan, **earlier_code) -> estimate.Run:
    """The estimator's view of the planned run. ``earlier_code``: ``estimate.Run`` fields that describe code older
    than today's, for measurements made with it (benchmarks/calibration.py)."""
    d, m = cfg.deepspeed, cfg.model
    targets = cfg.lora.target_modules
    offload = "+".join(k for k, v in (("optimizer", d.offload_optimizer), ("param", d.offload_param)) if v == "cpu")
    # A 4-bit model from a GGUF file loads whole onto each GPU (see estimate.loading_peak); a hub id is downloaded
    # to a local snapshot first (Plan.model_download) and loads partitioned as a local checkpoint does.
    whole_load = not m.random_init and m.name_or_path.endswith(".gguf")
    checkpointed = m.gradient_checkpointing
    run = estimate.Run(
        method=cfg.method, gpus=min(plan.elastic or [plan.workers]), zero=3 if plan.frozen_base == "layer-shards" else plan.zero_stage,
        offload=offload or "none", seq_len=cfg.data.max_seq_len, micro_batch=plan.micro_batch,
        sequence_parallel=plan.sequence_parallel, grad_ckpt=checkpointed,
        ckpt_layers=m.checkpointed_layers if checkpointed else None,
        activation_offload=plan.activation_offloading, lora_r=cfg.lora.r,
        lora_targets=("all-linear",) if targets == "all-linear" else tuple(targets),
        optimizer=cfg.optimizer.name, master_weights=cfg.optimizer.master_weights,
        double_quant=cfg.quantization.double_quant, loads_whole=whole_load,
        layer_shards=plan.frozen_base == "layer-shards", recomputed_weights_kept=_kept_if_qlora(cfg, plan),
        fused_loss=plan.loss == "liger-fused", compiled=plan.compile,
        fused_loss_chunk_scale=m.fused_loss_chunk_scale, tiled_mlp=plan.tiled_mlp)
    return replace(run, **earlier_code)


def _kept_if_qlora(cfg: RunConfig, plan: Plan) -> bool:
    """``quantization.keep_recomputed_weights`` as resolved for this run were it QLoRA with checkpointing: the
    estimator's suggestions may turn either on."""
    mode = cfg.quantization.keep_recomputed_weights
    return mode == "on" or (mode == "auto" and not plan.partitions_parameters)


def _memory(cfg: RunConfig, plan: Plan, arch: Architecture, hw: Hardware) -> tuple[float | None, str]:
    if plan.device != "cuda":
        return None, "a CPU run: device memory not estimated"
    if arch.shape is None:
        return None, f"not estimated: the estimator models Llama-style decoders, not {arch.model_type!r}"
    e = estimate.estimate(arch.shape, estimator_run(cfg, plan))
    need = e.need / estimate.GiB
    line = f"estimated per GPU ({e.allocated / estimate.GiB:.1f} GiB allocated by torch"
    if plan.elastic:
        line += f" on {min(plan.elastic)} workers, the fewest"
    line += f"; {e.loading / estimate.GiB:.1f} while loading)" if e.loading > e.device else ")"
    budget = hw.gpu_memory_gib
    if budget is not None:
        budget *= min(1.0, cfg.scaling.gpus_per_worker)  # workers that share a GPU share its memory
        line += (f" of {budget:.1f} GiB ({hw.gpu_memory_source or 'given'}): "
                 + ("fits" if need <= budget else "does NOT fit"))
    return need, line


def resolved_config(cfg: RunConfig, plan: Plan) -> dict:
    """``cfg`` as JSON with every ``auto`` that takes effect in this run replaced by the plan's answer (what
    ``--print-config`` shows). A setting with no effect here (``quantization.*`` of a LoRA run, say) keeps its
    value."""
    out = cfg.model_dump(mode="json")
    on_off = lambda b: "on" if b else "off"
    m, q, d = out["model"], out["quantization"], out["deepspeed"]
    m["compile"] = on_off(plan.compile)
    m["liger_kernel"] = on_off(plan.liger_layers or plan.loss == "liger-fused")
    m["attn_implementation"] = plan.attention
    m["tiled_mlp"] = on_off(plan.tiled_mlp)
    if cfg.model.gradient_checkpointing:
        m["activation_offloading"] = on_off(plan.activation_offloading)
    out["data"]["streaming"] = on_off(plan.streaming)
    out["ray"]["local_mode"] = plan.in_process
    if cfg.method == "qlora":
        q["quant_storage"] = plan.quant_storage
        if cfg.model.gradient_checkpointing:
            q["keep_recomputed_weights"] = on_off(plan.keep_recomputed_weights)
    if plan.frozen_base is not None and cfg.deepspeed.zero_stage == 3:
        d["zero3_frozen"] = "deepspeed" if plan.frozen_base == "deepspeed" else "layers"
    return out
