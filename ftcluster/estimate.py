"""Per-GPU memory of a fine-tuning run, term by term, before any GPU is touched.

    python -m ftcluster estimate --model llama-3-70b --method qlora --seq-len 1024 --micro-batch 1 --grad-ckpt \\
        --optimizer paged_adamw_8bit --gpu-memory 48

A model of what the code allocates, not a rule of thumb. Every term below names where its bytes come from; the
calibration table (``benchmarks/calibration.json``, measured runs) holds it to within ±10% (tests/unit/test_estimate.py).

Notation: P parameters of the model, T trainable parameters, N data-parallel GPUs, t = micro batch x sequence
length tokens per step per GPU, L layers, H hidden size, I MLP size, kv = key/value width, V vocabulary.

Memory is used in three phases, and the peak is the largest:
* backward start: what persists (weights, trainable copies, optimizer states) + the activations saved by the
  forward pass (and one recomputed layer under gradient checkpointing) + the loss's logits buffers;
* through the layers: the same without the logits, with ZeRO's gradient buckets (taken at the first gradient),
  the 16-bit gradients as they arrive and the residual stream's gradients in and out of the layer in backward;
* optimizer step: what persists + the 16-bit gradients + the fp32 gradient partition the optimizer reads (and
  ZeRO's buckets, which stay allocated until the next backward).
Before them, loading: under ZeRO-3 the model is partitioned as it is built or loaded (ftcluster.models; a hub id
is downloaded to a local snapshot first), except a 4-bit model from a GGUF file, which transformers loads whole
onto each GPU before DeepSpeed partitions it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from ftcluster.activations import LOSS_CHUNK_BYTES
from ftcluster.presets import HUB_IDS, PRESETS

GiB = 2**30
BLOCK = 64
"""bitsandbytes NF4 block size: one absmax per 64 weights (bitsandbytes/functional.py quantize_4bit)."""
DQ_BLOCK = 256
"""Double quantization: the absmax values are themselves quantized to 8 bits in blocks of 256, with an fp32
absmax per block (QLoRA paper §3; bitsandbytes quantize_blockwise)."""
CUDA_OVERHEAD_GIB = 2.2
"""Device memory outside PyTorch's allocator: the CUDA context, cuBLAS/cuDNN workspaces, NCCL and the loaded
kernels of torch and bitsandbytes: NVML's used memory less torch's reserved memory (less paged optimizer state) on
the calibration runs (benchmarks/calibration.json), with and without bitsandbytes' 4-bit kernels."""
GATHER_SLACK = 1.6
"""Allocator slack that ZeRO-3's gathered buffers leave, over their own size: DeepSpeed allocates a flat buffer
per gathered layer and frees it after use, and the reserved memory grows past the allocated peak by 1.5-1.7x the
gathered bytes (the Llama-2-7B and Llama-3-70B scaling rows of benchmarks/calibration.json)."""
LAYER_SHARD_SLACK = 0.75
"""The same for ftcluster's layer shards, whose gathered buffers have one size per layer and are reused as they
are: 0.75x the gathered bytes fits the Llama-2-7B (LoRA, QLoRA) and Llama-3-70B (QLoRA) rows of
benchmarks/calibration.json on 2 and 4 GPUs."""
NCCL_COMMUNICATOR_GIB = 0.3
"""Device memory of one NCCL communicator across several GPUs (its buffers and channels), outside torch: NVML less
torch's reserved memory grows by this much from one GPU to two for the same 7B LoRA run under ZeRO-2 (the scaling
rows of benchmarks/calibration.json). Layer shards gather on a communicator of their own: a second one."""
FRAGMENTATION = 0.02
"""Allocator slack, reserved over allocated, with expandable segments on (ftcluster's default): 0.4-1.5% measured
on the calibration runs; 2% assumed."""
COMPILED_BACKWARD_BYTES = 12
"""Bytes per MLP intermediate unit a token that a compiled, checkpointed layer's backward holds over what its eager
recompute saves (see ``terms``)."""
OPTIMIZER_BYTES = {"adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "paged_adamw_32bit": 8}
"""Bytes per trainable parameter of optimizer state: Adam's two moments, in fp32 or in 8 bits (bitsandbytes
8-bit optimizers; their quantization maps are a few KB)."""
PAGED = {"paged_adamw_8bit", "paged_adamw_32bit"}
"""Paged optimizers keep their state in CUDA unified memory (cudaMallocManaged), outside torch's allocator: it
counts on the device while resident, and can be evicted to the host under pressure."""
GPUS_GIB = {"a100-40": 40, "a100-80": 80, "h100": 80, "h200": 141, "l40s": 48, "a6000": 48, "rtx4090": 24, "a10": 24}
"""Nominal memory of common GPUs (decimal GB as sold; the usable GiB is a little lower)."""


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def kv(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer (Llama: q, k, v, o, gate, up, down)."""
        h, i, kv = self.hidden, self.intermediate, self.kv
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def other_params(self) -> int:
        """Embeddings, lm_head (unless tied) and the RMSNorm weights: never quantized."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params


def shape_of(model: str, overrides: dict | None = None) -> Shape:
    """A preset name, or a Hugging Face config: a model directory or its config.json; ``overrides`` are set over
    its fields (``model.config_overrides``)."""
    if model in PRESETS:
        c = PRESETS[model]
    else:
        path = Path(model).expanduser()
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise SystemExit(f"--model {model}: neither a preset ({', '.join(PRESETS)}) nor a config.json or a "
                             "directory holding one")
        c = json.loads(path.read_text())
    return shape_of_fields({**c, **(overrides or {})}, f"--model {model}")


@dataclass(frozen=True)
class Run:
    method: str = "lora"  # full | lora | qlora
    gpus: int = 1
    zero: int = 2
    offload: str = "none"  # none | optimizer | param | optimizer+param
    seq_len: int = 2048
    micro_batch: int = 1
    sequence_parallel: int = 1
    """Workers sharing each row (scaling.sequence_parallel): each holds the activations of 1/K of its tokens
    (around attention, all of them with 1/K of the heads: the same size)."""
    grad_ckpt: bool = True
    ckpt_layers: int | None = None
    """With grad_ckpt, how many decoder layers are checkpointed (model.checkpointed_layers); None: all."""
    activation_offload: bool = False
    """The checkpoints (each layer's input) wait for backward in host memory (model.activation_offloading)."""
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ("all-linear",)
    optimizer: str = "adamw"
    master_weights: str = "fp32"
    """fp32: DeepSpeed's bf16 mode steps float32 copies of what trains; bf16: the optimizer steps the bf16 weights
    and gradients themselves, and torch's AdamW keeps its moments in their dtype (optimizer.master_weights)."""
    double_quant: bool = True
    loads_whole: bool = False  # loaded from a GGUF file, not a safetensors checkpoint (local, or a hub snapshot)
    chunked_loss: bool = True
    """ftcluster.activations' loss (bf16 logits and their gradient, float32 one chunk at a time); False: the
    whole-batch float32 loss of transformers, which older runs used (benchmarks/calibration.py names them)."""
    fused_loss: bool = False
    """Liger's fused linear + cross-entropy computes the output layer and the loss a chunk of tokens at a time
    (ftcluster.kernels; on CUDA GPUs with liger-kernel installed, not under ZeRO-3)."""
    sized_buckets: bool = True
    """ZeRO-1/2 buckets hold at most the trainable elements (ftcluster.deepspeed_setup.bucket_sizes); False:
    DeepSpeed's 5e8 whatever the model, which runs measured before that change used."""
    compiled: bool = False
    """The decoder layers are compiled (ftcluster.compiled): a layer outside checkpointing keeps less for backward."""
    fused_loss_chunk_scale: int = 1
    """model.fused_loss_chunk_scale: Liger's chunk of tokens holds logits of about this many times the hidden states."""
    zero3_buckets: bool = True
    """ZeRO-3's reduce bucket holds at most the trainable elements (deepspeed_setup.tuned_config); False: DeepSpeed's
    5e8, which older runs used."""
    layer_gather: bool = True
    """ZeRO-3 gathers a decoder layer at a time (ftcluster.deepspeed_setup.zero3_schedule); False: DeepSpeed's
    defaults, which older runs used."""
    layer_shards: bool = False
    """ZeRO-3 with the frozen base in ftcluster's layer shards and the adapters under ZeRO-2
    (``Plan.frozen_base``); older runs used DeepSpeed's ZeRO-3 throughout."""
    recomputed_weights_kept: bool = True
    """QLoRA under checkpointing would keep a recomputed layer's dequantized weights for its backward
    (``quantization.keep_recomputed_weights``; the setting, whatever the method); older QLoRA runs dequantized them
    again."""
    tiled_mlp: bool = False
    """Each layer's MLP a slice of about hidden-size tokens at a time (ftcluster/tiled_mlp.py)."""


def preset_of(model: str) -> str | None:
    """The preset a model name stands for: the embedded SmolLM2, or a directory named after a preset (the
    benchmarks' weightless shape directories, also where they exist only on another host)."""
    if model.startswith("embedded:smollm2-135m"):
        return "smollm2-135m"
    if model in HUB_IDS:
        return HUB_IDS[model]
    name = Path(model).name
    return name if name in PRESETS and not (Path(model).expanduser() / "config.json").is_file() else None


def shape_of_fields(c: dict, model: str) -> Shape:
    try:
        return Shape(layers=c["num_hidden_layers"], hidden=c["hidden_size"], intermediate=c["intermediate_size"],
                     heads=c["num_attention_heads"], kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                     vocab=c["vocab_size"], tied=bool(c.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise SystemExit(f"{model}: its config has no {e.args[0]}; only Llama-style decoders are modelled")


def trainable_params(shape: Shape, run: Run) -> int:
    if run.method == "full":
        return shape.params
    targets = shape.linear_shapes()
    if "all-linear" not in run.lora_targets:
        unknown = [t for t in run.lora_targets if t not in targets]
        if unknown:
            raise SystemExit(f"--lora-targets: {unknown} are not linear layers of a Llama decoder ({', '.join(targets)})")
        targets = {k: v for k, v in targets.items() if k in run.lora_targets}
    return shape.layers * sum(run.lora_r * (a + b) for a, b in targets.values())


def keeps_input(run: Run) -> dict[str, bool]:
    """Whether the linear layers reading each input keep it for backward (see ``terms``)."""
    if run.method != "qlora" or "all-linear" in run.lora_targets:
        return {"qkv": True, "gate_up": True, "down": True}
    t = set(run.lora_targets)
    return {"qkv": bool(t & {"q_proj", "k_proj", "v_proj"}), "gate_up": bool(t & {"gate_proj", "up_proj"}),
            "down": "down_proj" in t}


def terms(shape: Shape, run: Run) -> dict[str, float]:
    """Bytes per GPU of each term. Keys are the rows ``explain`` prints."""
    n, T, t = run.gpus, trainable_params(shape, run), run.seq_len // run.sequence_parallel * run.micro_batch
    shard_params = run.zero == 3 and n > 1
    shard_grads = run.zero >= 2 and n > 1
    shard_optim = run.zero >= 1 and n > 1
    offload_opt = "optimizer" in run.offload
    offload_par = "param" in run.offload
    out: dict[str, float] = {}

    # Weights: bf16 (2 bytes), or NF4 (half a byte) + its absmax constants for the linear layers under QLoRA.
    base = shape.linear_params * 0.5 + shape.other_params * 2 if run.method == "qlora" else shape.params * 2
    if shard_params:
        base /= n  # ZeRO-3 partitions every parameter, 4-bit storage included (stored as bf16 so it can split)
    if offload_par:
        base = 0.0
    out["weights"] = base
    if run.method == "qlora":
        # The absmax constants live in each layer's quantization state, beside the parameter: ZeRO-3 neither
        # partitions nor offloads them, so every GPU holds all of them.
        absmax = 1 / BLOCK + 4 / (BLOCK * DQ_BLOCK) if run.double_quant else 4 / BLOCK
        out["weights' quantization constants"] = shape.linear_params * absmax
    if run.method != "full":
        out["lora weights (bf16)"] = 2 * T / (n if shard_params else 1)

    # fp32 master weights and optimizer states: DeepSpeed's bf16 mode keeps an fp32 copy of what trains (none with
    # bf16 master weights, where torch's AdamW keeps its moments in bf16 too; bitsandbytes' states keep their size).
    opt_div = n if shard_optim else 1
    bf16_master = run.master_weights == "bf16"
    master = 0.0 if offload_opt or bf16_master else 4 * T / opt_div
    state_bytes = OPTIMIZER_BYTES[run.optimizer] / (2 if bf16_master and run.optimizer == "adamw" else 1)
    state = 0.0 if offload_opt else state_bytes * T / opt_div
    out["fp32 master weights"] = master
    out["optimizer states" + (" (paged, outside torch)" if run.optimizer in PAGED else "")] = state

    # Gradients: bf16 as backward produces them (ZeRO-2/3 keep only this GPU's partition), then the fp32
    # partition the optimizer steps on (DeepSpeed converts one partition at a time).
    # ZeRO-3 reduces each bucket of bf16 gradients straight into its fp32 partition buffer (stage3.py,
    # __reduce_and_partition_ipg_grads): no bf16 copy persists there.
    # Layer shards leave the adapters to ZeRO-2.
    grad_zero = 2 if run.layer_shards else run.zero
    out["gradients (bf16)"] = 0.0 if grad_zero == 3 else 2 * T / (n if shard_grads else 1)
    # With bf16 master weights ZeRO-1-3 step a bf16 partition; ZeRO-0 steps the gradients backward made.
    step_grad = 0.0 if offload_opt or (bf16_master and run.zero == 0) else (2 if bf16_master else 4) * T / opt_div
    out["gradients (the partition the optimizer steps)"] = step_grad

    # Activations saved for backward, per token of one decoder layer (bf16 = 2 bytes, fp32 = 4):
    #   RMSNorm x2: its fp32 upcast input, always (transformers' LlamaRMSNorm)               ->  8H
    #   attention: q, k, v after RoPE and the output, kept by SDPA/flash                     ->  4H + 4kv
    #   SwiGLU MLP: gate output (for SiLU), SiLU and up outputs (for their product)          ->  6I
    #   the inputs of the linear layers, each kept only by a layer that needs it: a trained weight (full
    #   fine-tuning, LoRA's A) or a 16-bit matmul; bitsandbytes' 4-bit matmul keeps only the weight
    #   (MatMul4Bit.forward: ctx.tensors = (None, B)). The normed inputs of q/k/v and of gate/up (2H each),
    #   and the product that enters down_proj (2I).
    kept = keeps_input(run)
    mlp_token = 6 * shape.intermediate + 2 * shape.hidden * kept["gate_up"] + 2 * shape.intermediate * kept["down"]
    per_token_layer = 8 * shape.hidden + 4 * shape.hidden + 4 * shape.kv + 2 * shape.hidden * kept["qkv"] + mlp_token
    if run.tiled_mlp:
        # A tiled MLP keeps only its input (2H a token) for backward, which recomputes one slice of about H tokens
        # at a time (its intermediates: mlp_token a token) into an input gradient of the whole row (2H a token).
        row = run.seq_len // run.sequence_parallel
        per_slice = math.ceil(row / max(1, math.ceil(row / shape.hidden))) * run.micro_batch
        per_token_layer += 2 * shape.hidden - mlp_token
        out["activations (a tiled MLP slice, and its input's gradient)"] = mlp_token * per_slice + 2 * shape.hidden * t
    # A compiled layer keeps 4H + 4I bytes a token less: Inductor's partitioner recomputes the norms' float32
    # upcasts and SwiGLU's elementwise products in backward rather than saving them (the llama-1b rows of
    # benchmarks/calibration.json without checkpointing); the one recomputed layer of a checkpointed run keeps the
    # eager figure. A compiled QLoRA layer outside a checkpoint keeps what an eager one does: the checkpoint that has
    # it recompute the dequantization (activations.recompute_only) leaves the partitioner saving the rest.
    smaller = run.compiled and run.method != "qlora"
    kept_layer = per_token_layer - (4 * shape.hidden + 4 * shape.intermediate if smaller else 0)
    if run.grad_ckpt:
        # Checkpointing keeps each layer's input (2H) and recomputes one layer at a time in backward. Offloaded
        # (ftcluster.activations.HostActivations), they are on the device only while copied: the input of the
        # layer being recomputed, and the one coming back for the next. Layers left out of checkpointing
        # (model.checkpointed_layers) keep all of theirs.
        checkpointed = shape.layers if run.ckpt_layers is None else min(run.ckpt_layers, shape.layers)
        on_device = min(2, checkpointed) if run.activation_offload else checkpointed
        out["activations (checkpoints)"] = on_device * 2 * shape.hidden * t
        out["activations (one recomputed layer)"] = per_token_layer * t if checkpointed else 0.0
        out["activations (layers not checkpointed)"] = (shape.layers - checkpointed) * kept_layer * t
        if run.compiled and checkpointed:
            # A compiled layer's checkpoint is traced into its graph, so its recompute and its backward run as one
            # Inductor graph, which holds more at once than the eager recompute's saved tensors: 12 bytes per MLP
            # intermediate unit a token over the eager figure (the MLP's recomputed projections and their
            # gradients alive together). Fitted to the compiled long rows of benchmarks/calibration.json, where
            # this layer's backward is the peak, and the excess tests/gpu/test_compiled.py prints at 4,096 tokens.
            out["activations (a compiled layer's backward)"] = COMPILED_BACKWARD_BYTES * \
                shape.intermediate * t
    else:
        out["activations"] = shape.layers * kept_layer * t
    # In backward, the residual stream's gradient through the layer being differentiated: the one it was given and
    # the one it gives its input (2H each, bf16), beside what that layer saved.
    out["hidden-state gradients (backward)"] = 4 * shape.hidden * t
    if run.fused_loss:
        # Liger's fused linear + cross-entropy: per chunk of rows, their logits in bf16 and float32 (6V a row),
        # with chunks of next_pow2(tokens / ceil(V / (scale * H))) rows (model.fused_loss_chunk_scale); the hidden
        # states' gradient (2H a token); and the output layer's weight gradient when it is trained (2VH).
        per_chunk = math.ceil(shape.vocab / (run.fused_loss_chunk_scale * shape.hidden))
        rows = min(t, 2 ** math.ceil(math.log2(max(1, math.ceil(t / per_chunk)))))
        out["logits and loss"] = 6 * shape.vocab * rows + 2 * shape.hidden * t + \
            (2 * shape.vocab * shape.hidden if run.method == "full" else 0)
    elif run.chunked_loss:
        # ftcluster.activations.chunked_causal_lm_loss: the bf16 logits (2V) and, in backward, their bf16 gradient
        # (2V); float32 only for one chunk of LOSS_CHUNK_BYTES at a time (the upcast, its softmax and a temporary).
        out["logits and loss"] = 4 * shape.vocab * t + 3 * LOSS_CHUNK_BYTES
    else:
        # transformers' ForCausalLMLoss: bf16 logits (2V, alive to the end), their fp32 copy's log-softmax (4V,
        # saved), and at the start of backward its incoming and outgoing fp32 gradients (4V + 4V).
        out["logits and loss"] = 14 * shape.vocab * t
    if run.method == "qlora":
        # bitsandbytes dequantizes a 4-bit weight to bf16 for each matmul; forward and backward may overlap two.
        out["dequantized weight (temporary)"] = 2 * 2 * max(a * b for a, b in shape.linear_shapes().values())
        if run.grad_ckpt and run.recomputed_weights_kept and (run.ckpt_layers is None or run.ckpt_layers > 0):
            # ftcluster.linear4bit keeps a recomputed layer's dequantized weights for its backward.
            out["dequantized weights of the recomputed layer"] = 2 * sum(
                a * b for a, b in shape.linear_shapes().values())
    if grad_zero in (1, 2):
        # With contiguous_gradients ZeRO-1/2 take a reduce bucket of reduce_bucket_size 16-bit elements when the
        # first gradient arrives, two with overlap_comm (stage_1_and_2.py, setup_buckets): DeepSpeed's 5e8, or the
        # trainable elements where fewer (deepspeed_setup.bucket_sizes). overlap_comm is on only where the
        # gradients fill several buckets (deepspeed_setup.overlaps_reduction; runs before it had two buckets of
        # the trainable elements, a few MB for adapters).
        bucket = min(5e8, T) if run.sized_buckets else 5e8
        out["ZeRO gradient buckets"] = 2 * bucket * (2 if T > bucket or not run.sized_buckets else 1)
    elif grad_zero == 3:
        # ZeRO-3 takes one reduce bucket per gradient dtype when the engine is built (stage3.py).
        out["ZeRO gradient buckets"] = 2 * (min(5e8, T) if run.zero3_buckets else 5e8)
    if run.layer_shards and run.zero == 3:
        # (On one GPU only code up to ZERO3_ON_ONE_WORKER_UNTIL, benchmarks/calibration.py, had layer shards: it
        # gathered copies of each layer from the one rank's whole "shard".)
        # ftcluster.layer_shards: the layer computing and the one queued (in backward, the layer recomputed and the
        # one before it), and the output layer from its forward to its backward.
        layer = sum(a * b for a, b in shape.linear_shapes().values()) * (0.5 if run.method == "qlora" else 2)
        out["ZeRO-3 gathered parameters"] = 2 * layer + 2 * shape.vocab * shape.hidden
    elif (shard_params or offload_par) and run.layer_gather:
        # ftcluster's ZeRO-3 schedule (deepspeed_setup.zero3_schedule) lets three decoder layers be gathered at
        # once; at the start of backward the output layer (V x H in bf16) is gathered beside them.
        layer = sum(a * b for a, b in shape.linear_shapes().values()) * (0.5 if run.method == "qlora" else 2)
        out["ZeRO-3 gathered parameters"] = 3 * layer + 2 * shape.vocab * shape.hidden
    elif shard_params:
        # DeepSpeed's default schedule gathers ahead of use (stage3_prefetch_bucket_size, 5e7 elements).
        out["ZeRO-3 gathered parameters"] = 2 * 5e7
    return out


PERSISTENT = ("weights", "lora weights (bf16)", "fp32 master weights", "optimizer states")  # prefixes
SAVED = ("activations", "activations (checkpoints)", "activations (one recomputed layer)",
         "activations (a compiled layer's backward)",
         "activations (layers not checkpointed)",
         "dequantized weight (temporary)", "dequantized weights of the recomputed layer", "ZeRO-3 gathered parameters")
STEP = ("gradients (bf16)", "gradients (the partition the optimizer steps)")


@dataclass(frozen=True)
class Estimate:
    terms: dict
    allocated: float
    """Peak of torch's allocator (bytes): what torch.cuda.max_memory_allocated reports."""
    device: float
    """Peak device memory in use while training (bytes), as NVML reports it: allocated + slack + what lives outside
    torch."""
    trainable: int
    loading: float = 0.0
    """Device memory while the model loads, where that is more than its share of the training weights (bytes)."""
    gather_slack: float = 0.0
    """Reserved-but-free memory that ZeRO-3's gathered buffers leave behind (bytes; part of ``device``)."""
    communicators: int = 0
    """NCCL communicators across several GPUs (each ``NCCL_COMMUNICATOR_GIB``; part of ``device``)."""

    @property
    def need(self) -> float:
        """What must fit: the larger of loading and training."""
        return max(self.device, self.loading)


def loading_peak(shape: Shape, run: Run) -> float:
    """A 4-bit model from a GGUF file under ZeRO-3 on several GPUs: transformers does not load quantized models
    inside zero.Init (modeling_utils: ``is_deepspeed_zero3_enabled() and not is_quantized``), so each GPU holds the
    whole 4-bit model until deepspeed.initialize partitions it. A safetensors checkpoint (a local one, or a hub
    id's downloaded snapshot) is read module by module by ftcluster.models instead."""
    if run.method == "qlora" and run.zero == 3 and run.gpus > 1 and run.loads_whole:
        one = terms(shape, replace(run, gpus=1))
        whole = one["weights"] + one["weights' quantization constants"]
        return whole * (1 + FRAGMENTATION) + CUDA_OVERHEAD_GIB * GiB
    return 0.0


def estimate(shape: Shape, run: Run) -> Estimate:
    t = terms(shape, run)
    outside = sum(v for k, v in t.items() if "paged" in k)
    persistent = sum(v for k, v in t.items() if k.startswith(PERSISTENT) and "paged" not in k)
    saved = persistent + sum(t.get(k, 0.0) for k in SAVED)
    buckets = t.get("ZeRO gradient buckets", 0.0)
    # When the loss is computed no layer has been recomputed yet.
    backward_start = (saved - t.get("activations (one recomputed layer)", 0.0)
                      - t.get("activations (a compiled layer's backward)", 0.0)
                      - t.get("dequantized weights of the recomputed layer", 0.0) + t["logits and loss"])
    through_layers = saved + buckets + t["gradients (bf16)"] + t["hidden-state gradients (backward)"]
    step = persistent + sum(t.get(k, 0.0) for k in STEP) + buckets  # the buckets are kept until the next backward
    allocated = max(backward_start, through_layers, step)
    gathered = t.get("ZeRO-3 gathered parameters", 0.0)
    slack = (LAYER_SHARD_SLACK if run.layer_shards else GATHER_SLACK) * gathered if run.layer_gather else 0.0
    communicators = (2 if run.layer_shards else 1) if run.gpus > 1 else 0
    device = (allocated * (1 + FRAGMENTATION) + slack + outside + CUDA_OVERHEAD_GIB * GiB
              + communicators * NCCL_COMMUNICATOR_GIB * GiB)
    return Estimate(t, allocated, device, trainable_params(shape, run), loading_peak(shape, run), slack,
                    communicators)


def host_checkpoints(shape: Shape, run: Run) -> float:
    """Pinned host memory (bytes) that one worker's offloaded checkpoints hold at the end of its forward: each
    checkpointed layer's input, 2H bytes a token of its share of the rows (model.activation_offloading; 0 without
    it). ftcluster.activations copies each into blocks of its own size, so this is what the host gives them."""
    if not (run.grad_ckpt and run.activation_offload):
        return 0.0
    checkpointed = shape.layers if run.ckpt_layers is None else min(run.ckpt_layers, shape.layers)
    return checkpointed * 2 * shape.hidden * (run.seq_len // run.sequence_parallel * run.micro_batch)


def checkpointed_layers_that_fit(shape: Shape, run: Run, budget_gib: float) -> int | None:
    """The fewest decoder layers to checkpoint (from the first) for the run to fit ``budget_gib``: every layer
    left out skips its recompute. None when even checkpointing every layer does not fit."""
    for n in range(shape.layers + 1):
        if estimate(shape, replace(run, grad_ckpt=True, ckpt_layers=n)).need / GiB <= budget_gib:
            return n
    return None


def longest_fitting(shape: Shape, run: Run, budget_gib: float, step: int = 256) -> int | None:
    """The longest rows (``seq_len``, a multiple of ``step`` below the run's) that fit ``budget_gib`` with every other
    setting kept, or None where not even ``step`` tokens do. The estimate grows with the length, so a bisection."""
    fits = lambda n: estimate(shape, replace(run, seq_len=n)).need / GiB <= budget_gib
    lo, hi = 0, (run.seq_len - 1) // step  # multiples of step: lo fits (0: nothing yet), hi + 1 does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid * step) else (lo, mid - 1)
    return lo * step or None


def suggestions(shape: Shape, run: Run, budget_gib: float) -> list[tuple[str, float, Run]]:
    """Changes that make the run fit, cheapest first: those that keep the method, the data and the hardware, then
    the method, then the data, then more GPUs."""
    candidates: list[tuple[str, Run]] = []
    if not run.grad_ckpt:
        candidates.append(("turn on gradient checkpointing (--grad-ckpt): ~30% more compute", replace(run, grad_ckpt=True)))
    if run.gpus > 1:
        for z in range(run.zero + 1, 4):
            candidates.append((f"ZeRO stage {z} (--zero {z})", replace(run, zero=z)))
    if run.optimizer in ("adamw", "paged_adamw_32bit"):
        candidates.append(("8-bit paged AdamW (--optimizer paged_adamw_8bit)", replace(run, optimizer="paged_adamw_8bit")))
    if run.grad_ckpt and not run.activation_offload:
        # Offloading's saved-tensor hooks leave the layers uncompiled (plan._compile).
        candidates.append(("keep the checkpoints in host memory (--activation-offloading): two PCIe copies of "
                           "each layer's input per step", replace(run, activation_offload=True, compiled=False)))
    if run.offload == "none" and run.zero >= 1:
        candidates.append(("offload the optimizer to CPU memory (--offload optimizer): slower steps",
                           replace(run, offload="optimizer", optimizer="adamw")))
    if run.method == "full":
        candidates.append(("LoRA instead of full fine-tuning (--method lora)", replace(run, method="lora")))
    if run.method != "qlora":
        candidates.append(("QLoRA: a 4-bit base (--method qlora)", replace(run, method="qlora", optimizer="paged_adamw_8bit")))
    for seq in (run.seq_len // 2, run.seq_len // 4):
        if seq >= 128:
            candidates.append((f"shorter sequences (--seq-len {seq})", replace(run, seq_len=seq)))
    if run.micro_batch > 1:
        candidates.append(("micro batch 1 with gradient accumulation (--micro-batch 1)", replace(run, micro_batch=1)))
    for gpus in (run.gpus * 2, run.gpus * 4, run.gpus * 8):
        candidates.append((f"{gpus} GPUs with ZeRO-3 (--gpus {gpus} --zero 3)", replace(run, gpus=gpus, zero=3)))
    fits = []
    for why, changed in candidates:
        need = estimate(shape, changed).need / GiB
        if need <= budget_gib:
            fits.append((why, need, changed))
    return fits


CONFIG_KEYS = {"method": "method", "gpus": "scaling.num_workers", "zero": "deepspeed.zero_stage",
               "seq_len": "data.max_seq_len", "micro_batch": "training.micro_batch_size",
               "grad_ckpt": "model.gradient_checkpointing", "ckpt_layers": "model.checkpointed_layers",
               "activation_offload": "model.activation_offloading",
               "optimizer": "optimizer.name", "master_weights": "optimizer.master_weights"}


def config_overrides(before: Run, after: Run) -> list[str]:
    """The trainer's overrides that turn run ``before`` into ``after`` (a suggestion, said in the config's terms)."""
    out = [f"{key}={str(getattr(after, f)).lower() if isinstance(getattr(after, f), bool) else getattr(after, f)}"
           for f, key in CONFIG_KEYS.items() if getattr(before, f) != getattr(after, f)]
    for part, key in (("optimizer", "deepspeed.offload_optimizer"), ("param", "deepspeed.offload_param")):
        if (part in before.offload) != (part in after.offload):
            out.append(f"{key}={'cpu' if part in after.offload else 'none'}")
    return out


def explain(model: str, shape: Shape, run: Run, budget_gib: float | None) -> str:
    e = estimate(shape, run)
    lines = [f"{model}: {shape.params / 1e9:.2f}B parameters ({shape.layers} layers, hidden {shape.hidden}, "
             f"vocab {shape.vocab}); {run.method}, {run.gpus} GPU(s), ZeRO-{run.zero}, offload {run.offload}, "
             f"seq {run.seq_len} x micro batch {run.micro_batch}, gradient checkpointing "
             f"{('on, checkpoints in host memory' if run.activation_offload else 'on') if run.grad_ckpt else 'off'}"
             f"{f' ({run.ckpt_layers} layers)' if run.grad_ckpt and run.ckpt_layers is not None else ''}, "
             f"{run.optimizer}; trainable {e.trainable / 1e6:,.1f}M", "",
             "per GPU                                       GiB"]
    for k, v in e.terms.items():
        if v:
            lines.append(f"  {k:<42} {v / GiB:7.2f}")
    lines += [f"  {'peak allocated by torch':<42} {e.allocated / GiB:7.2f}",
              f"  {'allocator slack (2%)':<42} {e.allocated * FRAGMENTATION / GiB:7.2f}",
              *([f"  {'allocator slack of ZeRO-3 gathered buffers':<42} {e.gather_slack / GiB:7.2f}"]
                if e.gather_slack else []),
              f"  {'CUDA context, libraries':<42} {CUDA_OVERHEAD_GIB:7.2f}",
              *([f"  {f'NCCL across GPUs ({e.communicators} communicator(s))':<42} "
                 f"{e.communicators * NCCL_COMMUNICATOR_GIB:7.2f}"] if e.communicators else []),
              f"  {'peak device memory in training':<42} {e.device / GiB:7.2f}  ({e.device / 1e9:.1f} GB)"]
    if e.loading > e.device:
        lines += [f"  {'peak device memory while loading':<42} {e.loading / GiB:7.2f}  ({e.loading / 1e9:.1f} GB)",
                  "    (a 4-bit model from a GGUF file loads whole onto each GPU before ZeRO-3 partitions it; "
                  "a safetensors checkpoint loads partitioned)"]
    need = e.need / GiB
    lines.append(f"  {'what must fit':<42} {need:7.2f}")
    if held := host_checkpoints(shape, run):
        lines.append(f"  {'host memory: offloaded checkpoints a GPU':<42} {held / GiB:7.2f}  (pinned, in host memory)")
    if budget_gib is not None:
        if need <= budget_gib:
            lines.append(f"fits a {budget_gib:.1f} GiB GPU, {budget_gib - need:.1f} GiB to spare")
            fewest = checkpointed_layers_that_fit(shape, run, budget_gib) if run.grad_ckpt else None
            if fewest is not None and fewest < (shape.layers if run.ckpt_layers is None else run.ckpt_layers):
                lines.append(f"checkpointing only the first {fewest} of {shape.layers} layers also fits "
                             f"(model.checkpointed_layers={fewest}; the others skip their recompute)")
        else:
            fixes = suggestions(shape, run, budget_gib)
            lines.append(f"does not fit a {budget_gib:.1f} GiB GPU (over by {need - budget_gib:.1f} GiB)")
            if e.loading > budget_gib * GiB:
                lines.append("the whole 4-bit model must fit one GPU while it loads from the GGUF file, whatever "
                             "the GPU count: convert it to safetensors instead (drop --loads-whole)")
            elif fixes:
                lines.append("cheapest change that fits: " + fixes[0][0] + f" -> {fixes[0][1]:.1f} GiB")
                lines += [f"  also fits: {why} -> {need:.1f} GiB" for why, need, _ in fixes[1:4]]
            else:
                lines.append("no single change makes it fit; combine them (e.g. QLoRA on more GPUs)")
    return "\n".join(lines)
