"""How an entry store encodes the keys and values it holds: the seam where compression plugs in.

A codec turns model keys/values (B, H, T, D) into what the store keeps, and back. Today's codecs
only cast to a storage dtype; a codec that compresses (int8, product quantization) implements the
same three methods and nothing else in attention or the indexes changes.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Codec(Protocol):
    name: str
    dtype: torch.dtype  # of the encoded arrays

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Model tensors (..., D) as stored."""

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored tensors back as model tensors (..., D); a view where the codec allows."""


class CastCodec:
    """Stores keys and values in a floating dtype (float32, bfloat16 or float16); decoding is free."""

    def __init__(self, dtype: torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"no codec stores entries as {dtype}: use float32, bfloat16 or float16")
        self.dtype = dtype
        self.name = str(dtype).removeprefix("torch.")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        return stored
