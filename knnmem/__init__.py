"""knnmem: retrieval-backed memory for Focused-Transformer (LongLLaMA) models."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import LongLlamaCache
from .config import LongLlamaConfig
from .backends import DenseMemory, MemoryHits, TorchTopKMemory
from .faiss_memory import FaissMemory
from .corpus import read_corpus
from .ingest import Document, encode_documents
from .store import StoreError
from .memory import BACKENDS, Memory, index_corpus
from .modeling import LongLlamaForCausalLM, LongLlamaModel, load_pretrained
from .quality import ProbedMemory, RetrievalQuality, retrieval_quality

__version__ = "0.1.0"

AutoConfig.register(LongLlamaConfig.model_type, LongLlamaConfig, exist_ok=True)
AutoModel.register(LongLlamaConfig, LongLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(LongLlamaConfig, LongLlamaForCausalLM, exist_ok=True)

__all__ = [
    "BACKENDS",
    "DenseMemory",
    "Document",
    "FaissMemory",
    "LongLlamaCache",
    "LongLlamaConfig",
    "LongLlamaForCausalLM",
    "LongLlamaModel",
    "Memory",
    "MemoryHits",
    "ProbedMemory",
    "RetrievalQuality",
    "StoreError",
    "TorchTopKMemory",
    "encode_documents",
    "index_corpus",
    "load_pretrained",
    "read_corpus",
    "retrieval_quality",
]
