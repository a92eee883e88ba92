"""The local cache of generation: the last tokens' keys and values in every layer, plus the memory.

LongLLaMA keeps at most one context window of recent tokens per layer in this cache. When new
tokens would make it exceed the window, the model empties it into memory first (see
`LongLlamaModel.forward`); this class only stores and reorders.
"""

from __future__ import annotations

import torch

from ..memory.manager import Memory


class LongLlamaCache:
    """Keys/values (unrotated) of recent tokens per layer with their absolute positions and padding flags.

    Returned as `cache` by the model and passed back by `generate`. It also carries the
    `Memory` those tokens overflow into, so a generation keeps one memory from prompt to last token.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, memory: Memory, num_layers: int):
        self.memory = memory
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # each (B, H, S, D)
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.positions: torch.Tensor | None = None  # (B, S) absolute
        self.valid: torch.Tensor | None = None  # (B, S) bool
        self.next_position: torch.Tensor | None = None  # (B,) first position of the next token
        self.seen_tokens = 0

    def __len__(self) -> int:
        return 0 if self.positions is None else self.positions.shape[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far, including those moved to memory (what `generate` slices inputs by)."""
        return self.seen_tokens

    def layer(self, idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(keys, values, positions, valid) of layer `idx`, or None while empty."""
        if not len(self):
            return None
        return self.keys[idx], self.values[idx], self.positions, self.valid

    def append(self, new_kv: list[tuple[torch.Tensor, torch.Tensor]], positions: torch.Tensor, valid: torch.Tensor):
        """Add one chunk: per-layer keys/values (B, H, T, D), positions and valid (B, T)."""
        for idx, (k, v) in enumerate(new_kv):
            self.keys[idx] = k if self.keys[idx] is None else torch.cat([self.keys[idx], k], dim=2)
            self.values[idx] = v if self.values[idx] is None else torch.cat([self.values[idx], v], dim=2)
        self.positions = positions if self.positions is None else torch.cat([self.positions, positions], dim=1)
        self.valid = valid if self.valid is None else torch.cat([self.valid, valid], dim=1)
        self.next_position = positions[:, -1] + 1

    def clear(self) -> None:
        """Drop every local entry (positions keep counting from `next_position`)."""
        self.keys = [None] * len(self.keys)
        self.values = [None] * len(self.values)
        self.positions = self.valid = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep batch rows `beam_idx` in cache and memory (beam search)."""
        for idx, k in enumerate(self.keys):
            if k is not None:
                self.keys[idx] = k[beam_idx.to(k.device)]
                self.values[idx] = self.values[idx][beam_idx.to(k.device)]
        for name in ("positions", "valid", "next_position"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor[beam_idx.to(tensor.device)])
        self.memory.reorder_rows(beam_idx)
