"""Attention for packed rows through PyTorch's variable-length flash kernel (``torch.nn.attention.varlen``).

With SDPA, a packed row needs a block-diagonal mask, and an explicit mask keeps SDPA off its flash kernel. The
varlen kernel instead takes the cumulative sequence lengths of the packed examples and attends causally within
each, with no mask at all. The lengths are computed on the host by the collator (``data.packing.collate``) and reach
every layer as the ``cu_seq_lens_q/k`` and ``max_length_q/k`` keywords transformers passes through to attention.
Registered under the name ``varlen``; transformers then builds no mask for it.

A micro batch whose rows each hold one example (its boundaries are one per row: the collator counts a row's trailing
padding in its last example, which causal attention lets no real token see) needs no boundaries at all: it is plain
causal attention. Where torch's SDPA runs cuDNN's fused attention for such a call (Hopper), it goes there instead of
the varlen flash kernel (:func:`register` decides once, from the model's shape on this device).
"""

from __future__ import annotations

import inspect

import torch

NAME = "varlen"


def available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _kernel_options():
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    return varlen_attn, causal, "enable_gqa" in params


_CUDNN_ROWS = False
"""Whether a micro batch of one-example rows goes through SDPA (cuDNN's kernel), as :func:`register` decided."""

_KERNEL = None
"""(varlen_attn, its causal keyword, whether it takes ``enable_gqa``), looked up by :func:`register`, outside any
compiled layer: looked up in the attention call, Dynamo traced the lookup (``inspect.signature`` and all) at every
compile, and warned that it ignored the cache around it."""


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """query/key/value: (batch, heads, seq, head_dim) → (batch, seq, heads, head_dim), as transformers expects."""
    b, h, s, d = query.shape
    if _CUDNN_ROWS and cu_seq_lens_q is not None and cu_seq_lens_q.shape[0] == b + 1:
        return _causal(query, key, value, scaling)
    if cu_seq_lens_q is None and kwargs.get("position_ids") is not None and query.shape[2] > 1:
        # Rows without the collator's boundaries: where sequence parallelism gathered a row's positions, whose
        # restarts at 0 are its examples' starts (ftcluster/sequence_parallel.py).
        cu_seq_lens_q = boundaries(kwargs["position_ids"])
        max_length_q = query.shape[2]
    if cu_seq_lens_q is None:
        # No packing information: an unpadded causal row (generation, a single sequence).
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, None, scaling=scaling, dropout=dropout, **kwargs)
    kernel, causal, has_gqa = _KERNEL or _kernel_options()
    h_kv = key.shape[1]
    q = query.transpose(1, 2).reshape(b * s, h, d)
    k = key.transpose(1, 2).reshape(b * s, h_kv, d)
    v = value.transpose(1, 2).reshape(b * s, h_kv, d)
    extra = {}
    if h_kv != h:
        if has_gqa:
            extra["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(h // h_kv, dim=1), v.repeat_interleave(h // h_kv, dim=1)
    out = kernel(q, k, v, cu_seq_lens_q, cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q,
                 max_length_q, max_length_k or max_length_q, scale=scaling, **causal, **extra)
    return out.view(b, s, h, d), None


def _causal(query, key, value, scaling):
    """Causal attention over whole rows through SDPA's dispatcher → (batch, seq, heads, head_dim)."""
    gqa = {"enable_gqa": True} if key.shape[1] != query.shape[1] else {}
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, **gqa)
    return out.transpose(1, 2).contiguous(), None


def cudnn_takes(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether SDPA runs cuDNN's fused attention for a causal training call of this shape here, with the key/value
    heads as they are (``enable_gqa`` where they are fewer: repeating them for every query head would hold that
    much more for backward, which the memory estimate does not count). False on CPUs, for other dtypes, and where
    torch would pick its flash kernel, the varlen kernel's own."""
    from torch.nn.attention import SDPBackend

    from ftcluster import patches

    if device.type != "cuda":
        return False
    q = torch.empty(1, heads, 128, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.empty(1, kv_heads, 128, head_dim, device=device, dtype=dtype, requires_grad=True)
    gqa = {"enable_gqa": True} if kv_heads != heads else {}
    try:
        return patches.sdpa_backend(q, k, k, is_causal=True, **gqa) == SDPBackend.CUDNN_ATTENTION
    except RuntimeError:  # no kernel takes the call
        return False


def describe(cudnn_rows: bool) -> str:
    """What :func:`register` chose, as the worker prints it."""
    if not cudnn_rows:
        return "attention: varlen (PyTorch's flash kernel) for every micro batch"
    return ("attention: varlen (PyTorch's flash kernel); a micro batch whose rows each hold one example: SDPA's "
            "cuDNN kernel")


def boundaries(position_ids: torch.Tensor) -> torch.Tensor:
    """The cumulative lengths of the sequences in a (batch, seq) block of positions: each starts where its
    positions restart at 0, and each row starts a new one."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    end = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([starts, end]).to(torch.int32)


def register(config=None, dtype: torch.dtype = torch.bfloat16, device: torch.device | None = None) -> str:
    """Registers ``varlen`` with transformers and, for a model ``config`` on ``device``, decides whether a micro batch
    of one-example rows goes through SDPA (:func:`cudnn_takes`). Returns the line saying so."""
    global _KERNEL, _CUDNN_ROWS
    from transformers import AttentionInterface

    _KERNEL = _kernel_options()
    _CUDNN_ROWS = False
    if config is not None and device is not None:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        _CUDNN_ROWS = cudnn_takes(heads, getattr(config, "num_key_value_heads", None) or heads, head_dim, dtype,
                                  device)
    AttentionInterface.register(NAME, varlen_attention)
    return describe(_CUDNN_ROWS)
