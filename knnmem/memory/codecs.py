"""How an entry store encodes the keys and values it holds: the seam where compression plugs in.

A codec turns model keys/values (B, H, T, D) into what the store keeps (B, H, T, W), and back.
Three kinds, named by a codec spec (see `make_codecs`):

- cast (`float32`, `bfloat16`, `float16`): the entries in a floating dtype; decoding is free.
- `int8`: scalar quantization with one scale per vector (token and head): D int8 codes plus a
  float16 scale, D + 2 bytes. Per-token scales beat per-channel ones on the shipped model's real
  queries, for keys and for values (benchmarks/int8_scales.py, table in the README).
- `pq<M>` or `pq<M>x<bits>`: product quantization of values (a Faiss `ProductQuantizer` per head:
  M sub-vectors of `bits` bits, default 8). It needs training, like an IVF index: until
  `train_size` valid entries exist, the store keeps values in its memory's dtype; then the
  codebooks are trained on them and every value is encoded. Keys are never product-quantized here:
  the index ranks by them, and an index holding PQ codes of keys is the way to compress those.
  Values its codes reconstruct worse than all but `RECONSTRUCTION_SHARE` of its training values
  are kept exactly beside the codes (`error_bound`; the entry store holds them).

Decoding returns the memory's dtype and happens only for the entries read (see `EntryStore.take`).
"""

from __future__ import annotations

import re
from typing import Protocol

import numpy as np
import torch

CAST_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Codes of one int8 vector end with its scale as float16; scales below float16's smallest normal
# number lose precision, and vectors that small quantize to zero anyway.
_MIN_SCALE = 2.0**-14

# Codes trained on what a memory mostly holds (repeated filler, plain prose) reconstruct what stands out of it (a pass
# key's digits) among the worst few hundred of 65k entries, and what is reconstructed that badly is lost: the share
# of training vectors coded worst sets the error beyond which vectors are kept exactly (values here, keys in IVF-PQ
# indexes without stored keys).
RECONSTRUCTION_SHARE = 0.001


class Codec(Protocol):
    name: str  # its spec, as recorded in a store's manifest
    dtype: torch.dtype  # of the encoded arrays
    out_dtype: torch.dtype  # of decoded vectors
    # (H,) float32: a vector whose squared code error exceeds its head's is kept exactly beside its code (the entry
    # store raises it past the vectors it lets go); None for codecs that keep none
    error_bound: torch.Tensor | None
    train_size: int  # valid entries needed before `train`; 0 for codecs that need none

    @property
    def trained(self) -> bool:
        """Whether `encode` produces final codes (untrained codecs store entries cast to the memory's dtype)."""

    def width(self, head_dim: int) -> int:
        """Length of the encoded last axis."""

    def train(self, x: torch.Tensor) -> None:
        """Fit the codec's parameters on vectors (H, N, D) of every head."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Model tensors (B, H, T, D) as stored (B, H, T, W)."""

    def decode(self, stored: torch.Tensor, heads: slice = slice(None)) -> torch.Tensor:
        """Stored tensors (B, h, N, W) of heads `heads` back as model tensors (B, h, N, D)."""

    def coding_errors(self, x: torch.Tensor, stored: torch.Tensor, heads: slice = slice(None)) -> torch.Tensor:
        """(B, h, T) float32 squared distances from `x` (B, h, T, D) of `heads` to what their codes `stored` decode to
        (for codecs with an `error_bound`)."""

    def state(self) -> dict[str, torch.Tensor]:
        """Trained parameters, named, for persistence ({} when there are none)."""

    def load_state(self, arrays: dict[str, torch.Tensor]) -> None:
        """Adopt what `state` returned; `ValueError` saying what does not fit."""


class CastCodec:
    """Stores keys and values in a floating dtype (float32, bfloat16 or float16); decoding is free."""

    train_size = 0
    trained = True
    error_bound = None  # rounding to a dtype or to int8 with a scale per vector spares no vector in particular

    def __init__(self, dtype: torch.dtype):
        if dtype not in CAST_DTYPES.values():
            raise ValueError(f"no codec stores entries as {dtype}: use float32, bfloat16 or float16")
        self.dtype = self.out_dtype = dtype
        self.name = str(dtype).removeprefix("torch.")

    def width(self, head_dim: int) -> int:
        return head_dim

    def train(self, x: torch.Tensor) -> None:
        pass

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)

    def decode(self, stored: torch.Tensor, heads: slice = slice(None)) -> torch.Tensor:
        return stored

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, arrays: dict[str, torch.Tensor]) -> None:
        if arrays:
            raise ValueError(f"codec {self.name} has no parameters, got {sorted(arrays)}")


class Int8Codec(CastCodec):
    """int8 codes with one float16 scale per vector (absmax / 127); decodes to `out_dtype`."""

    name, dtype = "int8", torch.int8

    def __init__(self, out_dtype: torch.dtype):
        self.out_dtype = out_dtype

    def width(self, head_dim: int) -> int:
        return head_dim + 2  # the scale's two bytes

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float()
        scale = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(_MIN_SCALE).half()  # (..., 1)
        codes = (x / scale.float()).round().clamp(-127, 127).to(torch.int8)
        return torch.cat([codes, scale.view(torch.int8)], dim=-1)  # (..., D + 2)

    def decode(self, stored: torch.Tensor, heads: slice = slice(None)) -> torch.Tensor:
        scale = stored[..., -2:].contiguous().view(torch.float16)  # (..., 1)
        return (stored[..., :-2].float() * scale.float()).to(self.out_dtype)


class ProductCodec:
    """Product quantization of values: per head, M sub-vectors of `bits` bits (Faiss `ProductQuantizer`).

    Codes are uint8, one per sub-vector: fewer bits only make the codebook smaller and quicker to train
    (and the training threshold, 39 entries per centroid, lower), not the codes. Decoding gathers centroids in torch, on the
    device of the codes, so only the entries read are decoded and nothing leaves the GPU.
    """

    def __init__(self, *, subvectors: int, bits: int, num_heads: int, head_dim: int, out_dtype: torch.dtype):
        if subvectors < 1 or head_dim % subvectors:
            raise ValueError(f"pq{subvectors}: the head dimension {head_dim} is not a multiple of {subvectors} sub-vectors")
        if not 1 <= bits <= 8:
            raise ValueError(f"pq{subvectors}x{bits}: bits per sub-vector must be 1-8")
        self.subvectors, self.bits, self.num_heads, self.head_dim = subvectors, bits, num_heads, head_dim
        self.out_dtype = out_dtype
        self.name = f"pq{subvectors}" + (f"x{bits}" if bits != 8 else "")
        self.train_size = 39 * 2**bits  # Faiss's advice for k-means, as for IVF lists
        self._fallback = CastCodec(out_dtype)
        self._centroids: torch.Tensor | None = None  # (H, M, 2**bits, D / M) float32
        self.error_bound: torch.Tensor | None = None  # set when trained (stores written before it have none)
        self._on_device: dict[torch.device, torch.Tensor] = {}  # the centroids where codes are decoded

    @property
    def trained(self) -> bool:
        return self._centroids is not None

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8 if self.trained else self._fallback.dtype

    def width(self, head_dim: int) -> int:
        return self.subvectors if self.trained else head_dim

    def _quantizer(self, head: int):
        import faiss

        pq = faiss.ProductQuantizer(self.head_dim, self.subvectors, self.bits)
        if self.trained:
            faiss.copy_array_to_vector(self._centroids[head].reshape(-1).numpy(), pq.centroids)
        return pq

    def train(self, x: torch.Tensor) -> None:
        if x.shape[1] < 2**self.bits:
            raise ValueError(f"{self.name} needs at least {2**self.bits} entries to train, got {x.shape[1]}")
        import faiss

        centroids = []
        for h in range(self.num_heads):
            pq = self._quantizer(h)
            pq.train(x[h].detach().float().cpu().contiguous().numpy())
            centroids.append(torch.from_numpy(faiss.vector_to_array(pq.centroids)))
        shape = (self.num_heads, self.subvectors, 2**self.bits, self.head_dim // self.subvectors)
        self._centroids = torch.stack(centroids).view(shape)
        self._on_device = {}
        errors = self.coding_errors(x[None], self.encode(x[None]))[0]  # (H, N)
        self.error_bound = torch.from_numpy(np.quantile(errors.cpu().numpy(), 1 - RECONSTRUCTION_SHARE, axis=1)).float()

    def coding_errors(self, x: torch.Tensor, stored: torch.Tensor, heads: slice = slice(None)) -> torch.Tensor:
        return (self._reconstruct(stored, heads) - x.detach().to(stored.device).float()).square().sum(-1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if not self.trained:
            return self._fallback.encode(x)
        flat = x.detach().float().cpu()
        codes = torch.empty(x.shape[:-1] + (self.subvectors,), dtype=torch.uint8)
        for h in range(self.num_heads):
            vectors = flat[:, h].reshape(-1, self.head_dim).contiguous().numpy()
            packed = self._quantizer(h).compute_codes(vectors)  # (n, ceil(M * bits / 8)), bits packed LSB first
            bits = np.unpackbits(packed, axis=1, bitorder="little")[:, : self.subvectors * self.bits]
            unpacked = bits.reshape(-1, self.subvectors, self.bits) @ (1 << np.arange(self.bits))  # (n, M)
            codes[:, h] = torch.from_numpy(unpacked.astype(np.uint8)).view(codes[:, h].shape)
        return codes.to(x.device)

    def decode(self, stored: torch.Tensor, heads: slice = slice(None)) -> torch.Tensor:
        if not self.trained:
            return self._fallback.decode(stored)
        return self._reconstruct(stored, heads).to(self.out_dtype)

    def _reconstruct(self, stored: torch.Tensor, heads: slice = slice(None)) -> torch.Tensor:
        """Codes (B, h, N, M) of heads `heads` decoded to float32 vectors (B, h, N, D)."""
        centroids = self._on_device.get(stored.device)
        if centroids is None:
            centroids = self._on_device[stored.device] = self._centroids.to(stored.device)
        centroids = centroids[heads]  # (h, M, C, D / M)
        batch, num_heads, count, m = stored.shape
        codes = stored.long().permute(1, 3, 0, 2).reshape(num_heads, m, batch * count, 1)  # (h, M, B*N, 1)
        picked = centroids.gather(2, codes.expand(-1, -1, -1, centroids.shape[-1]))  # (h, M, B*N, D / M)
        picked = picked.view(num_heads, m, batch, count, -1).permute(2, 0, 3, 1, 4)  # (B, h, N, M, D / M)
        return picked.reshape(batch, num_heads, count, self.head_dim)

    def state(self) -> dict[str, torch.Tensor]:
        if not self.trained:
            return {}
        bound = {"error_bound": self.error_bound} if self.error_bound is not None else {}
        return {"codebook": self._centroids, **bound}

    def load_state(self, arrays: dict[str, torch.Tensor]) -> None:
        # stores written before values were kept exactly have a codebook only
        if set(arrays) not in ({"codebook"}, {"codebook", "error_bound"}):
            raise ValueError(f"codec {self.name} needs a codebook (and an error bound), "
                             f"got {sorted(arrays) or 'nothing'}")
        shape = (self.num_heads, self.subvectors, 2**self.bits, self.head_dim // self.subvectors)
        codebook = arrays["codebook"]
        if tuple(codebook.shape) != shape or codebook.dtype != torch.float32:
            raise ValueError(f"the {self.name} codebook is {tuple(codebook.shape)} {codebook.dtype}, expected "
                             f"{shape} float32 (heads, sub-vectors, centroids, sub-dimension): not this codec's")
        if not torch.isfinite(codebook).all():
            raise ValueError(f"the {self.name} codebook holds non-finite numbers (corrupted)")
        bound = arrays.get("error_bound")
        if bound is not None and (bound.shape != (self.num_heads,) or not (bound.isfinite() & (bound >= 0)).all()):
            raise ValueError(f"the {self.name} error bound must be {self.num_heads} finite non-negative float32 "
                             f"numbers (one a head), got {tuple(bound.shape)} numbers or non-finite or negative ones "
                             "(corrupted)")
        self._centroids, self.error_bound = codebook.contiguous(), bound
        self._on_device = {}


_PQ = re.compile(r"pq(\d+)(?:x(\d+))?")


def _make_codec(name: str, *, num_heads: int, head_dim: int, dtype: torch.dtype):
    if name in CAST_DTYPES:
        return CastCodec(CAST_DTYPES[name])
    if name == "int8":
        return Int8Codec(dtype)
    match = _PQ.fullmatch(name)
    if match:
        return ProductCodec(subvectors=int(match[1]), bits=int(match[2] or 8), num_heads=num_heads,
                            head_dim=head_dim, out_dtype=dtype)
    raise ValueError(f"unknown codec {name!r}: use float32, bfloat16, float16, int8 or pq<M>[x<bits>] (values only)")


def make_codecs(spec: str | None, *, num_heads: int, head_dim: int, dtype: torch.dtype):
    """(key codec, value codec) for `spec`: None (the cast codec of `dtype`), one codec name for both
    ("int8", "bfloat16"), or "KEYS/VALUES" ("int8/pq8"). Decoded entries are in `dtype`.

    Raises:
        ValueError: an unknown name, product quantization asked of keys, or a PQ shape that does not fit.
    """
    if spec is None:
        return CastCodec(dtype), CastCodec(dtype)
    if not isinstance(spec, str) or spec.count("/") > 1:
        raise ValueError(f"codec spec must be a codec name or KEYS/VALUES, got {spec!r}")
    key_name, _, value_name = spec.partition("/")
    if _PQ.fullmatch(key_name):
        raise ValueError(f"codec {spec!r}: keys are ranked by the index and cannot be product-quantized here; "
                         f"give keys another codec, e.g. int8/{key_name} (or an index holding PQ codes)")
    options = dict(num_heads=num_heads, head_dim=head_dim, dtype=dtype)
    return _make_codec(key_name, **options), _make_codec(value_name or key_name, **options)


def codec_spec(keys: Codec, values: Codec) -> str:
    """The spec `make_codecs` reads back as these codecs."""
    return keys.name if keys.name == values.name else f"{keys.name}/{values.name}"
