"""Shared by the benchmark scripts: the model they run, the text they read, and process memory."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

import knnmem


def demo_model(seed: int = 0, **overrides) -> knnmem.LongLlamaForCausalLM:
    """A small LongLLaMA with random weights (std 0.1, so attention is far from uniform), fused attention."""
    fields = dict(
        vocab_size=260, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        max_position_embeddings=256, last_context_length=256, mem_layers=[1, 2], mem_dtype="bfloat16",
        initializer_range=0.1, torch_attention=True,  # the fused kernel is dense memory's fastest path
    )
    torch.manual_seed(seed)
    return knnmem.LongLlamaForCausalLM(knnmem.LongLlamaConfig(**{**fields, **overrides})).eval()


def stdlib_documents(total_tokens: int, doc_tokens: int = 4096) -> list[list[int]]:
    """Byte tokens (+1, 0 is padding) of standard-library sources, cut into documents."""
    docs, remaining = [], total_tokens
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        data = path.read_bytes()
        for start in range(0, len(data), doc_tokens):
            piece = [b + 1 for b in data[start : start + min(doc_tokens, remaining)]]
            if len(piece) >= 64:
                docs.append(piece)
                remaining -= len(piece)
            if remaining <= 0:
                return docs
    raise ValueError(f"the standard library holds fewer than {total_tokens} tokens")


def rss_bytes() -> int:
    """Resident memory of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
