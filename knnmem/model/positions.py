"""Position schemes: how memory keys and the queries that score them are position-encoded.

Local attention always uses rotary embeddings relative to the start of the local span. Memory keys
are stored unrotated (as if at position 0, independent of where they were read: what makes an index
over them meaningful), and a scheme says which queries score them:

- `longllama`: the queries as rotated for local attention (the Focused Transformer's choice, so the
  one FoT-trained checkpoints expect).
- `fixed_distance`: every memory key is scored as if it stood `mem_position_distance` (D) tokens before
  the query, whatever their real distance: for RoPE, the raw query rotated by D (InfLLM's choice, with
  D the local window), for models not trained with FoT.

A scheme is a function (raw queries, locally rotated queries, rotate, D) -> memory queries, where
`rotate(x, positions)` applies the layer's rotary embedding; add one here and name it in the config.
"""

from __future__ import annotations

from typing import Callable

import torch

Rotate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PositionScheme = Callable[[torch.Tensor, torch.Tensor, Rotate, int], torch.Tensor]


def longllama(raw: torch.Tensor, rotated: torch.Tensor, rotate: Rotate, distance: int) -> torch.Tensor:
    """Memory is scored by the local queries themselves (rotated at their local positions)."""
    return rotated


def fixed_distance(raw: torch.Tensor, rotated: torch.Tensor, rotate: Rotate, distance: int) -> torch.Tensor:
    """Memory is scored by the raw queries (B, H, T, D) rotated by `distance`: q(D)·k(0), RoPE's score at distance D."""
    positions = torch.full((raw.shape[0], raw.shape[2]), distance, dtype=torch.long, device=raw.device)  # (B, T)
    return rotate(raw, positions)


POSITION_SCHEMES: dict[str, PositionScheme] = {"longllama": longllama, "fixed_distance": fixed_distance}
