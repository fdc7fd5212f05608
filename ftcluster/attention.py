"""Attention for packed rows through PyTorch's variable-length flash kernel (``torch.nn.attention.varlen``).

With SDPA, a packed row needs a block-diagonal mask, and an explicit mask keeps SDPA off its flash kernel. The
varlen kernel instead takes the cumulative sequence lengths of the packed examples and attends causally within
each, with no mask at all. The lengths are computed on the host by the collator (``data.packing.collate``) and reach
every layer as the ``cu_seq_lens_q/k`` and ``max_length_q/k`` keywords transformers passes through to attention.
Registered under the name ``varlen``; transformers then builds no mask for it.
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


_KERNEL = None
"""(varlen_attn, its causal keyword, whether it takes ``enable_gqa``), looked up by :func:`register`, outside any
compiled layer: looked up in the attention call, Dynamo traced the lookup (``inspect.signature`` and all) at every
compile, and warned that it ignored the cache around it."""


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """query/key/value: (batch, heads, seq, head_dim) → (batch, seq, heads, head_dim), as transformers expects."""
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
    b, h, s, d = query.shape
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


def boundaries(position_ids: torch.Tensor) -> torch.Tensor:
    """The cumulative lengths of the sequences in a (batch, seq) block of positions: each starts where its
    positions restart at 0, and each row starts a new one."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    end = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([starts, end]).to(torch.int32)


def register() -> None:
    global _KERNEL
    from transformers import AttentionInterface

    _KERNEL = _kernel_options()
    AttentionInterface.register(NAME, varlen_attention)
