"""LongLLaMA in PyTorch: config, modeling, attention maths, cache, position schemes, checkpoint adapters.

This package depends on `knnmem.memory` (the memory it reads and writes) and on nothing of Faiss,
the store, ingestion, training or evaluation.
"""

from .adapters import FAMILIES, load_pretrained, pick_device, read_checkpoint_config, resolve_checkpoint
from .cache import LongLlamaCache
from .config import LongLlamaConfig
from .modeling import LongLlamaForCausalLM, LongLlamaModel
from .positions import POSITION_SCHEMES

__all__ = [
    "FAMILIES", "POSITION_SCHEMES", "LongLlamaCache", "LongLlamaConfig", "LongLlamaForCausalLM", "LongLlamaModel",
    "load_pretrained", "pick_device", "read_checkpoint_config", "resolve_checkpoint",
]
