"""The run configuration: one typed schema, loaded from YAML, overridden by dotted ``key=value`` arguments.

Everything is validated here, before Ray starts or any device memory is taken. After :func:`load` returns, the
rest of the package trusts the config and never re-checks it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
BUILTIN_DATASETS = ("builtin:pydoc", "builtin:required-args", "builtin:extract-json")
"""Made offline: the first two by ftcluster/pydoc_data.py, the last by ftcluster/extraction_data.py."""


class ConfigError(ValueError):
    """A config that cannot run. The message names the field (or file) and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name_or_path: str = EMBEDDED_MODEL
    """A hub id, a local Hugging Face directory, a ``.gguf`` file, or ``embedded:smollm2-135m-instruct``."""
    tokenizer: str | None = None
    """Where the tokenizer lives when it is not next to the weights."""
    revision: str | None = None
    """For a hub id: the branch, tag or commit to train from (None: the hub's default branch). A commit keeps a
    resumed run on the weights it started from."""
    hub_cache: str | None = None
    """For a hub id: the directory its snapshot is downloaded into, once, by the driver before any worker starts;
    every worker loads it from there (partitioned under ZeRO-3), so it must be on storage every node sees. None:
    huggingface_hub's cache where HF_HUB_CACHE or HF_HOME is set, else ``<output.storage_path>/.hub``."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    attn_implementation: Literal["auto", "varlen", "sdpa", "eager", "flash_attention_2", "flex_attention"] = "auto"
    """``auto``: PyTorch's varlen flash kernel for packed rows on CUDA (see ftcluster/attention.py), else sdpa."""
    gradient_checkpointing: bool = False
    checkpointed_layers: int | None = Field(None, ge=0)
    """With gradient_checkpointing, how many decoder layers are checkpointed, from the first; the others keep their
    activations and skip the recompute, a quarter of their step's compute. None: every layer. ``python -m
    ftcluster estimate`` says how many can go unchecked within the GPU's memory."""
    liger_kernel: Literal["auto", "on", "off"] = "auto"
    """Liger Kernel's fused RMSNorm, SwiGLU, RoPE and linear + cross-entropy (ftcluster/kernels.py). ``auto``: on
    a CUDA GPU when liger-kernel is installed and knows the architecture; ``on`` refuses to run without them."""
    fused_loss_chunk_scale: int = Field(1, ge=1)
    """How large a chunk of tokens Liger's fused linear + cross-entropy takes at a time: chunks whose logits hold
    about this many times the hidden states' elements (Liger's ``chunk_mem_const``; 1, its default, gives a 1B
    Llama's 4096-token batch 32 chunks of 128). Where the output layer trains (full fine-tuning) each chunk adds its
    share to the layer's whole weight gradient, one pass over it per chunk (0.5 GB at 1B); a larger scale makes
    fewer passes at chunk x vocabulary x 6 bytes for the chunk's logits."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile each decoder layer (ftcluster/compiled.py). ``auto``: on one CUDA GPU, where compiled layers
    measured faster than eager ones for every method (docs/design.md); ``on`` compiles on several workers too, and
    refuses to run where it cannot: under ZeRO-3, or with activation_offloading."""
    tiled_mlp: Literal["auto", "on", "off"] = "auto"
    """Run each decoder layer's MLP over a row a slice of about hidden-size tokens at a time (DeepSpeed's TiledMLP:
    ftcluster/tiled_mlp.py), recomputing each slice in backward: a long row's MLP intermediates are held for one
    slice only. ``auto``: on where the run would not fit its GPUs without it (``plan.memory_savers``); where their
    memory is not known, where one row's would take over ``plan.TILED_MLP_FROM_BYTES`` a layer."""
    activation_offloading: Literal["auto", "on", "off"] = "auto"
    """Keep what checkpointing keeps (each decoder layer's input) in pinned host memory until backward: frees
    2 x tokens x hidden bytes per layer of GPU memory for two PCIe copies of it per step, and leaves the layers
    uncompiled. ``auto``: on with gradient checkpointing where the run would not fit its GPUs without it (the plan's
    memory savers, ``plan.memory_savers``). ``on`` needs gradient_checkpointing."""
    random_init: bool = False
    """Build the architecture from its config with random weights (speed and memory do not depend on values)."""
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    """Fields set on the Hugging Face config before the model is built, e.g. ``num_hidden_layers``."""
    trust_remote_code: bool = False

    @field_validator("liger_kernel", "compile", "tiled_mlp", "activation_offloading", mode="before")
    @classmethod
    def _yaml_on_off(cls, v):
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v  # YAML reads on/off as booleans


class LoraConfig(Section):
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] = Field(default_factory=list)

    @field_validator("target_modules", mode="before")
    @classmethod
    def _a_list(cls, v):
        if isinstance(v, str) and v != "all-linear":
            raise ValueError(f"lora.target_modules={v}: a list of module names, written [{v}] (several: "
                             "[q_proj, v_proj]), or all-linear")
        return v

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("lora.target_modules is empty: list module names (e.g. [q_proj, v_proj]) or 'all-linear'")
        return v


class QuantizationConfig(Section):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = "auto"
    """``auto`` stores the packed 4-bit weights in the compute dtype under ZeRO-3 (so ZeRO can shard them), else uint8."""
    upcast_non_quantized: bool = False
    """PEFT's ``prepare_model_for_kbit_training`` upcast of embeddings, norms and lm_head to float32 (adapters in
    fp32 too, DeepSpeed's 16-bit mode off so nothing is cast back). Off by default: it makes QLoRA 1.8-2.8x slower
    and heavier (see docs/design.md)."""
    keep_recomputed_weights: Literal["auto", "on", "off"] = "auto"
    """Under gradient checkpointing, a checkpointed layer's 4-bit weights stay dequantized from the layer's
    recompute to its backward, so each is dequantized twice a step, not three times (ftcluster/linear4bit.py). Costs
    one decoder layer's weights in the compute dtype while that layer's backward runs (0.4 GiB at 7B, 1.6 GiB at
    70B), which the estimator counts. ``auto``: on, except where ZeRO-3 partitions the parameters, which is chosen
    to save memory."""

    @field_validator("keep_recomputed_weights", mode="before")
    @classmethod
    def _yaml_on_off(cls, v):
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v  # YAML reads on/off as booleans


class DataConfig(Section):
    source: str = "builtin:pydoc"
    """A hub dataset name, a local .json/.jsonl/.parquet/.csv file or directory, or a builtin dataset:
    ``builtin:pydoc``, ``builtin:required-args`` (ftcluster/pydoc_data.py) or ``builtin:extract-json``
    (ftcluster/extraction_data.py)."""
    format: Literal["alpaca", "chat", "text"] = "alpaca"
    split: str = "train"
    eval_split: str | None = None
    """What to evaluate on: a split of a directory or hub dataset (``test``), or, with a local file as the source,
    another local file of the same format (``test.jsonl``). When absent, ``eval_fraction`` of the train split is held
    out."""
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    """The share of the train split held out for evaluation when no ``eval_split`` is named (a builtin dataset's
    held-out share, chosen by a hash of each example's name)."""
    validation_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Hold this share of the training examples out and evaluate on them instead of the held-out (test) examples,
    which the run then leaves unused: what choosing hyperparameters scores on, so that the test examples stay
    unseen until the runs at the chosen settings (``benchmarks.compare --tune``)."""
    max_examples: int | None = Field(None, gt=0)
    max_seq_len: int = Field(1024, gt=8)
    packing: bool = True
    padding_free: bool = False
    """Each micro batch one row of ``training.micro_batch_size x max_seq_len`` tokens: the packed rows' examples
    (each still at most ``max_seq_len``) packed best fit into rows that wide, so a micro batch carries the padding of
    one row rather than of each. Kept apart in attention as in any packed row; worth it with the varlen kernel
    (CUDA), where attention costs what the examples cost, not what the row does."""
    train_on_prompt: bool = False
    """Loss on prompt tokens too. Off by default: loss on response tokens only."""
    text_field: str = "text"
    """The field of the text (``format: text`` only)."""
    messages_field: str = "messages"
    """The field of the list of messages (``format: chat`` only)."""
    streaming: Literal["auto", "on", "off"] = "auto"
    """Prepare rows in one pass over the source, holding ``shuffle_buffer`` examples rather than the corpus.
    ``auto`` streams sources over 1 GiB (a file's size, a directory's files, a hub dataset's Arrow data); see
    docs/design.md for what differs (a buffered shuffle, a hashed eval holdout)."""
    shuffle_buffer: int = Field(10_000, gt=0)
    """Examples held for the shuffle before packing when streaming."""
    num_proc: int | None = Field(None, gt=0)
    """Processes that tokenize when streaming (default: the host's cores, at most 8)."""

    @field_validator("streaming", mode="before")
    @classmethod
    def _yaml_on_off(cls, v):
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v  # YAML reads on/off as booleans

    @model_validator(mode="after")
    def _what_the_source_has(self) -> "DataConfig":
        """Every field is honoured by the kind of source named, or refused: a split named for a file would read the
        file itself (an evaluation on ``data.eval_split`` would be on the training rows), and a builtin dataset has
        its own held-out split."""
        if self.source.startswith("builtin:"):
            for name, value, default in (("split", self.split, "train"), ("eval_split", self.eval_split, None),
                                         ("format", self.format, "alpaca")):
                if value != default:
                    raise ValueError(
                        f"data.{name}={value} with data.source={self.source}: a builtin dataset is alpaca-format "
                        "rows with its own held-out split (data.eval_fraction of them, chosen by a hash of each "
                        f"example's name). Unset data.{name}.")
        elif Path(self.source).expanduser().is_file():
            if self.eval_split is not None and not self.eval_split.endswith(FILE_SUFFIXES):
                raise ValueError(
                    f"data.eval_split={self.eval_split} with data.source={self.source}: a file has no splits, so the "
                    "evaluation would be on the training rows. Name another file to evaluate on (data.eval_split="
                    "test.jsonl; .json, .jsonl, .csv or .parquet), or unset data.eval_split and hold rows out with "
                    "data.eval_fraction.")
            if self.eval_split is not None and _same_file(self.eval_split, self.source):
                raise ValueError(f"data.eval_split={self.eval_split} is data.source itself: the evaluation would be "
                                 "on the training rows. Name another file, or unset data.eval_split.")
            if self.split != "train":
                raise ValueError(f"data.split={self.split} with data.source={self.source}: a file has no splits, and "
                                 "all of it is trained on. Unset data.split.")
        whole = self.streaming == "off" or self.source.startswith("builtin:")
        for name, value, default in (("shuffle_buffer", self.shuffle_buffer, 10_000), ("num_proc", self.num_proc, None)):
            if whole and value != default:
                raise ValueError(
                    f"data.{name}={value} with " + ("data.streaming=off" if self.streaming == "off" else
                                                    f"data.source={self.source} (made in memory)")
                    + f": only a streamed source uses it. Unset data.{name}, or stream the source (data.streaming=on).")
        if self.text_field != "text" and self.format != "text":
            raise ValueError(f"data.text_field={self.text_field} with data.format={self.format}: only format=text "
                             "reads it. Set data.format=text, or unset data.text_field.")
        if self.messages_field != "messages" and self.format != "chat":
            raise ValueError(f"data.messages_field={self.messages_field} with data.format={self.format}: only "
                             "format=chat reads it. Set data.format=chat, or unset data.messages_field.")
        return self


FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
"""What a local data file may be (ftcluster/data/reading.py reads each)."""


def _same_file(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.resolve() == pb.resolve() or (pa.exists() and pb.exists() and pa.samefile(pb))


class OptimizerConfig(Section):
    name: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw"
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    master_weights: Literal["fp32", "bf16"] = "fp32"
    """What the optimizer updates when the model is in bfloat16. ``fp32``: DeepSpeed keeps a float32 copy of every
    trained weight, steps it with float32 optimizer states and copies it back (AdamW: 16 bytes a trained
    parameter). ``bf16``: the optimizer steps the bf16 weights themselves, its states in bf16 too (8 bytes a
    parameter), as transformers' Trainer and torchtune do with a model loaded in bf16; an update smaller than
    bf16's resolution of its weight (about 1/256 of it) is lost, which long runs at small learning rates can feel.
    Under ZeRO-0 DeepSpeed then steps our optimizer as it is and ftcluster clips the gradients; under ZeRO-1-3 it is
    DeepSpeed's bf16_master_weights_and_grads with bf16_optimizer_states. Under ZeRO-0 the ``fp32`` copies are the
    optimizer's own (``optim.Float32Masters``, flat per parameter group), not DeepSpeed's bf16 mode."""


class SchedulerConfig(Section):
    name: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    """Warm-up as a share of the run's steps; give this or ``warmup_steps``, not both."""
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_warmup(self) -> "SchedulerConfig":
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError(f"scheduler.warmup_steps={self.warmup_steps} and scheduler.warmup_ratio="
                             f"{self.warmup_ratio} are both set: one would be ignored. Keep one of them.")
        return self


class DeepSpeedSection(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_param: Literal["none", "cpu"] = "none"
    config_file: str | None = None
    """A DeepSpeed JSON merged over the generated config (its keys win)."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Keys merged over the generated config after ``config_file``, as nested dicts."""
    zero3_frozen: Literal["auto", "layers", "deepspeed"] = "auto"
    """Who partitions a frozen base (LoRA, QLoRA) under ZeRO-3. ``layers``: ftcluster's layer shards
    (ftcluster/layer_shards.py), one gather per decoder layer and pass, the adapters under DeepSpeed's ZeRO-2;
    ``deepspeed``: DeepSpeed's ZeRO-3 for every parameter. ``auto``: layers where they apply (gradient
    checkpointing on, no parameter offload, no trainable base parameters), DeepSpeed otherwise."""
    nvtx_ranges: bool = False
    """DeepSpeed's NVTX ranges, for a profile under Nsight Systems. Off by default: ZeRO-3 opens and closes one
    around every gather, wait and release of every parameter, host time on every step (DeepSpeed turns them off
    itself when it compiles)."""


class ScalingSection(Section):
    num_workers: int = Field(1, gt=0)
    min_workers: int | None = Field(None, gt=0)
    """Set: the run goes on with as few as this many workers when a node is lost (Ray Train's elastic scaling,
    restarting from the latest checkpoint), and grows back to ``num_workers`` at a checkpoint when the cluster
    can hold them again. Needs ray.max_failures other than 0 (each loss is a restart). None: always
    ``num_workers``."""
    sequence_parallel: int = Field(1, gt=0)
    """Split each row's tokens over this many workers (DeepSpeed's Ulysses sequence parallelism): each holds 1/K of
    a row's activations, and attention trades heads for tokens between them. num_workers must be a multiple;
    the other factor is data parallel, and a step still takes micro_batch_size x gradient_accumulation_steps x
    num_workers rows, each trained once."""
    resize_check_s: float = Field(60.0, gt=0)
    """With min_workers: seconds between Ray Train's checks for room to grow back to num_workers."""
    use_gpu: bool | None = None
    """None: use GPUs when the Ray cluster has them."""
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class TrainingConfig(Section):
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps; when set, it wins over epochs (the data loops as often as needed)."""
    micro_batch_size: int = Field(1, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_grad_norm: float = Field(1.0, ge=0)
    log_every: int = Field(10, gt=0)
    """Optimizer steps between progress lines (loss, tokens/s, memory); a step that saves a checkpoint logs too, so
    the divergence guard checks it before it is written."""
    eval_every: int = Field(0, ge=0)
    """Optimizer steps between evaluations; 0 evaluates only at the end."""
    eval_batches: int | None = Field(None, gt=0)
    save_every: int = Field(0, ge=0)
    """Optimizer steps between checkpoints; 0 checkpoints only at the end."""
    export_every: int = Field(0, ge=0)
    """Optimizer steps between exports of the model (the adapter, or the whole model) in Hugging Face format to
    ``<run_dir>/exports/step<7 digits>/``, without optimizer state: what scoring quality during training reads
    (``benchmarks.compare`` times quality this way). 0: none."""
    save_every_minutes: float = Field(0.0, ge=0)
    """Minutes between checkpoints, counted from the last one (any kind); 0: none by time. With save_every, a
    checkpoint comes at whichever is due first: a preempted or killed run loses at most this much."""
    seed: int = 42
    profile_steps: int = Field(0, ge=0)
    """Profile this many optimizer steps (after 3 warm-up steps) with torch.profiler; each rank writes its
    table of operators by device time to ``<run_dir>/profile_rank<r>.txt``."""
    divergence_loss_factor: float = Field(4.0, ge=0)
    """Stop as diverged when a logged loss exceeds this many times the lowest logged so far, and by more than a nat
    (0: never). A NaN or infinite loss or gradient norm always stops the run."""
    divergence_zero_grad_logs: int = Field(2, ge=0)
    """Stop as diverged after this many logging steps in a row whose gradient norm is zero (the weights no longer
    learn: saturated or overflowed); 0: never."""


class OutputConfig(Section):
    storage_path: str = "runs"
    name: str | None = None
    """The run's name under ``storage_path``; a run started again with the same name resumes from its latest
    checkpoint. None: derived from the recipe and method."""
    keep_checkpoints: int = Field(2, gt=0)
    save_final_model: bool = True
    checkpoint_at_end: bool = True
    """False: the run ends without a checkpoint (and so without final/); for speed and memory benchmarks of
    shapes whose optimizer state would fill the disk."""

    @field_validator("name")
    @classmethod
    def _one_directory(cls, v):
        """The run's directory is ``storage_path/name``: a name with a separator, ``.`` or ``..`` would put it (and
        its checkpoint pruning) somewhere else."""
        if v is not None and (v in ("", ".", "..") or "/" in v or "\\" in v or v.startswith("~")):
            raise ValueError(f"output.name={v!r}: the run's directory under output.storage_path, so one name "
                             "without '/', '.' or '..' (e.g. team-run1); set output.storage_path for another place")
        return v


class RayConfig(Section):
    address: str | None = None
    """None: join the cluster in RAY_ADDRESS or a running local one, or start a local one."""
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts Ray Train makes after a failure; each restart resumes from the latest checkpoint."""
    resources_wait_s: float = Field(60.0, ge=0)
    """How long the driver waits for a joined cluster to show the resources the workers need (an autoscaler adding
    nodes) before it refuses the run; a local cluster it started is checked at once."""
    start_attempts: int = Field(3, ge=0)
    """Times Ray Train may try to start the worker group (a minute each) before the run fails: bounds the wait when
    resources vanish mid-run."""
    local_mode: bool | Literal["auto"] = "auto"
    """Run the one worker in the driver's own process, without Ray (not imported at all): no Ray cluster to start or
    join and no worker process to start, which is most of a one-GPU run's time before its first step. The run
    directory is the same, and either backend resumes the other's checkpoints. Needs scaling.num_workers=1; a
    failed run is not restarted (ray.max_failures is Ray's). ``auto``: on for one worker with no cluster to join
    (ray.address and RAY_ADDRESS unset, no Ray cluster running on this host or started in this process) and no
    restarts asked for; off otherwise, so a job submitted to a cluster runs its worker where Ray places it. The
    plan decides it before anything starts (``Plan.backend``)."""
    train_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    """Ray Train's own log lines on the console. At INFO its workers print a "Reporting training result" line with
    every report, beside ftcluster's own progress line; its warnings and errors always show."""


class MLflowConfig(Section):
    enabled: bool = False
    tracking_uri: str | None = None
    """None: MLflow's own default (``MLFLOW_TRACKING_URI``, else ./mlruns)."""
    experiment: str = "ftcluster"


class WandbConfig(Section):
    enabled: bool = False
    project: str = "ftcluster"
    entity: str | None = None
    mode: Literal["online", "offline"] = "online"
    """``offline`` writes the run under the run directory for ``wandb sync`` later (clusters without internet)."""


class TrackingConfig(Section):
    """Where rank 0 logs every metric record (ftcluster/tracking.py). TensorBoard's event files go to
    ``<run_dir>/tensorboard``."""
    tensorboard: bool = True
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    run_name: str | None = None
    """The tracked run's name (default: output.name)."""
    tags: list[str] = Field(default_factory=list)


class ResourcesConfig(Section):
    gpu_memory_gib: float | None = Field(None, gt=0)
    """Memory of each worker's GPU. None: what NVML reports for the smallest GPU the driver can see, or once it
    joins a Ray cluster, on the cluster's GPU nodes (set it where an autoscaler has yet to start them). The driver
    refuses a run the memory estimator says will not fit."""
    check_fit: bool = True
    """False (or ``--force``): start a run the estimator says will not fit."""


class RunConfig(Section):
    method: Literal["full", "lora", "qlora"] = "lora"
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _hub_cache(self) -> "RunConfig":
        """A hub id's cache, decided once here, so the driver and every worker read the same one."""
        m = self.model
        if m.hub_cache is None and is_hub_id(m.name_or_path):
            if os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME"):
                from huggingface_hub import constants

                m.hub_cache = str(constants.HF_HUB_CACHE)
            else:
                m.hub_cache = str(Path(self.output.storage_path).expanduser().resolve() / ".hub")
        return self

    @model_validator(mode="after")
    def _combinations(self) -> "RunConfig":
        ds, opt = self.deepspeed, self.optimizer
        steps, warmup = self.training.max_steps, self.scheduler.warmup_steps
        if steps and warmup >= steps:
            raise ValueError(f"scheduler.warmup_steps={warmup} with training.max_steps={steps}: the warm-up would "
                             "never end, and the run never reach optimizer.lr. Set scheduler.warmup_steps below "
                             "max_steps (or scheduler.warmup_ratio, a share of the steps).")
        if ds.offload_optimizer == "cpu" and opt.name != "adamw":
            raise ValueError(
                f"optimizer.name={opt.name} cannot run with deepspeed.offload_optimizer=cpu: DeepSpeed's CPU offload "
                "steps the optimizer on the host with its own CPU Adam, and bitsandbytes optimizers (8-bit or paged) "
                "keep their state on the GPU. Use optimizer.name=adamw, or deepspeed.offload_optimizer=none."
            )
        if ds.offload_optimizer == "cpu" and ds.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer=cpu needs deepspeed.zero_stage 1, 2 or 3.")
        if self.data.padding_free and not self.data.packing:
            raise ValueError("data.padding_free=true with data.packing=false: a padding-free micro batch is one "
                             "packed row of several rows' examples. Set data.packing=true, or unset padding_free.")
        if self.data.padding_free and self.scaling.sequence_parallel > 1:
            raise ValueError(f"data.padding_free=true with scaling.sequence_parallel={self.scaling.sequence_parallel}"
                             ": sequence parallelism splits each row's tokens over its group, rows of max_seq_len "
                             "tokens. Unset data.padding_free.")
        if self.ray.local_mode is True and self.scaling.num_workers != 1:
            raise ValueError(f"ray.local_mode=true with scaling.num_workers={self.scaling.num_workers}: local mode runs "
                             "one worker, in the driver's process. Set scaling.num_workers=1, or ray.local_mode=false.")
        sc = self.scaling
        if sc.min_workers is not None and sc.min_workers > sc.num_workers:
            raise ValueError(f"scaling.min_workers={sc.min_workers} is more than scaling.num_workers={sc.num_workers}: "
                             "min_workers is the fewest the run goes on with. Set it to at most num_workers.")
        if sc.min_workers is not None and sc.min_workers < sc.num_workers and self.ray.max_failures == 0:
            raise ValueError(f"scaling.min_workers={sc.min_workers} with ray.max_failures=0: a lost node ends the run "
                             "before it can go on with fewer workers. Set ray.max_failures to the restarts to allow "
                             "(-1: any number), or unset scaling.min_workers.")
        if sc.min_workers is not None and sc.min_workers < sc.num_workers and self.ray.local_mode is True:
            raise ValueError("scaling.min_workers with ray.local_mode=true: local mode runs one worker, in the "
                             "driver's process. Set ray.local_mode=false.")
        if self.ray.local_mode is True and self.ray.address:
            raise ValueError(f"ray.local_mode=true with ray.address={self.ray.address}: local mode joins no cluster. "
                             "Unset ray.address, or set ray.local_mode=false.")
        if opt.master_weights == "bf16" and self.model.dtype != "bfloat16":
            raise ValueError(f"optimizer.master_weights=bf16 with model.dtype={self.model.dtype}: bf16 master weights "
                             "are the bf16 model's own. Set model.dtype=bfloat16, or optimizer.master_weights=fp32.")
        if opt.master_weights == "bf16" and self.method == "qlora" and self.quantization.upcast_non_quantized:
            raise ValueError("optimizer.master_weights=bf16 with quantization.upcast_non_quantized=true: the upcast "
                             "keeps the adapters in float32. Set one of them the other way.")
        if ds.offload_param == "cpu" and ds.zero_stage != 3:
            raise ValueError("deepspeed.offload_param=cpu needs deepspeed.zero_stage=3 (only ZeRO-3 partitions parameters).")
        if self.data.streaming == "on" and self.data.source.startswith("builtin:"):
            raise ValueError(
                f"data.streaming=on with data.source={self.data.source}: builtin datasets are made in memory. Stream "
                "a file, directory or hub dataset, or set data.streaming=auto."
            )
        if self.model.checkpointed_layers is not None and not self.model.gradient_checkpointing:
            raise ValueError(
                f"model.checkpointed_layers={self.model.checkpointed_layers} needs model.gradient_checkpointing=true "
                "(it says how many layers are checkpointed)."
            )
        if self.model.activation_offloading == "on" and not self.model.gradient_checkpointing:
            raise ValueError(
                "model.activation_offloading=on needs model.gradient_checkpointing=true: what it moves to host "
                "memory are the layer inputs that checkpointing keeps."
            )
        if ds.zero3_frozen == "layers" and layers_clash(self):
            raise ValueError(f"deepspeed.zero3_frozen=layers with {layers_clash(self)}. Set "
                             "deepspeed.zero3_frozen=auto (layers where they apply) or deepspeed.")
        q = self.quantization
        if self.method == "qlora" and ds.zero_stage == 3 and q.quant_storage not in ("auto", q.compute_dtype):
            raise ValueError(
                f"quantization.quant_storage={q.quant_storage} with method=qlora and deepspeed.zero_stage=3: ZeRO-3 "
                "shards parameters of a floating dtype, so the 4-bit weights must be stored in the compute dtype. "
                f"Set quantization.quant_storage={q.compute_dtype} (or auto)."
            )
        if self.model.attn_implementation == "varlen" and not self.data.packing:
            raise ValueError(
                "model.attn_implementation=varlen needs data.packing=true: it takes sequence boundaries from packed "
                "rows and applies no padding mask. Use auto or sdpa for unpacked data."
            )
        if self.method == "qlora" and self.model.dtype == "float32" and q.compute_dtype != "float32":
            raise ValueError(
                f"method=qlora with model.dtype=float32 and quantization.compute_dtype={q.compute_dtype}: the 4-bit "
                "layers would compute in 16 bits next to a float32 model. Use model.dtype=bfloat16 (GPUs), or "
                "quantization.compute_dtype=float32 too (CPUs without native bf16)."
            )
        return self

    # --- derived facts, one place each ---
    @property
    def trains_adapter(self) -> bool:
        return self.method in ("lora", "qlora")

    @property
    def run_name(self) -> str:
        if self.output.name:
            return self.output.name
        model = Path(self.model.name_or_path.split(":")[-1]).name.replace(".gguf", "")
        return f"{model}-{self.method}"

    @property
    def run_dir(self) -> Path:
        return Path(self.output.storage_path).expanduser().resolve() / self.run_name

    def identity(self) -> dict:
        """Everything that changes what is trained: not where it goes, how it is launched, tracked or sized, nor the
        kernels, compilation and activation placement, which change speed and memory but not the result, nor how
        a step's rows are split into micro batches (the global batch a resumed run keeps is its plan's), nor how
        often it logs, evaluates, profiles or checkpoints."""
        return self.model_dump(mode="json", exclude={
            "output": True, "ray": True, "scaling": True, "resources": True, "tracking": True,
            "model": {"liger_kernel", "fused_loss_chunk_scale", "compile", "activation_offloading", "hub_cache"},
            "quantization": {"keep_recomputed_weights"}, "deepspeed": {"nvtx_ranges"}, "data": {"num_proc"},
            "training": {"micro_batch_size", "gradient_accumulation_steps", "log_every", "eval_every",
                         "eval_batches", "save_every", "save_every_minutes", "profile_steps", "export_every"}})

    def fingerprint(self) -> str:
        """A short hash of :meth:`identity`."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:12]

    def differences(self, other: "RunConfig") -> list[str]:
        """The fields of :meth:`identity` whose values differ from ``other``'s, as ``section.key: ours (theirs)``."""
        def flat(d: dict, prefix: str = "") -> dict:
            out = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
            return out

        ours, theirs = flat(self.identity()), flat(other.identity())
        return [f"{k}: {ours.get(k)!r} (the run's: {theirs.get(k)!r})" for k in sorted(ours.keys() | theirs.keys())
                if ours.get(k) != theirs.get(k)]


def layers_clash(cfg: "RunConfig") -> str | None:
    """Why a frozen base cannot be partitioned by decoder layers (``deepspeed.zero3_frozen``) in this run, or None:
    the rule the config's check and the plan share."""
    ds, lora = cfg.deepspeed, cfg.lora
    if ds.zero_stage != 3:
        return f"deepspeed.zero_stage={ds.zero_stage}: layer shards partition parameters, which is ZeRO-3"
    if not cfg.trains_adapter:
        return "method=full: every parameter is trained, and DeepSpeed's ZeRO-3 partitions them"
    if ds.offload_param == "cpu":
        return "deepspeed.offload_param=cpu: shards in host memory are DeepSpeed's"
    if not cfg.model.gradient_checkpointing or cfg.model.checkpointed_layers is not None:
        return ("model.gradient_checkpointing=false or model.checkpointed_layers: without the recompute, autograd "
                "keeps a layer's gathered weights from its forward to its backward")
    if lora.bias != "none" or lora.modules_to_save:
        return "lora.bias or lora.modules_to_save: base parameters that are trained are DeepSpeed's to partition"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Loading

def _parse_value(text: str) -> Any:
    """A command-line value parsed as YAML, so ``3``, ``1e-4``, ``true``, ``[q_proj,v_proj]`` and ``null`` work."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set dotted ``a.b.c=value`` overrides in a nested dict. Unknown keys are left for the schema to reject."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. training.max_steps=20)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"override {item!r}: {p!r} is a value, not a section")
            node = node.setdefault(p, {})
        node[parts[-1]] = _parse_value(value)
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check its spelling against configs/ or ftcluster/config.py"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  {field}: {msg}")
    return "\n".join(lines)


def from_dict(raw: dict, source: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (or the defaults when ``path`` is None), apply overrides, validate, and check files."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; recipes live in configs/ (e.g. configs/tiny_cpu.yaml)")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections (model:, method:, ...)")
        source = str(p)
    cfg = from_dict(apply_overrides(raw, overrides or []), source)
    check_paths(cfg)
    return cfg


def is_hub_id(name: str) -> bool:
    """Whether ``model.name_or_path`` names a model on the Hugging Face hub rather than something on disk."""
    return not (name.startswith(("embedded:", "/", ".", "~")) or Path(name).expanduser().exists())


def _looks_local(s: str) -> bool:
    return s.startswith((".", "/", "~")) or s.endswith((".gguf", ".json", ".jsonl", ".parquet", ".csv"))


def remote_code(name_or_path: str) -> ConfigError:
    """The refusal of a model that needs code of its own while ``model.trust_remote_code`` is off."""
    return ConfigError(f"model.name_or_path={name_or_path}: the model's config maps it to code of its own "
                       "(auto_map), which loading it would run. Read that code, then set model.trust_remote_code=true "
                       "to run it; or use a model whose architecture transformers has built in")


def _needs_own_code(model_dir: Path) -> bool:
    """Whether a local model's config maps it to code of its own (``auto_map``) for an architecture transformers
    does not have built in (where it has, transformers loads its own and ignores the map)."""
    try:
        fields = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False  # a broken config.json is named where it is read (plan.architecture)
    if not isinstance(fields, dict) or not fields.get("auto_map"):
        return False
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return fields.get("model_type") not in CONFIG_MAPPING_NAMES


def check_paths(cfg: RunConfig) -> None:
    """Fail on files the config names that are not there, before anything starts."""
    m = cfg.model.name_or_path
    if not m.startswith("embedded:"):
        if _looks_local(m) and not Path(m).expanduser().exists():
            raise ConfigError(f"model.name_or_path: {m} does not exist (a hub id, a local model directory or a .gguf file)")
        if Path(m).expanduser().is_dir() and not (Path(m).expanduser() / "config.json").exists():
            raise ConfigError(f"model.name_or_path: directory {m} has no config.json; point it at a Hugging Face model directory")
        local = Path(m).expanduser()
        if (local / "config.json").is_file() and not cfg.model.trust_remote_code and _needs_own_code(local):
            raise remote_code(m)
        if (local.is_dir() and not cfg.model.random_init and not list(local.glob("*.safetensors"))
                and list(local.glob("*.bin"))):
            raise ConfigError(f"model.name_or_path: {m} holds only pickled weights (*.bin), which can run code when "
                              "loaded and are never read here; convert them to safetensors (transformers: "
                              "from_pretrained then save_pretrained(safe_serialization=True)) and point at that")
    elif m != EMBEDDED_MODEL:
        raise ConfigError(f"model.name_or_path: unknown embedded model {m!r}; the embedded model is {EMBEDDED_MODEL}")
    if cfg.model.tokenizer and _looks_local(cfg.model.tokenizer) and not Path(cfg.model.tokenizer).expanduser().exists():
        raise ConfigError(f"model.tokenizer: {cfg.model.tokenizer} does not exist")
    src = cfg.data.source
    if not src.startswith("builtin:") and _looks_local(src) and not Path(src).expanduser().exists():
        raise ConfigError(f"data.source: {src} does not exist (a hub dataset name, a local file or directory, or builtin:pydoc)")
    ev = cfg.data.eval_split
    if ev is not None and Path(src).expanduser().is_file() and not Path(ev).expanduser().is_file():
        raise ConfigError(f"data.eval_split: {ev} does not exist (with a local file as data.source, the file to "
                          "evaluate on)")
    if src.startswith("builtin:") and src not in BUILTIN_DATASETS:
        raise ConfigError(f"data.source: unknown builtin dataset {src!r}; the builtin datasets are "
                          f"{', '.join(BUILTIN_DATASETS)}")
    f = cfg.deepspeed.config_file
    stages = {}
    if f is not None:
        if not Path(f).expanduser().is_file():
            raise ConfigError(f"deepspeed.config_file: {f} does not exist")
        try:
            user = json.loads(Path(f).expanduser().read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed.config_file: {f} is not valid JSON: {e}") from None
        stages[f"deepspeed.config_file ({f})"] = (user.get("zero_optimization") or {}).get("stage")
    batch_keys = {"train_batch_size": "training.micro_batch_size x gradient_accumulation_steps x num_workers",
                  "train_micro_batch_size_per_gpu": "training.micro_batch_size",
                  "gradient_accumulation_steps": "training.gradient_accumulation_steps"}
    for key in batch_keys.keys() & cfg.deepspeed.overrides.keys():
        # The data loader, the schedule's step count and resumes all follow ours; DeepSpeed's own would disagree.
        raise ConfigError(f"deepspeed.overrides sets {key}: the batch is the run's own; set {batch_keys[key]} instead")
    stages["deepspeed.overrides"] = (cfg.deepspeed.overrides.get("zero_optimization") or {}).get("stage")
    for where, stage in stages.items():
        # The stage decides how the model is built (partitioned or not) before DeepSpeed reads its config.
        if stage is not None and stage != cfg.deepspeed.zero_stage:
            raise ConfigError(f"{where} sets zero_optimization.stage={stage} but deepspeed.zero_stage="
                              f"{cfg.deepspeed.zero_stage}: set the stage with deepspeed.zero_stage={stage} only")


def save_resolved(cfg: RunConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
