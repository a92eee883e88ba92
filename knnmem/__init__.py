"""knnmem: retrieval-backed memory for Focused-Transformer (LongLLaMA) models.

Packages, in dependency order: `memory` (entry stores, backends, the manager), `model` (LongLLaMA,
which reads and writes a memory), `store` (memories on disk), `ingest` (corpora into memory),
`eval` and `train`; `cli` maps commands onto them.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .eval.quality import RetrievalProbe, RetrievalQuality, retrieval_quality
from .ingest import add_documents, encode_documents, index_corpus, read_corpus
from .memory import BACKENDS, CrossBatchMemory, DenseBackend, Document, EntryStore, Memory, MemoryHits, TorchTopKBackend
from .memory.faiss_index import FaissBackend
from .model import LongLlamaCache, LongLlamaConfig, LongLlamaForCausalLM, LongLlamaModel, load_pretrained
from .store import StoreError

__version__ = "0.1.0"

AutoConfig.register(LongLlamaConfig.model_type, LongLlamaConfig, exist_ok=True)
AutoModel.register(LongLlamaConfig, LongLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(LongLlamaConfig, LongLlamaForCausalLM, exist_ok=True)

__all__ = [
    "BACKENDS",
    "CrossBatchMemory",
    "DenseBackend",
    "Document",
    "EntryStore",
    "FaissBackend",
    "LongLlamaCache",
    "LongLlamaConfig",
    "LongLlamaForCausalLM",
    "LongLlamaModel",
    "Memory",
    "MemoryHits",
    "RetrievalProbe",
    "RetrievalQuality",
    "StoreError",
    "TorchTopKBackend",
    "add_documents",
    "encode_documents",
    "index_corpus",
    "load_pretrained",
    "read_corpus",
    "retrieval_quality",
]
