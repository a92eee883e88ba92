"""Attention maths of LongLLaMA as pure functions: rotary embeddings, masks, and the single softmax
over local context and retrieved memory. Modules in `modeling.py` only project and dispatch here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .backends import MemoryHits


def rotary_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies of rotary embeddings, `(head_dim // 2,)` float32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate `x` (B, H, T, D) by `positions` (B, T) with base `theta`."""
    inv_freq = rotary_inv_freq(x.shape[-1], theta).to(x.device)
    angles = positions[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, D)
    return x * emb.cos().to(x.dtype) + rotate_half(x) * emb.sin().to(x.dtype)


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


class CrossBatch(NamedTuple):
    """FoT's training-time memory: memory layers of row b read rows b-1, ..., b-`distance` of the batch.

    With `top_k`, each query attends to only the `top_k` highest-scoring of those entries, the ones a
    top-k memory would retrieve at inference; None attends to all of them (FoT's dense training).
    """

    distance: int
    top_k: int | None = None


def cross_batch_hits(keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, distance: int) -> MemoryHits:
    """Memory of FoT's cross-batch attention: row b sees the keys and values of rows b-1, ..., b-distance.

    Args:
        keys, values: (B, H, T, D) unrotated keys and values of the rows (as if at position 0).
        valid: (B, T) non-padding flags.

    Returns:
        Hits shared by all queries of a row: keys/values (B, H, distance*T, D), valid (B, distance*T);
        rows before the first one are invalid.
    """
    def shift(x: torch.Tensor, rows: int) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x[:rows]), x[: x.shape[0] - rows]]) if rows < x.shape[0] else torch.zeros_like(x)

    shifts = range(1, distance + 1)
    return MemoryHits(
        keys=torch.cat([shift(keys, j) for j in shifts], dim=2),
        values=torch.cat([shift(values, j) for j in shifts], dim=2),
        valid=torch.cat([shift(valid.bool(), j) for j in shifts], dim=1),
    )


def _top_k_hits(queries: torch.Tensor, hits: MemoryHits, top_k: int) -> MemoryHits:
    """Per-query hits holding each query's `top_k` highest-scoring valid entries of shared `hits`.

    The choice carries no gradient, as retrieval from an index does not; attention over the chosen
    entries does. Scores are formed one batch row at a time, so a wide cross-batch memory costs
    (H x T x M) at once, not (B x H x T x M). Invalid entries are chosen last and stay invalid.
    """
    batch, heads, length, _ = queries.shape
    floor = torch.finfo(queries.dtype).min
    with torch.no_grad():
        best = torch.stack([
            torch.matmul(queries[b], hits.keys[b].to(queries.dtype).transpose(-1, -2))
            .masked_fill_(~hits.valid[b, None, None, :], floor)
            .topk(top_k, dim=-1).indices
            for b in range(batch)
        ])  # (B, H, T, K)

    def gather(x: torch.Tensor) -> torch.Tensor:  # (B, H, M, D) -> (B, H, T, K, D)
        flat = best.reshape(batch, heads, length * top_k, 1).expand(-1, -1, -1, x.shape[-1])
        return x.gather(2, flat).view(batch, heads, length, top_k, x.shape[-1])

    valid = hits.valid[:, None, None, :].expand(-1, heads, length, -1).gather(-1, best)
    return MemoryHits(keys=gather(hits.keys), values=gather(hits.values), valid=valid)


def _masked_scores(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    floor = min_score(scores.dtype)
    return scores.masked_fill(~mask, floor).clamp_min(floor)


def attend(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    hits: MemoryHits | None = None,
    *,
    top_k: int | None = None,
    use_sdpa: bool = False,
) -> torch.Tensor:
    """Attention of `queries` over local keys plus optional memory hits, with one softmax.

    Args:
        queries: (B, H, T, D), already rotated as the layer requires.
        keys, values: (B, H, S, D) local keys (rotated) and values.
        mask: (B, 1, T, S) boolean, True where a query may see a local key.
        hits: memory entries retrieved for these queries: shared by all queries (keys (B, H, M, D)) or
            per query (keys (B, H, T, K, D)); `hits.valid` marks entries that may receive attention.
        top_k: with shared hits, each query attends to only its `top_k` highest-scoring valid entries.
        use_sdpa: use the fused kernel where the key set is shared by several queries.

    Returns:
        (B, H, T, D) attention output, in the dtype of `queries`.
    """
    scale = math.sqrt(queries.shape[-1])
    shared = hits is None or hits.keys.dim() == 4
    # The fused kernel saves the (T x M) score matrix; for a single query there is none to save, and
    # concatenating the memory to the local keys would cost more than the plain product.
    if use_sdpa and shared and top_k is None and queries.shape[-2] > 1:
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

    if shared and top_k is not None and top_k < hits.keys.shape[-2]:
        hits, shared = _top_k_hits(queries, hits, top_k), False
    mem_keys = hits.keys.to(queries.dtype)
    mem_values = hits.values.to(values.dtype)
    if shared:
        mem_scores = torch.matmul(queries, mem_keys.transpose(-1, -2)).div_(scale)  # (B, H, T, M)
        mem_valid = hits.valid[:, None, None, :]
    else:
        mem_scores = torch.einsum("bhtd,bhtkd->bhtk", queries, mem_keys).div_(scale)  # (B, H, T, K)
        mem_valid = hits.valid
    if not bool(mem_valid.all()):
        mem_scores.masked_fill_(~mem_valid, min_score(mem_scores.dtype))
    # One float32 softmax over [local, memory], then one product with [local, memory] values: the
    # published implementation's exact operation order, so bfloat16-stored memory rounds identically.
    probs = torch.softmax(torch.cat([scores, mem_scores], dim=-1), dim=-1, dtype=torch.float32).to(queries.dtype)
    if shared:
        return torch.matmul(probs, torch.cat([values, mem_values], dim=-2))
    local_probs, mem_probs = probs.split([scores.shape[-1], mem_scores.shape[-1]], dim=-1)
    return torch.matmul(local_probs, values) + torch.einsum("bhtk,bhtkd->bhtd", mem_probs, mem_values)
