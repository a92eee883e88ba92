"""Attention maths of LongLLaMA as pure functions: rotary embeddings, masks, and the single softmax
over local context and retrieved memory. Modules in `modeling.py` only project and dispatch here.

With grouped-query attention the queries of the G query heads sharing a key/value head are laid out
as one block of G*T queries of that head (`group_queries`), so local keys and memory are read once
per key/value head, never copied per query head.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F

from ..memory.protocol import MemoryHits


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Rotate `x` (B, H, T, D) by `positions` (B, T) with inverse frequencies `inv_freq` (D/2,).

    `scaling` multiplies cos and sin (the attention temperature of YaRN-like rope types).
    """
    angles = positions[..., None].float() * inv_freq.to(x.device)  # (B, T, D/2)
    emb = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, D)
    cos, sin = emb.cos() * scaling, emb.sin() * scaling
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def relative_positions(positions: torch.Tensor) -> torch.Tensor:
    """Positions (B, S) made relative to the smallest position of each row, so a local span starts at 0."""
    return positions - positions.min(dim=-1, keepdim=True).values


def min_score(dtype: torch.dtype) -> float:
    """The floor masked scores are clamped to: LongLLaMA's `max(finfo.min, -1e6)`.

    Clamping (instead of leaving `-inf`) keeps a fully masked query row finite, which is what the
    published implementation computes for padding queries.
    """
    return max(torch.finfo(dtype).min, -1e6)


def local_mask(valid: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Boolean mask (B, 1, T, S) of the keys each query may see.

    `valid` (B, S) marks non-padding keys; the last `num_queries` keys are the queries themselves, so
    query i sees every earlier key (cache) and the new keys up to itself.
    """
    num_keys = valid.shape[-1]
    query_pos = torch.arange(num_keys - num_queries, num_keys, device=valid.device)
    causal = torch.arange(num_keys, device=valid.device)[None, :] <= query_pos[:, None]  # (T, S)
    return causal[None, None] & valid[:, None, None, :].bool()


def _masked_scores(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    floor = min_score(scores.dtype)
    return scores.masked_fill(~mask, floor).clamp_min(floor)


def group_queries(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, H, T, D) per query head -> (B, Hkv, G*T, D), the G = H / Hkv heads of a group one after another."""
    batch, heads, length, dim = x.shape
    return x.reshape(batch, num_kv_heads, (heads // num_kv_heads) * length, dim)


def ungroup_queries(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The inverse of `group_queries`: (B, Hkv, G*T, D) -> (B, H, T, D)."""
    batch, kv_heads, grouped, dim = x.shape
    return x.reshape(batch, num_heads, grouped * kv_heads // num_heads, dim)


def attend(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    hits: MemoryHits | None = None,
    *,
    use_sdpa: bool = False,
) -> torch.Tensor:
    """Attention of `queries` over local keys plus optional memory hits, with one softmax.

    Args:
        queries: (B, H, T, D), already rotated as the layer requires (H: key/value heads, T may hold
            the queries of several query heads, see `group_queries`).
        keys, values: (B, H, S, D) local keys (rotated) and values.
        mask: (B, 1, T, S) boolean, True where a query may see a local key.
        hits: memory entries retrieved for these queries: shared by all queries (keys (B, H, M, D)) or
            per query (values (B, H, T, K, D) with their scores); `hits.valid` marks entries that may
            receive attention.
        use_sdpa: use the fused kernel where the key set is shared by several queries.

    Returns:
        (B, H, T, D) attention output, in the dtype of `queries`.
    """
    scale = math.sqrt(queries.shape[-1])
    shared = hits is None or hits.shared
    # The fused kernel saves the (T x M) score matrix; for a single query there is none to save, and
    # concatenating the memory to the local keys would cost more than the plain product.
    if use_sdpa and shared and queries.shape[-2] > 1:
        if hits is not None:
            keys = torch.cat([keys, hits.keys.to(keys.dtype)], dim=-2)
            values = torch.cat([values, hits.values.to(values.dtype)], dim=-2)
            mem_mask = hits.valid[:, None, None, :].expand(-1, 1, mask.shape[-2], -1)
            mask = torch.cat([mask, mem_mask], dim=-1)
        bias = torch.zeros(mask.shape, dtype=queries.dtype, device=queries.device)
        bias.masked_fill_(~mask, min_score(queries.dtype))
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=bias)

    scores = _masked_scores(torch.matmul(queries, keys.transpose(-1, -2)) / scale, mask)  # (B, H, T, S)
    if hits is None:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(queries.dtype)
        return torch.matmul(probs, values)

    mem_values = hits.values.to(values.dtype)
    if shared:
        mem_scores = torch.matmul(queries, hits.keys.to(queries.dtype).transpose(-1, -2)).div_(scale)  # (B, H, T, M)
        mem_valid = hits.valid[:, None, None, :]
    else:  # scored by the search: (B, H, T, K)
        mem_scores = (hits.scores / scale).to(scores.dtype)
        mem_valid = hits.valid
    if not bool(mem_valid.all()):
        mem_scores = mem_scores.masked_fill(~mem_valid, min_score(mem_scores.dtype))
    # One float32 softmax over [local, memory], then one product with [local, memory] values: the
    # published implementation's exact operation order, so bfloat16-stored memory rounds identically.
    probs = torch.softmax(torch.cat([scores, mem_scores], dim=-1), dim=-1, dtype=torch.float32).to(queries.dtype)
    if shared:
        return torch.matmul(probs, torch.cat([values, mem_values], dim=-2))
    local_probs, mem_probs = probs.split([scores.shape[-1], mem_scores.shape[-1]], dim=-1)
    return torch.matmul(local_probs, values) + torch.einsum("bhtk,bhtkd->bhtd", mem_probs, mem_values)
