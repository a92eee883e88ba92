"""Checkpoint families: how a checkpoint's `config.json` becomes a LongLLaMA config, exactly or not at all.

`FAMILIES` maps a checkpoint's `model_type` to a function that turns its config dict into the fields
of a `LongLlamaConfig`. Every field the family understands is honoured; a value knnmem cannot run
is refused by name, never dropped. Add a family here to load another LLaMA-like architecture.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from .config import LongLlamaConfig
from .rope import rope_from_config

# Fields of a saved config that describe the file, not the model.
_BOOKKEEPING = ("architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "model_type",
                "_name_or_path", "use_cache")


def _longllama(fields: dict) -> dict:
    return fields


# What a LLaMA config says, each honoured by a LongLLaMA field of the same name (rope settings aside).
_LLAMA_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_bias", "mlp_bias",
}
# Generic fields of every transformers config, and LLaMA's fields that do not change what the model computes.
_NEUTRAL = {"id2label", "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "return_dict",
            "output_attentions", "output_hidden_states", "attention_dropout", "pretraining_tp"}


def _llama(fields: dict) -> dict:
    """A `transformers` LLaMA config: LongLLaMA without memory layers, the same weights and positions."""
    unknown = sorted(set(fields) - _LLAMA_FIELDS - _NEUTRAL - {"rope_parameters", "rope_scaling", "rope_theta",
                                                               "partial_rotary_factor"})
    if unknown:
        raise ValueError(f"LLaMA config fields {unknown} are not supported (knnmem would ignore them)")
    if fields.get("pretraining_tp", 1) not in (1, None):
        raise ValueError("pretraining_tp > 1 is not supported: save the checkpoint with pretraining_tp=1")
    rope = rope_from_config(fields)  # raises for rope settings it cannot honour exactly
    out = {name: fields[name] for name in _LLAMA_FIELDS if name in fields}
    scaling = None if rope.rope_type == "default" and not rope.params else {"rope_type": rope.rope_type, **rope.params}
    out.update(rope_theta=rope.theta, rope_scaling=scaling,
               rope_max_position_embeddings=fields.get("max_position_embeddings"))
    return out


FAMILIES: dict[str, Callable[[dict], dict]] = {"longllama": _longllama, "llama": _llama}


def read_checkpoint_config(path: str | Path, **overrides) -> LongLlamaConfig:
    """The LongLLaMA config of the checkpoint directory `path`, with `overrides` (e.g. `mem_layers`) applied.

    Raises:
        FileNotFoundError: `path` holds no `config.json`.
        ValueError: the checkpoint's family is unknown, or a field has a value knnmem cannot run.
    """
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    try:
        saved = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file}: not valid JSON ({error})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{file}: expected a JSON object")
    family = saved.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"{file}: model_type {family!r} is not supported; knnmem loads {sorted(FAMILIES)}")
    fields = FAMILIES[family]({k: v for k, v in saved.items() if k not in _BOOKKEEPING})
    return LongLlamaConfig(**{**fields, **overrides})


def pick_device(name: str = "auto") -> torch.device:
    """The torch device called `name` ("cpu", "cuda", "cuda:1", ...); "auto" is CUDA where available, else the CPU.

    Raises `ValueError` for a name torch does not know or a CUDA device this machine does not have.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {name!r} is not available: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def load_pretrained(path: str | Path, device: str = "auto", **overrides):
    """The model saved in directory `path` (any family of `FAMILIES`), in eval mode on `device` (see
    `pick_device`), and its tokenizer.

    `overrides` replace fields of the saved config, e.g. `mem_layers=[]` for the same weights without
    memory layers. Raises `FileNotFoundError` when `path` holds no `config.json`.
    """
    from transformers import AutoTokenizer

    from .modeling import LongLlamaForCausalLM

    target = pick_device(device)
    model = LongLlamaForCausalLM.from_pretrained(path, **overrides).eval().to(target)
    return model, AutoTokenizer.from_pretrained(path)
