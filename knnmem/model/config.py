"""Configuration of LongLLaMA models: LLaMA fields plus the Focused-Transformer memory fields.

The field names and defaults are those of the published LongLLaMA checkpoints, so their `config.json`
files load unchanged (their `auto_map` entries are kept as data and never used).
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from .positions import POSITION_SCHEMES
from .rope import Rope, rope_from_config

MEM_DTYPES = ("float32", "bfloat16", "float16")


class LongLlamaConfig(PretrainedConfig):
    """Configuration of a LongLLaMA model.

    Memory fields (the rest are the usual LLaMA ones):
        max_position_embeddings: the context window W; long inputs are processed W tokens at a time.
        last_context_length: tokens at the end of a long input kept in the local cache instead of memory.
        mem_layers: indices of the layers that attend to memory.
        mem_positionals: whether memory layers use rotary embeddings at all.
        mem_dtype: dtype in which memory keys and values are stored.
        mem_attention_grouping: `(heads, queries)` processed at once in memory layers; bounds the size of
            the score matrix, never changes results.
        torch_attention: use `torch.nn.functional.scaled_dot_product_attention`; never changes results.
        gradient_checkpoint_every_ith: with gradient checkpointing on, checkpoint every i-th layer only.
        mem_position_scheme: how memory keys are position-encoded for scoring (see `positions.py`).
        mem_position_distance: with the `fixed_distance` scheme, the distance D every memory key is scored
            at (None: the window, as InfLLM does).
        rope_theta, rope_scaling: rotary embeddings; `rope_scaling` holds `rope_type` and that type's fields
            (every type of `rope.ROPE_TYPES`), as transformers spells them.
        rope_max_position_embeddings: the context length rope scaling refers to: the pretrained
            checkpoint's (None: `max_position_embeddings`, which here is the window).
        num_key_value_heads, head_dim, attention_bias, mlp_bias: LLaMA's grouped-query attention
            (memory holds one index per key/value head), explicit head size and projection biases.
    """

    model_type = "longllama"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_max_position_embeddings: int | None = None
    last_context_length: int = 1024
    mem_layers: list[int] | tuple[int, ...] = ()
    mem_positionals: bool = True
    mem_dtype: str = "bfloat16"
    mem_attention_grouping: list[int] | tuple[int, ...] | None = None
    torch_attention: bool = False
    gradient_checkpoint_every_ith: int = 1
    mem_position_scheme: str = "longllama"
    mem_position_distance: int | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}), or head_dim given"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
        self.validate_memory()

    def validate_memory(self) -> None:
        """Normalise the memory fields; raise `ValueError` naming the first one LongLLaMA cannot run with.

        Models call this again on construction, since `from_pretrained` overrides fields after `__init__`.
        """
        self.mem_layers = [int(i) for i in self.mem_layers]
        if self.mem_attention_grouping is not None:
            self.mem_attention_grouping = [int(i) for i in self.mem_attention_grouping]
        rope = self.rope  # raises for rope settings knnmem cannot honour exactly
        if rope.rotary_dim != self.head_dim:
            raise ValueError(f"partial_rotary_factor {rope.params['partial_rotary_factor']} is not supported: "
                             "LLaMA rotates whole heads")
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})"
            )
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.mem_position_scheme not in POSITION_SCHEMES:
            raise ValueError(f"mem_position_scheme {self.mem_position_scheme!r} is unknown: use one of "
                             f"{sorted(POSITION_SCHEMES)}")
        distance = self.mem_position_distance
        if distance is not None and (isinstance(distance, bool) or not isinstance(distance, int) or distance < 0):
            raise ValueError(f"mem_position_distance must be None or an integer >= 0, got {distance!r}")
        bad = [i for i in self.mem_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"mem_layers {bad} out of range: the model has {self.num_hidden_layers} layers "
                f"(valid indices 0..{self.num_hidden_layers - 1})"
            )
        if len(set(self.mem_layers)) != len(self.mem_layers):
            raise ValueError(f"mem_layers {self.mem_layers} contains duplicates")
        if self.max_position_embeddings < 1:
            raise ValueError(f"max_position_embeddings must be >= 1, got {self.max_position_embeddings}")
        check_last_context_length(self.last_context_length)
        if self.mem_dtype not in MEM_DTYPES:
            raise ValueError(f"mem_dtype must be one of {MEM_DTYPES}, got {self.mem_dtype!r}")
        grouping = self.mem_attention_grouping
        if grouping is not None and (len(grouping) != 2 or min(grouping) <= 0):
            raise ValueError(
                f"mem_attention_grouping must be None or two positive ints (heads, queries), got {grouping}"
            )
        if self.gradient_checkpoint_every_ith < 1:
            raise ValueError(f"gradient_checkpoint_every_ith must be >= 1, got {self.gradient_checkpoint_every_ith}")

    @property
    def rope(self) -> Rope:
        """The rotary embedding these fields describe (`ValueError` naming what cannot be honoured)."""
        return rope_from_config({
            "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling, "head_dim": self.head_dim,
            "max_position_embeddings": self.rope_max_position_embeddings or self.max_position_embeddings,
        })

    @property
    def memory_dtype(self) -> torch.dtype:
        return getattr(torch, self.mem_dtype)


def check_last_context_length(value) -> int:
    """Return `value` if it is a valid `last_context_length`, else raise `ValueError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"last_context_length must be an integer >= 1, got {value!r}")
    return value
