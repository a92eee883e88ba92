"""Position schemes: how memory keys and the queries that score them are position-encoded.

Local attention always uses rotary embeddings relative to the start of the local span. Memory keys
are stored unrotated (as if at position 0, independent of where they were read: what makes an index
over them meaningful), and a scheme says which queries score them:

- `longllama`: the queries as rotated for local attention (the Focused Transformer's choice, so the
  one FoT-trained checkpoints expect).

A scheme is a function (raw queries, locally rotated queries, rotate) -> memory queries, where
`rotate(x, positions)` applies the layer's rotary embedding; add one here and name it in the config.
"""

from __future__ import annotations

from typing import Callable

import torch

Rotate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PositionScheme = Callable[[torch.Tensor, torch.Tensor, Rotate], torch.Tensor]


def longllama(raw: torch.Tensor, rotated: torch.Tensor, rotate: Rotate) -> torch.Tensor:
    """Memory is scored by the local queries themselves (rotated at their local positions)."""
    return rotated


POSITION_SCHEMES: dict[str, PositionScheme] = {"longllama": longllama}
