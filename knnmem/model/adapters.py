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

# Fields of a saved config that describe the file, not the model.
_BOOKKEEPING = ("architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "model_type",
                "_name_or_path", "use_cache")


def _longllama(fields: dict) -> dict:
    return fields


def _llama(fields: dict) -> dict:
    """A `transformers` LLaMA config: LongLLaMA without memory layers, the same weights."""
    fields = dict(fields)
    if fields.pop("pretraining_tp", 1) not in (1, None):
        raise ValueError("pretraining_tp > 1 is not supported: save the checkpoint with pretraining_tp=1")
    fields.pop("attention_dropout", None)  # training-only, and knnmem fine-tunes without dropout
    rope = fields.pop("rope_parameters", None) or {}
    rope = dict(rope)
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope_type != "default" or set(rope) - {"rope_theta"}:
        raise ValueError(f"rope parameters {fields.get('rope_parameters') or rope!r} are not supported: only plain "
                         "rotary embeddings (rope_type 'default') are")
    if "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
    return fields


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
