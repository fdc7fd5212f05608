"""ZeRO-3's partitioning of a frozen base (LoRA, QLoRA), one whole decoder layer at a time.

Each rank keeps 1/N of the bytes of every decoder layer's frozen parameters (and of the embedding and output
layer), laid end to end in one buffer per layer. A layer is gathered by one collective into one buffer just
before it runs, its parameters become views of that buffer, and they are released when it is done: after its
forward, and after its backward (gathered again, for the recompute and the backward together, when the gradient
of its output arrives). The next layer's gather is queued before this layer computes, so it overlaps.

Why not DeepSpeed's ZeRO-3 for these parameters: it does its bookkeeping per parameter and per pass (a walk of the
layer's module tree, an event per parameter with a throttle that waits on the GPU, a ``torch.cat`` per gathered
parameter), about 1.0 M Python calls a 7B step against ZeRO-2's 0.23 M, and the steps run host-bound at 0.56x
ZeRO-2's speed (docs/design.md). Frozen parameters need none of what that bookkeeping is for: no gradient is
reduced and no optimizer state is kept. Here a layer costs a collective, a wait and a loop of ``.data`` swaps per
pass. The adapters are small and trained: DeepSpeed's ZeRO-2 keeps them whole on every rank and partitions their
gradients and optimizer state, which is what ZeRO-3 does for them too with LoRA's matrices persistent.

(torch's FSDP2 does the same gather per layer, but turns parameters into DTensors, which neither DeepSpeed's engine
nor bitsandbytes' ``Params4bit`` with its quantization state pass through.)
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ftcluster import activations

ALIGN = 256  # bytes: each parameter's view starts where a vectorised kernel can read it
MIN_OUTSIDE_BYTES = 2**20  # outside the decoder layers only tensors this big are partitioned (embedding, output)


def _gather(out: torch.Tensor, shard: torch.Tensor, group):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the new name from torch 2.13
    return fn(out, shard, group=group, async_op=True)


class Unit:
    """The frozen parameters gathered together (a decoder layer's, or one module's outside the layers), held as
    this rank's slice of their bytes laid end to end, each parameter starting on an ``ALIGN`` boundary."""

    def __init__(self, name: str, params: list[nn.Parameter], group):
        self.name, self.params, self.group = name, params, group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        self.layout, end = [], 0
        for p in params:
            self.layout.append((end, p.numel() * p.element_size(), p.dtype, p.shape))
            end += -(-p.numel() * p.element_size() // ALIGN) * ALIGN
        self.shard_bytes = -(-end // (ALIGN * world)) * ALIGN
        device = params[0].device
        self.shard = torch.zeros(self.shard_bytes, dtype=torch.uint8, device=device)
        lo, hi = rank * self.shard_bytes, (rank + 1) * self.shard_bytes
        for p, (start, nbytes, _, _) in zip(params, self.layout):
            a, b = max(start, lo), min(start + nbytes, hi)
            if a < b:
                self.shard[a - lo:b - lo] = p.data.contiguous().reshape(-1).view(torch.uint8)[a - start:b - start]
        self.full: torch.Tensor | None = None
        self._work, self._released = None, False
        self.module: nn.Module | None = None  # the decoder layer, for a layer's unit
        self.index = -1  # its place among the layers, for a layer's unit
        for p in params:
            p.full_shape = p.shape  # what the model's shape-reading code (parameter counts, estimates) sees
            p.requires_grad_(False)
        self.release()

    @property
    def full_bytes(self) -> int:
        return self.shard_bytes * dist.get_world_size(self.group)

    def gather(self) -> None:
        """Queue the gather (no wait): the collective runs beside whatever the GPU computes now."""
        if self.full is None and self._work is None:
            self._full = torch.empty(self.full_bytes, dtype=torch.uint8, device=self.shard.device)
            self._work = _gather(self._full, self.shard, self.group)

    def materialize(self) -> None:
        """The parameters hold their full values, as views of the gathered buffer; the current stream waits for
        the gather, the host does not."""
        if self.full is not None:
            return
        self.gather()
        self._work.wait()
        self.full, self._work, self._full, self._released = self._full, None, None, False
        for p, (start, nbytes, dtype, shape) in zip(self.params, self.layout):
            p.data = self.full[start:start + nbytes].view(dtype).view(shape)

    def release(self) -> None:
        """The parameters are empty again. The gathered buffer is freed once nothing else holds a view of it
        (autograd may, until the backward that needs it)."""
        if self._work is not None:
            self.materialize()  # a queued gather completes before its buffer can be dropped
        if self.full is None and self._released:
            return
        for p in self.params:
            p.data = torch.empty(0, dtype=p.dtype, device=self.shard.device)
        self.full, self._released = None, True


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    return None


class LayerShards:
    """The partitioner handed to the model builder (``models.Partition``): parameters arrive module by module as
    they are built, those of one decoder layer become one :class:`Unit`; ``finish`` puts the gather and release
    hooks on the built model."""

    loads_checkpoints = False  # from_pretrained cannot load into these shards: the builder reads module by module

    def __init__(self):
        self.group = dist.new_group(backend=None)  # its own communicator: never queued behind ZeRO-2's reductions
        self.units: list[Unit] = []
        self.layers: list[Unit] = []  # in the order the forward runs them
        self._layer_names: list[str] = []
        self._pending_name: str | None = None
        self._pending: list[nn.Parameter] = []

    # --- the build ---
    def plan(self, model: nn.Module) -> None:
        """Learn which module names are decoder layers, from the model (weightless) before it is built."""
        layers = set(map(id, activations.decoder_layers(model)))
        self._layer_names = [name + "." for name, m in model.named_modules() if id(m) in layers]

    def _unit_name(self, owner: str) -> str:
        for prefix in self._layer_names:
            if (owner + ".").startswith(prefix):
                return prefix[:-1]
        return owner

    def __call__(self, params: list[nn.Parameter], owner: str = "") -> None:
        name = self._unit_name(owner)
        if name != self._pending_name:
            self._flush()
            self._pending_name = name
        self._pending += [p for p in params if not hasattr(p, "full_shape")]

    def _flush(self) -> None:
        name, params = self._pending_name, self._pending
        self._pending_name, self._pending = None, []
        if name is None:
            return
        is_layer = name + "." in self._layer_names
        if not is_layer:
            params = [p for p in params if p.numel() * p.element_size() >= MIN_OUTSIDE_BYTES]
        if params:
            unit = Unit(name, params, self.group)
            self.units.append(unit)
            if is_layer:
                self.layers.append(unit)

    def adopt(self, model: nn.Module) -> None:
        """Partition a model that was built or loaded whole."""
        self.plan(model)
        inside = {id(p) for name in self._layer_names for p in model.get_submodule(name[:-1]).parameters()}
        for name in self._layer_names:
            self(list(model.get_submodule(name[:-1]).parameters()), name[:-1])
        for name, module in model.named_modules():
            self([p for p in module.parameters(recurse=False) if id(p) not in inside], name)
        self._flush()

    def finish(self, model: nn.Module) -> None:
        """Hooks on the built model: each decoder layer gathers its unit before it runs and releases it after;
        a module outside the layers gathers the unit holding its parameters (an output layer tied to the
        embedding gathers the embedding's)."""
        self._flush()
        self.layers.sort(key=lambda u: self._layer_names.index(u.name + "."))
        for i, unit in enumerate(self.layers):
            unit.index = i
            layer = unit.module = model.get_submodule(unit.name)
            layer.register_forward_pre_hook(self._layer_pre(unit), with_kwargs=True)
            layer.register_forward_hook(self._layer_post(unit), with_kwargs=True)
        owned = {id(p): u for u in self.units if u not in self.layers for p in u.params}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if id(p) in owned:
                    unit = owned[id(p)]
                    module.register_forward_pre_hook(lambda *_, unit=unit: unit.materialize())
                    # Autograd keeps a view where backward needs the weight (the output layer's matmul); the
                    # parameter itself is empty again.
                    module.register_forward_hook(lambda *_, unit=unit: unit.release())
        # Released after a layer's backward by a hook on its input's gradient: behind a frozen embedding the first
        # layer's input would have none.
        model.enable_input_require_grads()
        model.register_forward_pre_hook(lambda *_: self.release_all())  # nothing left over from an aborted pass
        model._layer_shards = self

    def release_all(self) -> None:
        for unit in self.units:
            unit.release()

    # --- the run ---
    def _neighbour(self, unit: Unit, step: int) -> Unit | None:
        i = unit.index + step
        return self.layers[i] if 0 <= i < len(self.layers) else None

    def _layer_pre(self, unit: Unit):
        def hook(module, args, kwargs):
            unit.materialize()
            nxt = self._neighbour(unit, 1)
            if nxt is not None:
                nxt.gather()
            x = _first_tensor(args) if args else kwargs.get("hidden_states")
            if torch.is_grad_enabled() and x is not None and x.requires_grad:
                x.register_hook(lambda _grad: unit.release())  # this layer's backward is done
        return hook

    def _layer_post(self, unit: Unit):
        def backward_pre(_grad):
            unit.materialize()  # for the recompute and the backward, which follow
            prev = self._neighbour(unit, -1)
            if prev is not None:
                prev.gather()

        def hook(module, args, kwargs, output):
            y = _first_tensor(output)
            training = torch.is_grad_enabled() and y is not None and y.requires_grad
            if training:
                y.register_hook(backward_pre)
            # The last layer is the first one backward needs: keep it.
            if not training or unit is not self.layers[-1]:
                unit.release()
        return hook

    # --- what a rank holds ---
    def held_bytes(self) -> int:
        """Bytes of base parameters this rank holds now: its shards, plus whatever is gathered."""
        return sum(u.shard_bytes + (u.full.numel() if u.full is not None else 0) for u in self.units)

    def full_bytes(self) -> int:
        return sum(sum(nbytes for _, nbytes, _, _ in u.layout) for u in self.units)


def of(model: nn.Module) -> LayerShards | None:
    """The layer shards a built model runs with, if any (through PEFT's and DeepSpeed's wrappers)."""
    for m in model.modules():
        if isinstance(getattr(m, "_layer_shards", None), LayerShards):
            return m._layer_shards
    return None


def full_numel(p: torch.Tensor) -> int:
    """A parameter's element count whether or not it is partitioned (by DeepSpeed or by :class:`LayerShards`)."""
    if hasattr(p, "ds_numel"):
        return p.ds_numel
    if hasattr(p, "full_shape"):
        return math.prod(p.full_shape)
    return p.numel()
