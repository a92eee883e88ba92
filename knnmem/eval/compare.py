"""Exact dense memory against approximate indexes on the same input.

For each (index spec, k) the model reads the same text with a memory of that spec (optionally
pre-filled with a stored corpus) and is compared with the exact dense run on the tokens that had
memory to read: retrieval recall@k and softmax mass on the model's real queries, relative error of
the memory layers' outputs, next-token agreement and KL, perplexity, throughput and memory bytes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..memory import BACKENDS, DEFAULT_K, Memory
from ..plotting import pyplot
from .quality import RetrievalProbe


@dataclass
class Comparison:
    index: str
    codec: str
    k: int | None
    recall: float
    mass_captured: float
    output_rel_error: float  # ||memory-layer output - dense|| / ||dense||
    top1_agreement: float
    kl: float  # mean KL(dense || this) of next-token distributions, nats
    perplexity: float
    tokens_per_s: float
    memory_bytes: int
    bytes_per_entry: float


@torch.no_grad()
def _run(model, ids: torch.Tensor, memory: Memory, start: int):
    """Logits and memory-layer attention outputs of positions >= start; seconds taken."""
    outputs: list[torch.Tensor] = []
    hooks = [model.model.layers[i].self_attn.register_forward_hook(lambda _m, _a, out: outputs.append(out[0]))
             for i in model.config.mem_layers]
    try:
        began = time.perf_counter()
        logits = model(input_ids=ids, memory=memory, use_cache=False).logits[0].float()
        seconds = time.perf_counter() - began
    finally:
        for hook in hooks:
            hook.remove()
    per_layer = len(model.config.mem_layers)
    layer_out = [torch.cat(outputs[i::per_layer], dim=1)[0, start:].float() for i in range(per_layer)]
    return logits[start:], torch.cat(layer_out, dim=-1), seconds


def compare_memories(model, input_ids: torch.Tensor, specs: list[str], *, ks: list[int] = (DEFAULT_K,),
                     base: Memory | None = None, search_params: dict | None = None,
                     codecs: list[str | None] = (None,), keep_keys: bool = True) -> list[Comparison]:
    """Compare each index spec (at each codec and k) with the exact dense memory on `input_ids` (1, L).

    Args:
        base: a memory (e.g. a loaded store) whose entries every memory starts with.
        search_params: Faiss search knobs (nprobe, efSearch, ...) applied to every spec that has them.
        codecs: how each compared memory stores its entries (None: the model's memory dtype). The retrieval
            (recall, mass) of a memory with a codec or without stored keys is judged by an uncompressed copy of
            its entries, written beside it.
        keep_keys: whether Faiss memories keep full keys beside their index.

    Returns:
        One `Comparison` per (spec, codec, k), the dense reference first.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must have shape (1, L), got {tuple(input_ids.shape)}")
    input_ids = input_ids.to(model.device)
    start = min(model.config.max_position_embeddings, input_ids.shape[1] - 1) if base is None else 0
    labels = input_ids[0, start + 1:]

    def build(spec: str, k: int, codec: str | None = None):
        kept = {} if keep_keys or spec in BACKENDS else {"keep_keys": False}  # exact backends need keys
        memory = Memory.create(model, index=spec, k=k, codec=codec, **kept)
        reference = None
        if codec is not None or kept:
            reference = Memory.create(model)
            memory.add_observers.append(reference.add)
        if search_params and memory.search_params():  # the knobs apply to indexes that have any
            memory.set_search_params(**search_params)
        if base is not None:
            memory.extend(base)
        return memory, RetrievalProbe(memory, reference=reference)

    def row(spec, k, built, logits, outputs, seconds, reference) -> Comparison:
        memory, probe = built
        ref_logits, ref_outputs = reference
        log_probs, ref_log_probs = logits.log_softmax(-1), ref_logits.log_softmax(-1)
        nll = -log_probs[:-1].gather(-1, labels[:, None]).mean() if len(labels) else torch.tensor(float("nan"))
        quality = probe.quality()
        return Comparison(
            index=spec, codec=memory.codec, k=k, recall=quality.recall, mass_captured=quality.mass_captured,
            output_rel_error=float((outputs - ref_outputs).norm() / ref_outputs.norm().clamp_min(1e-12)),
            top1_agreement=float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
            kl=float((ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1).mean()),
            perplexity=float(nll.exp()), tokens_per_s=input_ids.shape[1] / seconds,
            memory_bytes=memory.nbytes, bytes_per_entry=memory.nbytes / max(len(memory), 1),
        )

    dense = build("dense", DEFAULT_K)
    logits, outputs, seconds = _run(model, input_ids, dense[0], start)
    reference = (logits, outputs)
    results = [row("dense", None, dense, logits, outputs, seconds, reference)]
    for spec in specs:
        for codec in codecs:
            for k in ks:
                built = build(spec, k, codec)
                logits, outputs, seconds = _run(model, input_ids, built[0], start)
                results.append(row(spec, k, built, logits, outputs, seconds, reference))
    return results


def markdown_table(rows: list[Comparison]) -> str:
    lines = [
        "| index | codec | k | recall@k | mass captured | output rel. error | top-1 agreement | KL (nats) | perplexity "
        "| tokens/s | memory MiB | bytes/entry |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.index} | {r.codec} | {r.k or 'all'} | {r.recall:.3f} | {r.mass_captured:.3f} | {r.output_rel_error:.4f} "
            f"| {r.top1_agreement:.3f} | {r.kl:.4f} | {r.perplexity:.2f} | {r.tokens_per_s:,.0f} "
            f"| {r.memory_bytes / 2**20:.1f} | {r.bytes_per_entry:,.0f} |"
        )
    return "\n".join(lines)


def write_report(rows: list[Comparison], directory: str | Path) -> list[Path]:
    """`comparison.json`, `recall_vs_speed.png` and `error_vs_k.png` in `directory`."""
    plt = pyplot()

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "comparison.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r.tokens_per_s, r.recall)
        ax.annotate(f"{r.index} {r.codec} k={r.k or 'all'}", (r.tokens_per_s, r.recall), fontsize=7)
    ax.set(xlabel="tokens/s (reading the input)", ylabel="recall@k", title="Recall against speed")
    fig.tight_layout()
    fig.savefig(directory / "recall_vs_speed.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for spec, codec in dict.fromkeys((r.index, r.codec) for r in rows if r.k):
        points = sorted((r.k, r.output_rel_error) for r in rows if (r.index, r.codec) == (spec, codec))
        ax.plot(*zip(*points), marker="o", label=f"{spec} {codec}")
    ax.set(xlabel="k", ylabel="relative error of memory-layer outputs", title="Error against k", xscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "error_vs_k.png", dpi=110)
    plt.close(fig)
    return [directory / name for name in ("comparison.json", "recall_vs_speed.png", "error_vs_k.png")]
