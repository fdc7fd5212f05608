"""DeepSpeed set-up: the engine config generated from ours, ZeRO-3's partitioning while the model is built, ZeRO-3's
gather schedule derived from the built model's shape, and ``deepspeed.initialize``."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from ftcluster import activations, optim, patches
from ftcluster.layer_shards import LayerShards, full_numel
from ftcluster.config import RunConfig
from ftcluster.plan import Plan


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _user_config(cfg: RunConfig) -> dict:
    """``deepspeed.config_file`` with ``deepspeed.overrides`` merged over it: what the user set, which wins."""
    d = cfg.deepspeed
    user = _merge(json.loads(Path(d.config_file).expanduser().read_text()) if d.config_file else {}, d.overrides)
    # A stage set there equals deepspeed.zero_stage (config.load checks), which deepspeed_config turns into
    # DeepSpeed's own: ZeRO-2 under a frozen base in layer shards.
    user.get("zero_optimization", {}).pop("stage", None)
    return user


def deepspeed_config(cfg: RunConfig, plan: Plan, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON for this run; ``deepspeed.config_file`` and then ``deepspeed.overrides`` win over it.
    ``load_universal``: the engine resumes from a universal checkpoint (``checkpoint.to_universal``)."""
    t, d = cfg.training, cfg.deepspeed
    stage = plan.zero_stage
    zero: dict = {"stage": stage, "overlap_comm": stage > 0, "contiguous_gradients": True}
    if d.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if d.offload_param == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        # Adapters are gathered by us at save time; never gather the whole 16-bit model just to save.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        if cfg.model.gradient_checkpointing and cfg.model.checkpointed_layers is None:
            # zero.Init otherwise replaces torch.nn.functional.linear, process-wide, with a Python autograd
            # function (deepspeed/runtime/zero/linear.py) that saves the weight itself rather than a view of its
            # gathered data, which would keep every layer gathered until backward. Inside a checkpointed layer
            # forward saves nothing, and recompute and backward run with the layer gathered, so torch's own linear
            # is safe there and spares two Python calls per matmul; outside the layers only the output layer's
            # view lives from its forward to its backward, which come one after the other.
            zero["memory_efficient_linear"] = False
    # DeepSpeed's bf16/fp16 modes cast every parameter to 16 bits (keep_in_fp32_modules spares buffers only), which
    # would silently undo PEFT's fp32 upcast; with the upcast on, the model keeps the dtypes PEFT gave it.
    mixed = cfg.method == "qlora" and cfg.quantization.upcast_non_quantized
    # No overflow check: bf16 has float32's exponent range, so there is no loss scale for an overflow to lower
    # and a step to skip, and DeepSpeed's check (isfinite, amax and amin of every gradient in turn, then a sync)
    # costs a small model's step a quarter of its time. A non-finite gradient means the run diverged, as in
    # torch's and the HF Trainer's bf16 loops, and the loop stops it at the next logging step (DivergenceGuard).
    bf16 = {"enabled": cfg.model.dtype == "bfloat16" and not mixed, "check_grad_overflow": False}
    if plan.steps_model_weights:
        # ZeRO-0: DeepSpeed's bf16 mode would wrap the optimizer around float32 copies, stepping one tensor at a
        # time; off, it steps ours over the bf16 weights as they are, and the float32 copies, where asked for, are
        # the optimizer's own (optim.Float32Masters).
        bf16 = {"enabled": False}
    elif cfg.optimizer.master_weights == "bf16":
        # ZeRO-1-3 partition bf16 weights and states instead of float32 ones.
        bf16 = {**bf16, "enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
    ds = {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        # Sequence parallelism: each of a group's K workers' rows is one micro step of the whole group (its
        # data-parallel size is num_workers / K to DeepSpeed): K micro steps for each of ours.
        "gradient_accumulation_steps": plan.accumulation * plan.sequence_parallel,
        "train_batch_size": plan.micro_batch * plan.accumulation * world_size,
        # Where the optimizer steps the model's own weights, DeepSpeed would clip with a float32 copy and a norm of
        # each gradient in turn; the loop clips them with foreach kernels (engine.GradClip).
        "gradient_clipping": 0.0 if plan.steps_model_weights else t.max_grad_norm,
        "bf16": bf16,
        "fp16": {"enabled": cfg.model.dtype == "float16" and not mixed},
        "zero_optimization": zero,
        # bitsandbytes and torch optimizers are passed in as client optimizers.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if d.offload_optimizer == "cpu":
        o = cfg.optimizer
        # Offload steps on the host with DeepSpeed's CPU Adam, which it builds from this section.
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                                       "weight_decay": o.weight_decay}}
    return _merge(ds, _user_config(cfg))


def is_zero3(ds_config: dict) -> bool:
    return ds_config.get("zero_optimization", {}).get("stage") == 3


def zero3_schedule(model: torch.nn.Module) -> dict:
    """ZeRO-3's gather schedule, derived from the built model: a decoder layer is the unit that is gathered,
    prefetched and released. DeepSpeed's defaults are fixed element counts (a 5e7 prefetch bucket, 1e9 live
    parameters and reuse distance) that fit no model in particular: at 7B they keep about 2 GB of gathered weights
    on every GPU whatever the GPU count, and they gather module by module, dozens of hooks and collectives a layer.

    - ``leaf_module``: each decoder layer is one ZeRO-3 leaf, gathered by one collective before its forward (and
      again before its backward and recompute) and released after; no hooks inside it.
    - ``stage3_prefetch_bucket_size`` = one layer: the next layer's gather overlaps this layer's compute.
    - ``stage3_max_live_parameters`` = three layers: the one computing, the one prefetched, and the embedding or
      output layer that joins them at either end.
    - ``stage3_max_reuse_distance`` = one layer: a layer is kept only if it is needed again right away; forward's
      layers are released rather than kept for a backward that is a whole model away.
    - ``stage3_param_persistence_threshold`` = the hidden size, or the largest adapter matrix smaller than every
      frozen matrix when that is larger: norms, biases and LoRA's matrices stay whole on every GPU (a
      7B model's LoRA on q,v is 8 MB), every base matrix is partitioned. Each partitioned parameter costs ZeRO-3
      host work at every gather and release (a wait, a copy, events, a free), and the steps are host-bound: LoRA on
      q,v is 4 of a Llama layer's 11 matrices, on every linear 14 of 21.
    Sizes are in the parameters' stored elements (a 4-bit weight stored in 16 bits counts a quarter of its values).
    """
    layers = activations.decoder_layers(model)
    if not layers:
        return {}
    numel = full_numel
    layer = max(sum(numel(p) for p in m.parameters()) for m in layers)
    hidden = getattr(getattr(model, "config", None), "hidden_size", 0) or int(1e5)
    # Adapters only: under full fine-tuning nothing is frozen, and a trainable matrix is a base matrix.
    frozen = min((numel(p) for p in model.parameters() if not p.requires_grad and numel(p) > hidden), default=0)
    persist = max([hidden] + [numel(p) for p in model.parameters() if p.requires_grad and numel(p) < frozen])
    return {
        "leaf_module": {"classes": sorted({type(m).__name__ for m in layers})},
        "stage3_prefetch_bucket_size": layer,
        "stage3_max_live_parameters": 3 * layer,
        "stage3_max_reuse_distance": layer,
        "stage3_param_persistence_threshold": persist,
    }


DEFAULT_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size and allgather_bucket_size, in elements


def bucket_sizes(model: torch.nn.Module) -> dict:
    """ZeRO's bucket sizes for ``model``: DeepSpeed's 5e8 elements, or all the trainable elements when there are
    fewer. With contiguous_gradients and overlap_comm, ZeRO-1/2 allocate two reduce buckets of that size at the first
    gradient (1.9 GiB in bf16 whatever the model) and ZeRO-3 one per gradient dtype when the engine is built; LoRA's
    few million trainable elements fit one bucket many times over, so the rest is memory for nothing (1.8 GiB of a
    7B LoRA run's 16 GiB under ZeRO-2)."""
    trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    size = max(1, min(DEFAULT_BUCKET, trainable))
    return {"reduce_bucket_size": size, "allgather_bucket_size": size}


def tuned_config(cfg: RunConfig, ds_config: dict, model: torch.nn.Module) -> dict:
    """``ds_config`` with settings derived from ``model`` filled in (ZeRO-3's gather schedule, the bucket sizes);
    what the user set still wins."""
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        # ZeRO-3 allocates its reduce buckets (one per gradient dtype) at this size too.
        derived = {**zero3_schedule(model), "reduce_bucket_size": bucket_sizes(model)["reduce_bucket_size"]}
    elif stage in (1, 2):
        derived = bucket_sizes(model)
        bucket = _user_config(cfg).get("zero_optimization", {}).get("reduce_bucket_size",
                                                                    derived["reduce_bucket_size"])
        derived["overlap_comm"] = overlaps_reduction(model, bucket)
    else:
        return ds_config
    return _merge(_merge(ds_config, {"zero_optimization": derived}), _user_config(cfg))


def overlaps_reduction(model: torch.nn.Module, reduce_bucket_size: int) -> bool:
    """ZeRO-1/2's ``overlap_comm``: reduce each full bucket of gradients on a side stream while backward goes on.
    It pays where the gradients fill several buckets (full fine-tuning of a large model). Where they fit one
    (adapters; any model under 5e8 trainable elements) the one reduction comes after the last gradient whatever
    the setting, and overlap_comm only adds DeepSpeed's device-wide synchronize before it and a side stream the
    other ranks wait on, which measured slower (benchmarks.overhead; docs/design.md)."""
    trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    return trainable > reduce_bucket_size


class Zero3Partition:
    """ZeRO-3's partitioning, applied to parameters while the model is still being built: each call hands its
    parameters to ``deepspeed.zero.Init``, which broadcasts rank 0's values and keeps this rank's shard (on the
    device, or in host memory under ``offload_param``). ``deepspeed.initialize`` then finds a partitioned model and
    neither moves the whole model to the device nor partitions it again."""

    loads_checkpoints = True

    def __init__(self, ds_config: dict):
        self.ds_config = ds_config
        self._first = None  # a partitioned parameter: its converter reuses the first Init's settings

    def plan(self, model: torch.nn.Module) -> None:
        pass

    def adopt(self, model: torch.nn.Module) -> None:
        pass  # deepspeed.initialize partitions a model it finds whole

    def finish(self, model: torch.nn.Module) -> None:
        pass  # DeepSpeed's engine puts its hooks on the model

    def __call__(self, params: list[torch.nn.Parameter], owner: str = "") -> None:
        import deepspeed

        params = [p for p in params if not hasattr(p, "ds_id")]
        if not params:
            return
        if self._first is None:
            # Joins the torch process group Ray Train made, as deepspeed.initialize does later; the config's batch
            # check needs the world size.
            deepspeed.comm.init_distributed(dist_init_required=False)
            deepspeed.zero.Init(module=torch.nn.ParameterList(params), config_dict_or_path=self.ds_config)
            self._first = params[0]
        else:
            self._first.convert_to_zero_parameters(params)

    @contextlib.contextmanager
    def loading(self):
        """While open, transformers' ``from_pretrained`` builds the model inside ``zero.Init`` and copies each
        checkpoint tensor into its partitions (rank 0 reads the checkpoint into host memory), so no worker holds the
        whole 16-bit model on its device. Not for bitsandbytes models: transformers loads those whole."""
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.comm.init_distributed(dist_init_required=False)
        alive = HfDeepSpeedConfig(self.ds_config)  # transformers holds it by weak reference only
        try:
            yield
        finally:
            del alive


def zero3_partition(plan: Plan, ds_config: dict) -> Zero3Partition | LayerShards | None:
    """The build-time partitioner when the run is ZeRO-3 (after the user's DeepSpeed config and overrides): a frozen
    base's by layers (``Plan.frozen_base``), or DeepSpeed's."""
    if plan.frozen_base == "layer-shards":
        import deepspeed

        deepspeed.comm.init_distributed(dist_init_required=False)
        return LayerShards()
    # zero.Init reads the batch sizes as if every worker were data parallel; under sequence parallelism (K micro
    # steps of ours per worker) they would not add up, and partitioning needs none of them.
    build_config = {k: v for k, v in ds_config.items() if k != "train_batch_size"}
    return Zero3Partition(build_config) if is_zero3(ds_config) else None


def initialize(cfg: RunConfig, plan: Plan, model, device: torch.device, ds_config: dict, total_steps: int,
               mpu=None):
    """A DeepSpeed engine over ``model`` with our optimizer and schedule. The torch process group is already up
    (Ray Train made it), so DeepSpeed joins it instead of making its own. Returns (engine, scheduler, the final
    DeepSpeed config). ``mpu``: the sequence-parallel groups (ftcluster/sequence_parallel.py)."""
    import deepspeed

    patches.deepspeed_nvtx(cfg.deepspeed.nvtx_ranges)
    ds_config = tuned_config(cfg, ds_config, model)
    if ds_config["zero_optimization"].get("leaf_module", {}).get("classes") and cfg.trains_adapter:
        # ZeRO-3 reduces a leaf layer's gradients in the layer's full backward hook, which torch fires as soon as
        # the output's gradient arrives when no input requires grad: the first layer's, behind a frozen embedding,
        # would be reduced before they exist ("size of tensor a (0) must match ... (16)" in AccumulateGrad).
        model.enable_input_require_grads()
    optimizer = optim.build_optimizer(cfg, plan, model, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    schedule = optim.lr_lambda(cfg, total_steps)
    # Handing the schedule to DeepSpeed makes it step at accumulation boundaries and live in its checkpoints.
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=trainable if optimizer is None else None, optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=ds_config, dist_init_required=False, mpu=mpu,
    )
    if cfg.trains_adapter:
        patches.checkpoints_without_tied_frozen_weights(engine)  # checkpoints hold what trains, nothing frozen
    return engine, scheduler, ds_config
