"""Which int8 scales suit memory keys and values: one per vector (token) or one per channel.

The shipped model encodes 64k tokens of standard-library sources into a dense memory; the real queries
of a held-out window then attend to all of it (layer by layer, exact softmax) with keys or values
quantized each way. Prints the relative error of the attention output and recall@128 of top-k by the
quantized keys, beside bfloat16 and product-quantized values for scale.

    python benchmarks/int8_scales.py
"""

from __future__ import annotations

import faiss
import numpy as np
import torch
from common import SHIPPED_MODEL, stdlib_documents

import knnmem


def per_token(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return (x / scale).round().clamp(-127, 127) * scale


def per_channel(x: torch.Tensor) -> torch.Tensor:  # (H, M, D): one scale per head and channel, over all tokens
    scale = x.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    return (x / scale).round().clamp(-127, 127) * scale


def attend(queries, keys, values):
    return torch.softmax(queries @ keys.transpose(-1, -2) / keys.shape[-1] ** 0.5, -1) @ values


def recall(queries, keys, approximate, k=128) -> float:
    exact, found = ((queries @ x.transpose(-1, -2)).topk(k, -1).indices for x in (keys, approximate))
    return float(np.mean([len(set(exact[h, t].tolist()) & set(found[h, t].tolist())) / k
                          for h in range(exact.shape[0]) for t in range(0, exact.shape[1], 8)]))


def product_quantized(values: torch.Tensor, subvectors: int) -> torch.Tensor:
    out = []
    for head in values:
        pq = faiss.ProductQuantizer(values.shape[-1], subvectors, 8)
        x = np.ascontiguousarray(head.numpy())
        pq.train(x)
        out.append(torch.from_numpy(pq.decode(pq.compute_codes(x))))
    return torch.stack(out)


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    model, tokenizer = knnmem.load_pretrained(SHIPPED_MODEL, "cpu")
    memory = knnmem.Memory.create(model)
    knnmem.encode_documents(model, stdlib_documents(tokenizer, 1 << 16), memory, progress=False)
    layer = model.config.mem_layers[0]
    keys, values = memory.entries(layer).keys()[0].float(), memory.entries(layer).values()[0].float()  # (H, M, D)
    probe = knnmem.Memory.create(model).extend(memory)
    seen = []
    probe.observers.append(lambda _layer, queries, _heads, _hits: seen.append(queries[0].float()))
    window = torch.tensor([stdlib_documents(tokenizer, 4096 * 4, 4096)[-1][:256]])
    model(window, memory=probe, use_cache=True, last_context_length=256)
    queries = seen[0]  # (H, T, D)
    reference = attend(queries, keys, values)

    def error(out):
        return float((out - reference).norm() / reference.norm())

    print("| quantized | scales | output rel. error | recall@128 |\n|---|---|---|---|")
    for name, quantize in (("per token", per_token), ("per channel", per_channel)):
        print(f"| keys | {name} | {error(attend(queries, quantize(keys), values)):.5f} | {recall(queries, keys, quantize(keys)):.3f} |")
    for name, quantize in (("per token", per_token), ("per channel", per_channel)):
        print(f"| values | {name} | {error(attend(queries, keys, quantize(values))):.5f} | |")
    bf16 = lambda x: x.bfloat16().float()  # noqa: E731
    print(f"| both, bfloat16 | | {error(attend(queries, bf16(keys), bf16(values))):.5f} | {recall(queries, keys, bf16(keys)):.3f} |")
    for subvectors in (8, 16):
        print(f"| values, pq{subvectors} | | {error(attend(queries, keys, product_quantized(values, subvectors))):.5f} | |")


if __name__ == "__main__":
    main()
