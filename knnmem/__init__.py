"""knnmem: retrieval-backed memory for Focused-Transformer (LongLLaMA) models."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import LongLlamaCache
from .config import LongLlamaConfig
from .memory import BACKENDS, DenseMemory, Memory, MemoryHits
from .modeling import LongLlamaForCausalLM, LongLlamaModel

__version__ = "0.1.0"

AutoConfig.register(LongLlamaConfig.model_type, LongLlamaConfig, exist_ok=True)
AutoModel.register(LongLlamaConfig, LongLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(LongLlamaConfig, LongLlamaForCausalLM, exist_ok=True)

__all__ = [
    "BACKENDS",
    "DenseMemory",
    "LongLlamaCache",
    "LongLlamaConfig",
    "LongLlamaForCausalLM",
    "LongLlamaModel",
    "Memory",
    "MemoryHits",
]
